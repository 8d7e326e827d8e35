"""NAR compression: every method round-trips and names its files as Nix does."""

from __future__ import annotations

import io
import lzma
import os

import pytest
import zstandard

from uploader._exceptions import ConfigError
from uploader.compression import METHODS, check_level, extension, open_compressor

MiB = 1 << 20


def compress(method: str, data: bytes, **options: int) -> bytes:
    """``data`` written through the compressor in uneven pieces."""
    out = io.BytesIO()
    compressor = open_compressor(method, out, **options)
    view = memoryview(data)
    offset, step = 0, 1
    while offset < len(view):
        compressor.write(view[offset : offset + step])
        offset += step
        step = step * 3 + 1
    compressor.close()
    assert not out.closed, "close() must leave the destination open"
    return out.getvalue()


def decompress(method: str, data: bytes) -> bytes:
    if method == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        )
        return bytes(reader.read())
    if method == "xz":
        return lzma.decompress(data)
    return data


SAMPLE = b"".join(b"line %d of a NAR-ish text\n" % i for i in range(20000))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("data", [b"", b"x", SAMPLE], ids=["empty", "one-byte", "text"])
def test_round_trip(method: str, data: bytes) -> None:
    packed = compress(method, data)
    assert decompress(method, packed) == data
    if method != "none" and data == SAMPLE:
        assert len(packed) < len(data) / 5


@pytest.mark.parametrize(("method", "level"), [("zstd", 1), ("zstd", 19), ("zstd", -5), ("xz", 0)])
def test_round_trip_at_other_levels(method: str, level: int) -> None:
    assert decompress(method, compress(method, SAMPLE, level=level)) == SAMPLE


def test_threaded_zstd_on_a_large_nar_round_trips() -> None:
    data = os.urandom(2 * MiB) + SAMPLE * 30 + os.urandom(MiB)
    assert len(data) > 4 * MiB
    packed = compress("zstd", data, size_hint=len(data), threads=2)
    assert decompress("zstd", packed) == data


@pytest.mark.parametrize("method", ["gzip", "bzip2", "ZSTD", ""])
def test_unknown_method_is_a_config_error(method: str) -> None:
    with pytest.raises(ConfigError, match=r"unsupported compression .*zstd, xz, none"):
        extension(method)
    with pytest.raises(ConfigError, match="unsupported compression"):
        open_compressor(method, io.BytesIO())


@pytest.mark.parametrize(("method", "suffix"), [("zstd", ".zst"), ("xz", ".xz"), ("none", "")])
def test_extension_is_nixs(method: str, suffix: str) -> None:
    assert extension(method) == suffix


@pytest.mark.parametrize(("method", "level"), [("xz", 10), ("xz", -1), ("zstd", 23)])
def test_level_out_of_range_is_a_config_error(method: str, level: int) -> None:
    # Refused up front, not by lzma/zstandard halfway through an upload.
    with pytest.raises(ConfigError, match=rf"level {level} is out of range for {method}"):
        check_level(method, level)
    with pytest.raises(ConfigError):
        open_compressor(method, io.BytesIO(), level=level)


def test_level_is_ignored_without_compression() -> None:
    check_level("none", 99)
    assert compress("none", SAMPLE, level=99) == SAMPLE
