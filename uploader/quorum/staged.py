"""Checking a staged NAR before it is published: never a builder's bytes unchecked.

The compressed object is read once, in pieces: its bytes are hashed (the
FileHash) and copied to a temporary file, while the decompressed stream is
hashed (the NarHash).  Memory stays bounded whatever the NAR's size; the
temporary file is what gets published, so what was checked is what is served.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from typing import IO

from uploader.compression import METHODS, open_decompressor
from uploader.nixbase32 import format_hash
from uploader.quorum.attestation import Attestation
from uploader.quorum.bucket import Bucket
from uploader.quorum.layout import STAGING

__all__ = ["StagedMismatch", "VerifiedNar", "fetch_verified"]

_PIECE = 1 << 20


class StagedMismatch(Exception):
    """The staged NAR is not what the attestation claims (``missing``: not there at all)."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass
class VerifiedNar:
    """A staged NAR that matched its attestation, copied to ``file``."""

    file: IO[bytes]  # a named temporary file; closing it deletes it
    file_hash: str
    file_size: int


class _HashingReader:
    """Reads ``source``, hashing and copying every byte to ``copy``."""

    def __init__(self, source: IO[bytes], copy: IO[bytes]) -> None:
        self.source = source
        self.copy = copy
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n if n >= 0 else _PIECE)
        self.sha.update(data)
        self.size += len(data)
        self.copy.write(data)
        return data

    def readable(self) -> bool:
        return True


def fetch_verified(bucket: Bucket, a: Attestation, tmp_dir: str | None) -> VerifiedNar:
    """Download ``a``'s staged NAR and check it against ``a``; StagedMismatch if it differs."""
    url = a.nar.url
    if not url.startswith(f"{STAGING}{a.builder}/"):
        raise StagedMismatch(f"its NAR {url} is not in {a.builder}'s staging area")
    if a.nar.compression not in METHODS:
        raise StagedMismatch(f"its NAR's compression {a.nar.compression!r} is not supported")
    source = bucket.open_object(url)
    if source is None:
        raise StagedMismatch(f"its staged NAR {url} is missing", missing=True)
    copy = tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="staged-")  # noqa: SIM115
    try:
        with source:
            raw = _HashingReader(source, copy)
            nar_sha = hashlib.sha256()
            nar_size = 0
            try:
                reader = open_decompressor(a.nar.compression, raw)  # type: ignore[arg-type]
                while piece := reader.read(_PIECE):
                    nar_sha.update(piece)
                    nar_size += len(piece)
                    if nar_size > a.nar_size:
                        break  # no need to read a bomb to its end
            except Exception as e:  # zstd/xz errors have no common base
                raise StagedMismatch(f"its staged NAR {url} does not decompress: {e}") from e
            while raw.read(_PIECE):
                pass  # the FileHash covers every byte, trailing ones too
        file_hash = format_hash(raw.sha.digest())
        if (file_hash, raw.size) != (a.nar.file_hash, a.nar.file_size):
            raise StagedMismatch(
                f"its staged NAR {url} has FileHash {file_hash} ({raw.size} bytes), "
                f"not the attested {a.nar.file_hash} ({a.nar.file_size} bytes)"
            )
        nar_hash = format_hash(nar_sha.digest())
        if (nar_hash, nar_size) != (a.nar_hash, a.nar_size):
            raise StagedMismatch(
                f"its staged NAR {url} has NarHash {nar_hash} ({nar_size} bytes), "
                f"not the attested {a.nar_hash} ({a.nar_size} bytes)"
            )
        copy.flush()
        return VerifiedNar(copy, file_hash, raw.size)
    except BaseException:
        copy.close()
        raise
