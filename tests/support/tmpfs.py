"""A small tmpfs to fill: a full disk, for real (root and mount(8))."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        # Only this case is skipped, and only because it needs a file system
        # we can fill or freeze; CI runs as root, where mounting works.
        pytest.skip(f"cannot mount a small tmpfs to fill: {done.stderr.strip()}")


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """``path``, a tmpfs of ``size`` (as mount takes it) until the block ends."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs to fill needs root and mount(8)")
    mount_tmpfs(path, f"size={size}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
