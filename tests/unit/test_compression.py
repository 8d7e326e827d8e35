"""NAR compression: every method round-trips and names its files as Nix does."""

from __future__ import annotations

import io
import lzma
import os
import threading
import time

import pytest
import zstandard

from uploader._exceptions import ConfigError
from uploader.compression import (
    ENCODER_BUDGET,
    HEAVY_ENCODER,
    METHODS,
    _EncoderGate,
    check_level,
    compress_bytes,
    encoder_memory,
    extension,
    open_compressor,
)

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


def test_what_an_encoder_takes() -> None:
    assert encoder_memory("xz", None) == 94 * MiB  # xz(1): preset 6
    assert encoder_memory("xz", 9) == 674 * MiB
    # A dictionary no larger than the NAR.
    assert encoder_memory("xz", None, size_hint=3 * MiB) == 94 * MiB * 3 // 8
    assert encoder_memory("xz", 9, size_hint=150_000) < 3 * MiB
    assert encoder_memory("xz", None, size_hint=64 * MiB) == 94 * MiB
    assert encoder_memory("zstd", None) < HEAVY_ENCODER  # the default level never waits
    assert encoder_memory("zstd", 19) >= HEAVY_ENCODER
    # A NAR zstd compresses on two workers holds two contexts.
    one = encoder_memory("zstd", 19, size_hint=64 * MiB)
    assert encoder_memory("zstd", 19, size_hint=64 * MiB, threads=2) == 2 * one
    # Tables no larger than the NAR needs.
    assert encoder_memory("zstd", 19, size_hint=3 * MiB) < one * 2 // 3
    assert encoder_memory("none", None) == 0
    with pytest.raises(ConfigError):
        encoder_memory("xz", 10)


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "in-one-piece"])
def test_xz_uses_no_larger_dictionary_than_the_nar(streamed: bool) -> None:
    """Preset 6's 8 MiB dictionary costs a client's decoder about 9 MiB; one
    for 150 KiB of data, 256 KiB."""
    data = os.urandom(1000) * 150
    hint = len(data)
    packed = compress("xz", data, size_hint=hint) if streamed else compress_bytes("xz", data)
    assert lzma.LZMADecompressor(memlimit=MiB).decompress(packed) == data
    with pytest.raises(lzma.LZMAError, match="limit"):
        lzma.LZMADecompressor(memlimit=MiB).decompress(compress("xz", data))


def _most_at_once(
    gate: _EncoderGate, encoders: list[tuple[str, int | None, int]], together: int
) -> int:
    """How many of ``encoders`` (method, level, size) had their turn at once:
    each, once in, waits for ``together`` of them to be in, then stays a
    moment."""
    inside = most = 0
    lock = threading.Lock()
    met = threading.Barrier(together, timeout=30)

    def hold(method: str, level: int | None, size: int) -> None:
        nonlocal inside, most
        with gate.turn(method, level, size_hint=size):
            with lock:
                inside += 1
                most = max(most, inside)
            met.wait()
            time.sleep(0.02)
            with lock:
                inside -= 1

    threads = [threading.Thread(target=hold, args=e) for e in encoders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "an encoder never had its turn"
    return most


def test_xz_encoders_take_turns_within_the_cores_and_the_budget() -> None:
    xz = ("xz", None, 64 * MiB)
    assert _most_at_once(_EncoderGate(ENCODER_BUDGET, 2), [xz] * 8, 2) == 2
    # More cores, but two fill the budget.
    assert _most_at_once(_EncoderGate(ENCODER_BUDGET, 16), [xz] * 8, 2) == 2
    # Smaller NARs, smaller encoders: as many as the cores.
    assert _most_at_once(_EncoderGate(ENCODER_BUDGET, 4), [("xz", None, MiB)] * 8, 4) == 4
    assert _most_at_once(_EncoderGate(ENCODER_BUDGET, 1), [xz] * 4, 1) == 1
    # Larger than the budget alone: one at a time, but each runs.
    assert _most_at_once(_EncoderGate(ENCODER_BUDGET, 2), [("xz", 9, 64 * MiB)] * 3, 1) == 1
    assert _most_at_once(_EncoderGate(ENCODER_BUDGET, 2), [("zstd", 22, 64 * MiB)] * 3, 1) == 1


def test_zstd_encoders_at_the_default_level_never_wait() -> None:
    gate = _EncoderGate(ENCODER_BUDGET, 1)
    # The second would wait forever (in this very thread) if it took a turn.
    with gate.turn("xz", 9), gate.turn("zstd", None, size_hint=64 * MiB, threads=2):
        pass
    assert _most_at_once(gate, [("zstd", None, 64 * MiB)] * 6, 6) == 6
