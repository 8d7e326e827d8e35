"""NAR compression: the methods a binary cache may use, as streaming writers.

zstd is the default (Nix reads it since 2.3.17) and uses zstd's own worker
threads for large NARs; xz matches Nix's historical default; none stores the
NAR as is.
"""

from __future__ import annotations

import bz2
import lzma
import threading
from typing import IO, BinaryIO, Protocol

import zstandard

from uploader._exceptions import ConfigError

__all__ = [
    "METHODS",
    "Compressor",
    "check_level",
    "check_method",
    "compress_bytes",
    "extension",
    "open_compressor",
    "open_decompressor",
]

METHODS = ("zstd", "xz", "none")
_EXTENSIONS = {"zstd": ".zst", "xz": ".xz", "none": ""}
# zstd's default level, the one `nix copy` uses unless compression-level is set.
DEFAULT_ZSTD_LEVEL = 3
# The levels each method accepts (zstd's negative ones are its fast modes).
_LEVELS = {"zstd": (-(1 << 17), zstandard.MAX_COMPRESSION_LEVEL), "xz": (0, 9)}
# Below this size zstd worker threads cost more than they save.
THREADED_ABOVE = 4 << 20
_JOB_SIZE = 2 << 20


class Compressor(Protocol):
    """Compresses everything written to it into the file it was opened on."""

    def write(self, data: bytes | memoryview) -> object: ...

    def close(self) -> None: ...


class _Passthrough:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def write(self, data: bytes | memoryview) -> object:
        return self._out.write(data)

    def close(self) -> None:
        self._out.flush()


class _Xz:
    def __init__(self, out: BinaryIO, level: int | None) -> None:
        self._out = out
        self._lzma = lzma.LZMACompressor(preset=6 if level is None else level)

    def write(self, data: bytes | memoryview) -> object:
        return self._out.write(self._lzma.compress(data))

    def close(self) -> None:
        self._out.write(self._lzma.flush())
        self._out.flush()


def extension(method: str) -> str:
    """The NAR file name suffix Nix uses for ``method``."""
    check_method(method)
    return _EXTENSIONS[method]


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unsupported compression {method!r}: choose one of {', '.join(METHODS)}")


def check_level(method: str, level: int | None) -> None:
    """Refuse a level ``method`` cannot use, before any NAR is compressed with it."""
    check_method(method)
    if level is None or method not in _LEVELS:
        return
    low, high = _LEVELS[method]
    if not low <= level <= high:
        raise ConfigError(f"compression level {level} is out of range for {method} ({low}..{high})")


def open_compressor(
    method: str,
    out: BinaryIO,
    *,
    level: int | None = None,
    size_hint: int = 0,
    threads: int = 0,
) -> Compressor:
    """A writer compressing into ``out``; ``close()`` flushes but leaves ``out`` open.

    ``threads`` > 0 lets zstd compress a large NAR (per ``size_hint``) on that
    many worker threads, which run outside the GIL.
    """
    check_level(method, level)
    if method == "none":
        return _Passthrough(out)
    if method == "xz":
        return _Xz(out, level)
    workers = threads if size_hint > THREADED_ABOVE else 0
    params = zstandard.ZstdCompressionParameters.from_level(
        DEFAULT_ZSTD_LEVEL if level is None else level,
        threads=workers,
        # zstd's default job size buffers ~100 MiB across two workers on
        # incompressible data.  Measured with two workers: 4 MiB jobs hold
        # 51 MiB there and 30 MiB on a NAR of binaries; 2 MiB jobs 25 and
        # 17 MiB, as fast, for a file 0.2% larger.
        job_size=_JOB_SIZE if workers else 0,
        write_content_size=False,
    )
    cctx = zstandard.ZstdCompressor(compression_params=params)
    writer: Compressor = cctx.stream_writer(out, size=-1, closefd=False)
    return writer


_local = threading.local()


def compress_bytes(method: str, data: bytes, *, level: int | None = None) -> bytes:
    """``data`` compressed whole, as ``open_compressor`` would write it: for
    tiny NARs, where setting a compressor up costs more than compressing.
    zstd's compressor (a few MiB of tables) is kept for the next call, one
    per thread and level."""
    check_level(method, level)
    if method == "none":
        return data
    if method == "xz":
        return lzma.compress(data, preset=6 if level is None else level)
    level = DEFAULT_ZSTD_LEVEL if level is None else level
    kept: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("zstd", {})
    cctx = kept.get(level)
    if cctx is None:
        params = zstandard.ZstdCompressionParameters.from_level(level, write_content_size=False)
        cctx = kept[level] = zstandard.ZstdCompressor(compression_params=params)
    return cctx.compress(data)


def open_decompressor(method: str, source: IO[bytes]) -> IO[bytes]:
    """A reader of the NAR inside ``source`` compressed with ``method`` (any
    a narinfo may name: also bzip2, Nix's oldest default).  Reads across
    zstd frames and xz streams, as Nix does: Nix ≥ 2.35 writes several."""
    if method == "none":
        return source
    if method == "zstd":
        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(
            source, read_across_frames=True, closefd=False
        )
        return reader
    if method == "xz":
        return lzma.LZMAFile(source)
    if method == "bzip2":
        return bz2.BZ2File(source)
    raise ValueError(f"unknown compression {method!r}")
