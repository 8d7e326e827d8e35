"""Checking a staged NAR before it is published: never a builder's bytes unchecked.

The compressed object is read once, in pieces: its bytes are hashed (the
FileHash) and copied to a temporary file, while the decompressed stream is
hashed (the NarHash).  Memory stays bounded whatever the NAR's size; the
temporary file is what gets published, so what was checked is what is served.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import IO

from uploader._exceptions import TargetError, UploaderError
from uploader.compression import METHODS, open_decompressor
from uploader.engine import discard_temporary
from uploader.nar import SINGLE_FILE_END, SINGLE_FILE_HEADS
from uploader.nixbase32 import format_hash, parse_hash
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


class _FlatContent:
    """The SHA-256 of the one file a NAR holds, fed the NAR in pieces: what
    a flat (``fixed:sha256:``) or text (``text:sha256:``) content address
    is.  ``digest()`` is None when the NAR is not a single regular file."""

    def __init__(self) -> None:
        self._buffer = bytearray()  # the header until it is read; then the end
        self._left: int | None = None  # content bytes still to hash
        self._size = 0
        self._sha = hashlib.sha256()
        self._bad = False

    def update(self, piece: bytes) -> None:
        if self._bad:
            return
        if self._left is None:
            self._buffer += piece
            if not self._read_head():
                return
            piece, self._buffer = bytes(self._buffer), bytearray()
        assert self._left is not None
        take = piece[: self._left]
        self._sha.update(take)
        self._left -= len(take)
        self._buffer += piece[len(take) :]
        self._bad = len(self._buffer) > len(SINGLE_FILE_END) + 8

    def _read_head(self) -> bool:
        """Whether the header is read (then the buffer holds what follows)."""
        head = bytes(self._buffer)
        possible = False
        for prefix in SINGLE_FILE_HEADS:
            need = len(prefix) + 8
            if len(head) >= need and head.startswith(prefix):
                self._left = self._size = int.from_bytes(head[len(prefix) : need], "little")
                del self._buffer[:need]
                return True
            possible |= len(head) < need and (prefix + bytes(8)).startswith(head[: len(prefix)])
        self._bad = not possible
        return False

    def digest(self) -> bytes | None:
        end = bytes(-self._size % 8) + SINGLE_FILE_END
        if self._bad or self._left != 0 or bytes(self._buffer) != end:
            return None
        return self._sha.digest()


def _flat_claim(a: Attestation) -> str | None:
    """The content hash a flat or text content address claims for the file
    in the NAR (a recursive one is the NarHash, checked as such)."""
    if a.ca is None:
        return None
    for prefix in ("fixed:sha256:", "text:sha256:"):
        if a.ca.startswith(prefix):
            return "sha256:" + a.ca.removeprefix(prefix)
    return None


def _claimed_digest(claim: str | None) -> bytes | None:
    try:
        return parse_hash(claim) if claim is not None else None
    except ValueError:
        return None


class _NotTheBuilders(Exception):
    """Reading the bucket or writing the local copy failed: the publisher's
    trouble (a network error, a full disk), never held against the NAR."""

    def __init__(self, error: UploaderError) -> None:
        super().__init__(str(error))
        self.error = error


class _HashingReader:
    """Reads ``source``, hashing and copying every byte to ``copy``."""

    def __init__(self, source: IO[bytes], copy: IO[bytes], url: str) -> None:
        self.source = source
        self.copy = copy
        self.url = url
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.source.read(n if n >= 0 else _PIECE)
        except Exception as e:  # botocore's read errors have no common base
            raise _NotTheBuilders(
                TargetError(f"reading {self.url}: {type(e).__name__}: {e}")
            ) from e
        self.sha.update(data)
        self.size += len(data)
        try:
            self.copy.write(data)
        except OSError as e:
            raise _NotTheBuilders(_copy_failed(self.url, self.copy, e)) from e
        return data

    def readable(self) -> bool:
        return True


def _copy_failed(url: str, copy: IO[bytes], e: OSError) -> UploaderError:
    where = os.path.dirname(getattr(copy, "name", "")) or tempfile.gettempdir()
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UploaderError(
            f"no space left in {where} for a copy of {url} to check: free space there, "
            "or point --tmp-dir (or TMPDIR) at a larger disk"
        )
    return UploaderError(f"copying {url} to {where} to check it: {e}")


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
    try:
        copy = tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="staged-")  # noqa: SIM115
    except OSError as e:
        source.close()
        raise UploaderError(f"making a temporary file to check {url} in: {e}") from e
    try:
        with source:
            raw = _HashingReader(source, copy, url)
            nar_sha = hashlib.sha256()
            nar_size = 0
            claimed = _flat_claim(a)
            content = _FlatContent() if claimed is not None else None
            try:
                reader = open_decompressor(a.nar.compression, raw)  # type: ignore[arg-type]
                while piece := reader.read(_PIECE):
                    nar_sha.update(piece)
                    nar_size += len(piece)
                    if content is not None:
                        content.update(piece)
                    if nar_size > a.nar_size:
                        break  # no need to read a bomb to its end
            except _NotTheBuilders:
                raise
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
        if content is not None:
            # A content address counts for a quorum of one (tally.py): the
            # bytes must be the ones it names, not only the claim's path.
            digest = content.digest()
            found = format_hash(digest) if digest is not None else "not a single regular file"
            if digest is None or digest != _claimed_digest(claimed):
                raise StagedMismatch(
                    f"its staged NAR {url} does not hold what its content address {a.ca} "
                    f"names (the file's sha256: {found})"
                )
        try:
            copy.flush()
        except OSError as e:
            raise _NotTheBuilders(_copy_failed(url, copy, e)) from e
        return VerifiedNar(copy, file_hash, raw.size)
    except _NotTheBuilders as e:
        discard_temporary(copy)
        raise e.error from e.__cause__
    except BaseException:
        discard_temporary(copy)
        raise
