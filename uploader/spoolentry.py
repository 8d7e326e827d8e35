"""The spool entry format: what ``hook/post-build-hook`` writes, parsed
without trusting it (every path is checked to be a store path, every line
known, the size bounded).  Where entries live and how they are read is
:mod:`uploader.spool`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass

from uploader._exceptions import InvalidPathError, SpoolError
from uploader.storepath import parse_store_path

__all__ = ["FORMAT_HEADER", "MAX_ENTRY_SIZE", "Entry", "parse_entry"]

MAX_ENTRY_SIZE = 64 * 1024
FORMAT_HEADER = "nix-cache-uploader-spool 1"

_HEADER_PREFIX = "nix-cache-uploader-spool "


@dataclass(frozen=True)
class Entry:
    """One build the hook reported: its derivation and the outputs it knew."""

    name: str
    drv: str | None
    outputs: tuple[str, ...]
    mtime: float


def parse_entry(
    data: bytes, name: str, mtime: float = 0.0, max_size: int = MAX_ENTRY_SIZE
) -> Entry:
    """Parse the bytes of spool entry ``name``; raise SpoolError saying what is wrong."""

    def bad(reason: str, store_path: str | None = None) -> SpoolError:
        return SpoolError(f"spool entry {name!r}: {reason}", store_path=store_path)

    if len(data) > max_size:
        raise bad(f"larger than the limit of {max_size} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 text (invalid byte at offset {e.start})") from None
    lines = text.split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].startswith(_HEADER_PREFIX):
        raise bad(f"does not start with {FORMAT_HEADER!r}")
    if lines[0] != FORMAT_HEADER:
        raise bad(f"unsupported format {lines[0]!r} (this uploader reads {FORMAT_HEADER!r})")
    drv: str | None = None
    outputs: list[str] = []
    for number, line in enumerate(lines[1:], start=2):
        kind, _, value = line.partition(" ")
        if kind not in ("drv", "out"):
            raise bad(f"line {number}: unknown line {line[:80]!r} (expected 'drv' or 'out')")
        try:
            path = parse_store_path(value)
        except InvalidPathError as e:
            raise bad(f"line {number}: {e}", store_path=value) from None
        if kind == "out":
            if path not in outputs:
                outputs.append(path)
        elif drv is not None:
            raise bad(f"line {number}: a second 'drv' line", store_path=path)
        elif not path.endswith(".drv"):
            raise bad(f"line {number}: derivation {path!r} does not end in .drv", path)
        else:
            drv = path
    if drv is None and not outputs:
        raise bad("names neither a derivation nor an output")
    return Entry(name=name, drv=drv, outputs=tuple(outputs), mtime=mtime)
