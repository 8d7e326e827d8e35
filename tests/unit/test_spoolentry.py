from __future__ import annotations

import pytest

from tests.support.entries import DEV, DRV, HASH, OUT, entry_bytes, v1_entry_bytes
from uploader._exceptions import IncompleteEntryError, SpoolError
from uploader.spoolentry import FORMAT_HEADER, MAX_ENTRY_SIZE, Entry, parse_entry


def test_an_entry_with_derivation_and_outputs_parses() -> None:
    entry = parse_entry(entry_bytes(f"drv {DRV}", f"out {OUT}", f"out {DEV}"), "a.entry", 5.0)
    assert entry == Entry(name="a.entry", drv=DRV, outputs=(OUT, DEV), mtime=5.0)


def test_an_entry_from_nix_2_8_carries_only_the_derivation() -> None:
    entry = parse_entry(entry_bytes(f"drv {DRV}"), "a.entry")
    assert entry.drv == DRV
    assert entry.outputs == ()


def test_outputs_without_derivation_and_repeated_outputs_are_accepted() -> None:
    entry = parse_entry(entry_bytes(f"out {OUT}", f"out {OUT}"), "a.entry")
    assert entry.drv is None
    assert entry.outputs == (OUT,)


def test_format_1_entries_of_older_hooks_are_still_read() -> None:
    entry = parse_entry(v1_entry_bytes(f"drv {DRV}", f"out {OUT}", "", ""), "a.entry", 5.0)
    assert entry == Entry(name="a.entry", drv=DRV, outputs=(OUT,), mtime=5.0)
    # Format 1 has no end line: one there is an unknown line.
    with pytest.raises(SpoolError, match="line 3: unknown line 'end'"):
        parse_entry(v1_entry_bytes(f"drv {DRV}", "end"), "a.entry")


COMPLETE = entry_bytes(f"drv {DRV}", f"out {OUT}")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        COMPLETE[:10],
        f"{FORMAT_HEADER}".encode(),
        f"{FORMAT_HEADER}\n".encode(),
        COMPLETE[: -len("end\n")],
        COMPLETE[:-1],
        COMPLETE[: COMPLETE.index(b"out") + 8],
        # Cut inside a character: what a partial write of a non-ASCII path may leave.
        entry_bytes("out /nix/store/caf\u00e9")[: -len("\u00e9\nend\n") + 1],
    ],
    ids=["empty", "part-of-header", "header-unterminated", "header", "no-end", "end-unterminated",
         "mid-line", "mid-character"],
)  # fmt: skip
def test_a_format_2_entry_without_its_end_line_is_still_being_written(data: bytes) -> None:
    assert COMPLETE.startswith(data) or b"caf" in data
    with pytest.raises(IncompleteEntryError, match=r"spool entry 'a\.entry': no 'end' line yet"):
        parse_entry(data, "a.entry")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"hello world\n", "does not start with"),
        (b"\x00\x01\x02\x03 binary", "does not start with"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8"),
        (FORMAT_HEADER.encode() + b"\ndrv /nix/store/\xff\xfe.drv\nend\n", "not UTF-8"),
        (b"nix-cache-uploader-spool 3\n" + f"drv {DRV}\nend\n".encode(), "unsupported format"),
        (b"nix-cache-uploader\n", "does not start with"),
        (entry_bytes(f"drv {DRV}") + f"out {OUT}\n".encode(), "line 4: text after the 'end'"),
        (entry_bytes(f"drv {DRV}") + b"end\n", "line 4: text after the 'end'"),
        (entry_bytes(f"drv {DRV}", "end"), "line 4: text after the 'end'"),
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


def test_an_entry_of_exactly_the_limit_is_read_and_one_byte_more_is_not() -> None:
    """An entry filled up to the byte with output lines (56 bytes each)."""
    lines: list[str] = []
    while len(entry_bytes(*lines, f"out /nix/store/{HASH}-out{len(lines):04}")) <= MAX_ENTRY_SIZE:
        lines.append(f"out /nix/store/{HASH}-out{len(lines):04}")
    pad = MAX_ENTRY_SIZE - len(entry_bytes(*lines))
    assert 0 <= pad < 150, "the last name takes the padding (a name may have 211 bytes)"
    lines[-1] += "x" * pad
    data = entry_bytes(*lines)
    assert len(data) == MAX_ENTRY_SIZE
    assert len(parse_entry(data, "a.entry").outputs) == len(lines)
    lines[-1] += "x"
    with pytest.raises(SpoolError, match="larger than the limit"):
        parse_entry(entry_bytes(*lines), "a.entry")
