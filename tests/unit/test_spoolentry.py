from __future__ import annotations

import pytest

from tests.support.entries import DEV, DRV, HASH, OUT, entry_bytes
from uploader._exceptions import SpoolError
from uploader.spoolentry import FORMAT_HEADER, MAX_ENTRY_SIZE, Entry, parse_entry


def test_an_entry_with_derivation_and_outputs_parses() -> None:
    entry = parse_entry(entry_bytes(f"drv {DRV}", f"out {OUT}", f"out {DEV}"), "a.entry", 5.0)
    assert entry == Entry(name="a.entry", drv=DRV, outputs=(OUT, DEV), mtime=5.0)


def test_an_entry_from_nix_2_8_carries_only_the_derivation() -> None:
    entry = parse_entry(entry_bytes(f"drv {DRV}"), "a.entry")
    assert entry.drv == DRV
    assert entry.outputs == ()


def test_outputs_without_derivation_and_repeated_outputs_are_accepted() -> None:
    entry = parse_entry(entry_bytes(f"out {OUT}", f"out {OUT}", "", ""), "a.entry")
    assert entry.drv is None
    assert entry.outputs == (OUT,)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "does not start with"),
        (b"hello world\n", "does not start with"),
        (b"\x00\x01\x02\x03 binary", "does not start with"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8"),
        (FORMAT_HEADER.encode() + b"\ndrv /nix/store/\xff\xfe.drv\n", "not UTF-8"),
        (b"nix-cache-uploader-spool 2\n" + f"drv {DRV}\n".encode(), "unsupported format"),
        (entry_bytes(), "neither a derivation nor an output"),
        (entry_bytes(f"path {OUT}"), "line 2: unknown line"),
        (entry_bytes(f"drv {DRV}", "", f"out {OUT}"), "line 3: unknown line"),
        (entry_bytes("drv /etc/passwd"), "not under /nix/store/"),
        (entry_bytes(f"out /nix/store/../../etc/{HASH}-x"), "'..'"),
        (entry_bytes(f"out /nix/store/{HASH}-x/../../../etc/shadow"), "'..'"),
        (entry_bytes(f"out {OUT}/bin/hello"), "subpath"),
        (entry_bytes(f"out {OUT}\r"), "whitespace"),
        (entry_bytes(f"drv {OUT}"), "does not end in .drv"),
        (entry_bytes(f"drv {DRV}", f"drv {DRV}"), "a second 'drv' line"),
        (entry_bytes(f"out {OUT}" + "x" * MAX_ENTRY_SIZE), "larger than the limit"),
    ],
)
def test_bad_entries_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(SpoolError) as info:
        parse_entry(data, "bad.entry")
    assert str(info.value).startswith("spool entry 'bad.entry': ")
    assert reason in str(info.value)
