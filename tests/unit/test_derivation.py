"""Reading a derivation's outputs from its .drv (ATerm) without Nix.  The
reader must answer exactly or not at all: anything it cannot read for
certain is left to `nix show-derivation`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uploader import store as store_module
from uploader.derivation import parse_outputs
from uploader.store import _read_drv

OUT = "/nix/store/n5z2nmayighn0l4j25f0sdqxg6gwq7ic-hello-2.12"
DEV = "/nix/store/0c2a5yn0gk8v8cmcd5r6brdjw2zb3nb1-hello-2.12-dev"
REST = ',[],[],"x86_64-linux","/bin/sh",["-c","echo \\"hi\\""],[("out","x")])'


def drv(outputs: str) -> bytes:
    return f"Derive([{outputs}]{REST}".encode()


def test_single_output() -> None:
    assert parse_outputs(drv(f'("out","{OUT}","","")')) == {"out": OUT}


def test_several_outputs_and_a_fixed_output_hash() -> None:
    data = drv(f'("dev","{DEV}","",""),("out","{OUT}","r:sha256","0a1b2c")')
    assert parse_outputs(data) == {"dev": DEV, "out": OUT}


def test_what_it_cannot_tell_is_left_to_nix() -> None:
    cases = [
        drv('("out","","","")'),  # floating content-addressed: no path yet
        drv('("out","/tmp/x","","")'),  # not a store path
        drv(f'("out","{OUT}","","")("dev","{DEV}","","")'),  # no comma
        drv(f'("out","{OUT}","",""),("out","{DEV}","","")'),  # a name twice
        drv(f'("o\\"ut","{OUT}","","")'),  # escapes
        b'DrvWithVersion("xp-dyn-drv",[("out","' + OUT.encode() + b'","","")]',
        f'Derive([("out","{OUT}","",""'.encode(),  # cut short
        b"",
        b"\x00garbage",
    ]
    for data in cases:
        assert parse_outputs(data) is None, data


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    result = parse_outputs(data)
    assert result is None or all(p.startswith("/nix/store/") for p in result.values())


@given(st.binary(max_size=40))
def test_a_valid_prefix_followed_by_anything_is_read_exactly_or_refused(tail: bytes) -> None:
    data = f'Derive([("out","{OUT}","","")'.encode() + tail
    result = parse_outputs(data)
    assert result in (None, {"out": OUT})
    if tail.startswith(b"]"):
        assert result == {"out": OUT}


def test_a_drv_is_read_only_as_the_regular_file_it_should_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read at the daemon's start and for every arrival, on the roots' one
    thread: a link or a fifo there would be followed, or block that thread
    and every root change after it."""
    real = tmp_path / "real.drv"
    real.write_bytes(drv(f'("out","{OUT}","","")'))
    assert _read_drv(str(real)) == real.read_bytes()
    (tmp_path / "link.drv").symlink_to(real)
    os.mkfifo(tmp_path / "fifo.drv")
    for name in ("link.drv", "fifo.drv", "missing.drv"):
        assert _read_drv(str(tmp_path / name)) is None
    monkeypatch.setattr(store_module, "_MAX_DRV", len(real.read_bytes()) - 1)
    assert _read_drv(str(real)) is None  # larger than any .drv: Nix is asked instead
