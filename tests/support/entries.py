"""Spool entries for tests: well-formed store paths and entry bytes."""

from __future__ import annotations

from pathlib import Path

from uploader.spoolentry import END_LINE, FORMAT_HEADER, FORMAT_V1_HEADER

HASH = "gxs9hr309n6jrgv3dzmbklh6rcf9iw7v"
DRV = f"/nix/store/{HASH}-hello-2.12.1.drv"
OUT = f"/nix/store/{HASH}-hello-2.12.1"
DEV = f"/nix/store/{HASH}-hello-2.12.1-dev"


def entry_bytes(*lines: str) -> bytes:
    """A complete entry in the format the hook writes, with these lines."""
    return "".join(line + "\n" for line in (FORMAT_HEADER, *lines, END_LINE)).encode()


def v1_entry_bytes(*lines: str) -> bytes:
    """An entry in format 1, as hooks before format 2 wrote them."""
    return "".join(line + "\n" for line in (FORMAT_V1_HEADER, *lines)).encode()


def write_entry(path: Path, data: bytes) -> None:
    """Write an entry the way the hook does: in place, under its final name."""
    with open(path, "xb") as f:
        f.write(data)


def rename_entry(path: Path, data: bytes) -> None:
    """Write an entry the way hooks before format 2 did: a temp file, then a rename."""
    tmp = path.with_name(f".tmp-test-{path.name}")
    tmp.write_bytes(data)
    tmp.rename(path)
