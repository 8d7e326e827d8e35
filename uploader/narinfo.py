"""The ``.narinfo`` file and the fingerprint that its signatures cover.

A narinfo is what substituters read first: where the NAR lives, what it
hashes to, what it references and who signed it.  :meth:`NarInfo.render`
writes the exact text Nix writes; :meth:`NarInfo.parse` reads any narinfo
Nix would accept.  :func:`fingerprint` is the byte string signed by
``Sig:`` lines; getting it wrong produces signatures that every client
rejects, so it lives here next to the fields it is built from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from uploader._exceptions import InvalidPathError
from uploader.nixbase32 import format_hash, parse_hash
from uploader.storepath import STORE_DIR, parse_store_path

__all__ = ["NarInfo", "fingerprint"]

# Older Nix wrote this placeholder instead of omitting an unknown Deriver.
_UNKNOWN_DERIVER = "unknown-deriver"
# Keys whose repetition would make the file ambiguous; Sig may repeat.
_SINGLE_KEYS = frozenset(
    {
        "StorePath",
        "URL",
        "Compression",
        "FileHash",
        "FileSize",
        "NarHash",
        "NarSize",
        "References",
        "Deriver",
        "CA",
    }
)


def fingerprint(store_path: str, nar_hash: str, nar_size: int, references: Iterable[str]) -> bytes:
    """The bytes a ``Sig:`` signs: ``1;<path>;sha256:<nix32>;<size>;<refs>``.

    ``references`` are full store paths; they are sorted and comma-joined.
    ``nar_hash`` may be in any sha256 notation Nix accepts.
    """
    store_dir = os.path.dirname(store_path)
    parse_store_path(store_path, store_dir)
    refs = sorted(references)
    for ref in refs:
        # A bare basename here would sign garbage that no client can verify.
        parse_store_path(ref, store_dir)
    if nar_size <= 0:
        raise ValueError(f"cannot fingerprint {store_path}: NarSize must be positive")
    text = f"1;{store_path};{format_hash(parse_hash(nar_hash))};{nar_size};{','.join(refs)}"
    return text.encode()


@dataclass(frozen=True, kw_only=True)
class NarInfo:
    """The fields of one ``<hashpart>.narinfo``.

    ``references`` and ``deriver`` are basenames (``<hash>-<name>``), as in the
    file; ``references`` is kept sorted.
    """

    store_path: str
    url: str
    compression: str
    file_hash: str | None
    file_size: int | None
    nar_hash: str
    nar_size: int
    references: tuple[str, ...] = ()
    deriver: str | None = None
    sigs: tuple[str, ...] = ()
    ca: str | None = None

    def __post_init__(self) -> None:
        # Sorted once here so that equality, render and fingerprint agree
        # however the references were gathered.
        object.__setattr__(self, "references", tuple(sorted(self.references)))
        object.__setattr__(self, "sigs", tuple(self.sigs))

    def render(self) -> str:
        """The narinfo text, fields in the order Nix writes them."""
        lines = [
            f"StorePath: {self.store_path}",
            f"URL: {self.url}",
            f"Compression: {self.compression}",
        ]
        if self.file_hash is not None:
            lines.append(f"FileHash: {self.file_hash}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines.append(f"NarHash: {self.nar_hash}")
        lines.append(f"NarSize: {self.nar_size}")
        lines.append(f"References: {' '.join(self.references)}")
        if self.deriver is not None:
            lines.append(f"Deriver: {self.deriver}")
        lines.extend(f"Sig: {sig}" for sig in self.sigs)
        if self.ca is not None:
            lines.append(f"CA: {self.ca}")
        return "".join(line + "\n" for line in lines)

    def fingerprint(self, store_dir: str = STORE_DIR) -> bytes:
        """The bytes that this narinfo's ``Sig:`` lines sign."""
        return fingerprint(
            self.store_path,
            self.nar_hash,
            self.nar_size,
            (f"{store_dir}/{ref}" for ref in self.references),
        )

    @classmethod
    def parse(cls, text: str, store_dir: str = STORE_DIR) -> NarInfo:
        """Read a narinfo; unknown keys are ignored, missing or bad known ones raise ValueError.

        Hashes are normalised to ``sha256:<nix32>``; a missing Compression
        means bzip2, as it does for Nix.  StorePath, References and Deriver
        must be store paths in ``store_dir``.
        """
        fields, sigs = _read_lines(text)

        def required(key: str) -> str:
            value = fields.get(key)
            if not value:
                raise ValueError(f"narinfo has no {key}")
            return value

        path = _check_path("StorePath", required("StorePath"), store_dir)
        references = tuple(fields.get("References", "").split())
        for ref in references:
            _check_path("References", f"{store_dir}/{ref}", store_dir)
        deriver = fields.get("Deriver") or None
        if deriver == _UNKNOWN_DERIVER:
            deriver = None
        if deriver is not None:
            _check_path("Deriver", f"{store_dir}/{deriver}", store_dir)
        nar_size = _integer("NarSize", required("NarSize"))
        if nar_size == 0:
            raise ValueError("narinfo NarSize is 0")
        file_hash = fields.get("FileHash")
        file_size = fields.get("FileSize")
        return cls(
            store_path=path,
            url=required("URL"),
            compression=fields.get("Compression") or "bzip2",
            file_hash=_sha256("FileHash", file_hash) if file_hash else None,
            file_size=_integer("FileSize", file_size) if file_size else None,
            nar_hash=_sha256("NarHash", required("NarHash")),
            nar_size=nar_size,
            references=references,
            deriver=deriver,
            sigs=tuple(sigs),
            ca=fields.get("CA") or None,
        )


def _read_lines(text: str) -> tuple[dict[str, str], list[str]]:
    """Split narinfo text into single-valued fields and the list of Sig values."""
    fields: dict[str, str] = {}
    sigs: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line:
            continue
        key, colon, value = line.partition(":")
        if not colon or not key:
            raise ValueError(f"narinfo line {number} is not 'Key: value': {line!r}")
        value = value.removeprefix(" ")
        if key == "Sig":
            sigs.append(value)
        elif key in fields and key in _SINGLE_KEYS:
            raise ValueError(f"narinfo has more than one {key} line (line {number})")
        else:
            fields[key] = value
    return fields, sigs


def _integer(key: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"narinfo {key} is not a non-negative integer: {value!r}")
    return int(value)


def _sha256(key: str, value: str) -> str:
    try:
        return format_hash(parse_hash(value))
    except ValueError as e:
        raise ValueError(f"narinfo {key}: {e}") from None


def _check_path(key: str, path: str, store_dir: str) -> str:
    try:
        return parse_store_path(path, store_dir)
    except InvalidPathError as e:
        raise ValueError(f"narinfo {key}: {e}") from None
