"""The deep check of one NAR: download it, and compare its bytes with what
the narinfo promises (FileHash and FileSize of the compressed file, NarHash
and NarSize of the NAR inside).

Streamed in pieces through the hashes and the decompressor, so memory does
not grow with the NAR; zstd's window (at most 128 MiB, a few MiB as Nix and
this uploader write it) is the largest buffer.
"""

from __future__ import annotations

import hashlib
import lzma
from typing import IO

import zstandard

from uploader._exceptions import TargetError
from uploader.compression import open_decompressor
from uploader.lifecycle.listing import PathRecord
from uploader.nixbase32 import format_hash
from uploader.targets import Target

__all__ = ["check_nar"]

_CHUNK = 1 << 20


class _HashingReader:
    """Reads from ``source``, hashing and counting every byte read."""

    def __init__(self, source: IO[bytes], key: str) -> None:
        self.source = source
        self.key = key
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.source.read(n)
        except Exception as e:
            # The network, not the NAR: kept apart from decompression errors.
            raise TargetError(f"reading {self.key}: {e}") from e
        self.sha.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def check_nar(target: Target, record: PathRecord) -> str | None:
    """None when the NAR at ``record.url`` is what the narinfo says; else
    what differs.  Raises TargetError when the cache could not be read."""
    body = target.open_object(record.url)
    if body is None:
        return f"{record.url} does not exist"
    try:
        raw = _HashingReader(body, record.url)
        nar_sha = hashlib.sha256()
        nar_size = 0
        try:
            nar = open_decompressor(record.compression, raw)  # type: ignore[arg-type]
            while chunk := nar.read(_CHUNK):
                nar_sha.update(chunk)
                nar_size += len(chunk)
            raw.drain()  # anything after the compressed stream still counts
        except (zstandard.ZstdError, lzma.LZMAError, OSError, EOFError, ValueError) as e:
            return f"{record.url} does not decompress as {record.compression}: {e}"
    finally:
        body.close()
    differences = []
    if record.file_size is not None and raw.size != record.file_size:
        differences.append(f"FileSize {record.file_size}, the file has {raw.size} bytes")
    file_hash = format_hash(raw.sha.digest())
    if record.file_hash is not None and file_hash != record.file_hash:
        differences.append(f"FileHash {record.file_hash}, the file hashes to {file_hash}")
    if nar_size != record.nar_size:
        differences.append(f"NarSize {record.nar_size}, the NAR has {nar_size} bytes")
    nar_hash = format_hash(nar_sha.digest())
    if nar_hash != record.nar_hash:
        differences.append(f"NarHash {record.nar_hash}, the NAR hashes to {nar_hash}")
    return f"{record.url}: {'; '.join(differences)}" if differences else None
