"""The spool entry format: what ``hook/post-build-hook`` writes, parsed
without trusting it (every path is checked to be a store path, every line
known, the size bounded).  Where entries live and how they are read is
:mod:`uploader.spool`'s business.

Format 2 (the hook's)::

    nix-cache-uploader-spool 2
    drv <derivation>
    out <output>          (any number, also none)
    end

The hook runs shell builtins only, so it cannot rename a finished file into
place: it creates the entry under its final name and writes it there.  The
``end`` line says it is complete; without it, :class:`IncompleteEntryError`.
Format 1, left by older hooks, is the same without the ``end`` line: those
hooks renamed each entry into place once it was whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from uploader._exceptions import IncompleteEntryError, InvalidPathError, SpoolError
from uploader.storepath import parse_store_path

__all__ = [
    "END_LINE",
    "FORMAT_HEADER",
    "FORMAT_REFUSED",
    "FORMAT_V1_HEADER",
    "MAX_ENTRY_SIZE",
    "Entry",
    "parse_entry",
]

MAX_ENTRY_SIZE = 64 * 1024
# What the hook writes: this header, `drv`/`out` lines, then END_LINE.
FORMAT_HEADER = "nix-cache-uploader-spool 2"
END_LINE = "end"
# Written by older hooks (renamed into place, so complete without an end line).
FORMAT_V1_HEADER = "nix-cache-uploader-spool 1"

_HEADER_PREFIX = "nix-cache-uploader-spool "
# The start of the reason ``parse_entry`` gives (and older uploaders gave) an
# entry in a format it does not read: the spool requeues those it reads now.
FORMAT_REFUSED = re.compile(
    rf"spool entry '[^']*': unsupported format '{re.escape(_HEADER_PREFIX)}[^']*' "
    rf"\(this uploader reads '{re.escape(_HEADER_PREFIX)}"
)
_V2_START = f"{FORMAT_HEADER}\n".encode()
_V2_END = f"\n{END_LINE}\n".encode()


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
    if _still_written(data):
        raise IncompleteEntryError(f"spool entry {name!r}: no {END_LINE!r} line yet")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 text (invalid byte at offset {e.start})") from None
    lines = text.split("\n")
    if not lines[0].startswith(_HEADER_PREFIX):
        raise bad(f"does not start with {FORMAT_HEADER!r}")
    if lines[0] == FORMAT_HEADER:
        end = lines.index(END_LINE, 1)  # there: _still_written said so
        body, text_after_end = lines[1:end], lines[end + 1 :] != [""]
    elif lines[0] == FORMAT_V1_HEADER:
        body, text_after_end = lines[1:], False
        while body and body[-1] == "":
            body.pop()
    else:
        raise bad(
            f"unsupported format {lines[0]!r} (this uploader reads {FORMAT_HEADER!r} "
            f"and {FORMAT_V1_HEADER!r})"
        )
    drv: str | None = None
    outputs: list[str] = []
    for number, line in enumerate(body, start=2):
        kind, _, value = line.partition(" ")
        if kind == "invalid:":
            # The hook's own verdict on what Nix passed it.
            raise bad(f"the hook marked this entry invalid: {value[:200]}")
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
    if text_after_end:
        raise bad(f"line {len(body) + 3}: text after the {END_LINE!r} line")
    if drv is None and not outputs:
        raise bad("names neither a derivation nor an output")
    return Entry(name=name, drv=drv, outputs=tuple(outputs), mtime=mtime)


def _still_written(data: bytes) -> bool:
    """Whether ``data`` may be a format 2 entry its writer has not finished:
    nothing yet, part of the header, or no end line."""
    if data.startswith(_V2_START):
        return _V2_END not in data
    return _V2_START.startswith(data)
