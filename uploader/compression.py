"""NAR compression: the methods a binary cache may use, as streaming writers.

zstd is the default (Nix reads it since 2.3.17) and uses zstd's own worker
threads for large NARs; xz matches Nix's historical default; none stores the
NAR as is.
"""

from __future__ import annotations

import bz2
import contextlib
import lzma
import os
import threading
from collections.abc import Iterator
from typing import IO, BinaryIO, Protocol

import zstandard

from uploader._exceptions import ConfigError

__all__ = [
    "METHODS",
    "Compressor",
    "check_level",
    "check_method",
    "compress_bytes",
    "encoder_memory",
    "encoders",
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
_MiB = 1 << 20
# xz's presets 0 to 9: the dictionary each uses, and what its encoder takes
# with that dictionary (xz(1), "DictSize" and "CompMem").
_XZ_DEFAULT = 6
_XZ_DICT = tuple(k << 10 for k in (256, 1024, 2048, 4096, 4096, 8192, 8192, 16384, 32768, 65536))
_XZ_MEMORY = tuple(m * _MiB for m in (3, 9, 17, 32, 48, 94, 94, 186, 370, 674))
_XZ_DICT_MIN = 4096  # liblzma's smallest
# zstd encoders that take at least this much run only within ENCODER_BUDGET
# (zstd's default level, about 1 MiB an encoder, never waits); xz encoders
# always do.
HEAVY_ENCODER = 16 * _MiB
# Two xz encoders at the default preset on NARs of 8 MiB or more, or two
# zstd encoders at level 19.
ENCODER_BUDGET = 192 * _MiB


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


def _xz_filters(level: int | None, size_hint: int) -> list[dict[str, int]]:
    """The preset's filter, with a dictionary no larger than the NAR needs:
    one larger than the data finds nothing more, and costs its memory both
    here and in every client that decompresses it."""
    preset = _XZ_DEFAULT if level is None else level
    return [{"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": _xz_dict(preset, size_hint)}]


def _xz_dict(preset: int, size_hint: int) -> int:
    full = _XZ_DICT[preset]
    if size_hint <= 0:
        return full
    # The file's header rounds it up to 2^n or 3 * 2^(n-1).
    return min(full, max(_XZ_DICT_MIN, size_hint))


class _Xz:
    def __init__(self, out: BinaryIO, level: int | None, size_hint: int) -> None:
        self._out = out
        self._lzma = lzma.LZMACompressor(
            lzma.FORMAT_XZ, lzma.CHECK_CRC64, filters=_xz_filters(level, size_hint)
        )

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
        return _Xz(out, level, size_hint)
    workers = _workers(size_hint, threads)
    params = zstandard.ZstdCompressionParameters.from_level(
        DEFAULT_ZSTD_LEVEL if level is None else level,
        # A window and tables no larger than the NAR needs (at level 19, 50
        # instead of 81 MiB for 3 MiB).
        source_size=max(0, size_hint),
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


def _workers(size_hint: int, threads: int) -> int:
    return threads if size_hint > THREADED_ABOVE else 0


def encoder_memory(method: str, level: int | None, *, size_hint: int = 0, threads: int = 0) -> int:
    """About what the encoder ``open_compressor`` opens with these arguments
    takes at most, in bytes."""
    check_level(method, level)
    if method == "xz":
        preset = _XZ_DEFAULT if level is None else level
        # Its match finder is sized by the dictionary.
        return _XZ_MEMORY[preset] * _xz_dict(preset, size_hint) // _XZ_DICT[preset]
    if method == "zstd":
        params = zstandard.ZstdCompressionParameters.from_level(
            DEFAULT_ZSTD_LEVEL if level is None else level, source_size=max(0, size_hint)
        )
        # Each worker holds a context of its own.
        return int(params.estimated_compression_context_size()) * max(
            1, _workers(size_hint, threads)
        )
    return 0


class _EncoderGate:
    """Where encoders wait their turn: xz's, and zstd's at high levels.  At
    most one per core at once, and no more than ``budget`` bytes of them
    (always one, however large).

    The uploader compresses many NARs at once: up to ``jobs`` medium ones,
    and small ones as far as the round trips to the cache ask.  At zstd's
    default level an encoder is about 1 MiB and that costs nothing; an xz
    encoder at its default preset is up to 94 MiB, and 300 paths of 150 KiB
    with xz took a push to 437 MiB.  xz encoders beyond the cores would not
    compress any faster."""

    def __init__(self, budget: int, slots: int) -> None:
        self._budget = budget
        self._slots = max(1, slots)
        self._running = 0
        self._held = 0
        self._turn = threading.Condition()

    @contextlib.contextmanager
    def turn(
        self, method: str, level: int | None, *, size_hint: int = 0, threads: int = 0
    ) -> Iterator[None]:
        """A turn for the encoder ``open_compressor`` opens with these
        arguments, for the block."""
        cost = encoder_memory(method, level, size_hint=size_hint, threads=threads)
        if method != "xz" and cost < HEAVY_ENCODER:
            yield
            return
        with self._turn:
            while self._running and (
                self._running >= self._slots or self._held + cost > self._budget
            ):
                self._turn.wait()
            self._running += 1
            self._held += cost
        try:
            yield
        finally:
            with self._turn:
                self._running -= 1
                self._held -= cost
                self._turn.notify_all()


# Shared by every engine in the process.
encoders = _EncoderGate(ENCODER_BUDGET, os.cpu_count() or 1)

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
        return lzma.compress(data, filters=_xz_filters(level, len(data)))
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
