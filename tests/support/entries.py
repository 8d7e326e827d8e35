"""Spool entries for tests: well-formed store paths and entry bytes."""

from __future__ import annotations

from uploader.spoolentry import FORMAT_HEADER

HASH = "gxs9hr309n6jrgv3dzmbklh6rcf9iw7v"
DRV = f"/nix/store/{HASH}-hello-2.12.1.drv"
OUT = f"/nix/store/{HASH}-hello-2.12.1"
DEV = f"/nix/store/{HASH}-hello-2.12.1-dev"


def entry_bytes(*lines: str) -> bytes:
    """An entry in the format the hook writes, with these lines."""
    return "".join(line + "\n" for line in (FORMAT_HEADER, *lines)).encode()
