"""NAR compression: the methods a binary cache may use, as streaming writers.

zstd is the default (Nix reads it since 2.3.17) and uses zstd's own worker
threads for large NARs; xz matches Nix's historical default; none stores the
NAR as is.
"""

from __future__ import annotations

import lzma
from typing import IO, BinaryIO, Protocol

import zstandard

from uploader._exceptions import ConfigError

__all__ = [
    "METHODS",
    "Compressor",
    "check_level",
    "check_method",
    "extension",
    "open_compressor",
    "open_decompressed",
]

METHODS = ("zstd", "xz", "none")
_EXTENSIONS = {"zstd": ".zst", "xz": ".xz", "none": ""}
# zstd's default level, the one `nix copy` uses unless compression-level is set.
DEFAULT_ZSTD_LEVEL = 3
# The levels each method accepts (zstd's negative ones are its fast modes).
_LEVELS = {"zstd": (-(1 << 17), zstandard.MAX_COMPRESSION_LEVEL), "xz": (0, 9)}
# Below this size zstd worker threads cost more than they save.
THREADED_ABOVE = 4 << 20
_JOB_SIZE = 4 << 20


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
        # incompressible data; 4 MiB jobs use about half that, as fast.
        job_size=_JOB_SIZE if workers else 0,
        write_content_size=False,
    )
    cctx = zstandard.ZstdCompressor(compression_params=params)
    writer: Compressor = cctx.stream_writer(out, size=-1, closefd=False)
    return writer


def open_decompressed(method: str, raw: IO[bytes]) -> IO[bytes]:
    """A reader of what ``raw`` (compressed with ``method``) decompresses to;
    each ``read(n)`` returns at most n bytes, whatever the compression ratio."""
    check_method(method)
    if method == "none":
        return raw
    if method == "xz":
        return lzma.open(raw, "rb")
    # NARs written by other tools may hold several frames.
    reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return reader
