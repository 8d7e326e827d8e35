"""Running the command line from tests the way a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KeyPair", "make_keys", "run_cli"]


def run_cli(
    *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run `nix-cache-uploader ARGS` in a child process; raise on failure if ``check``."""
    proc = subprocess.run(
        [sys.executable, "-m", "uploader", *args],
        capture_output=True, text=True, env=env or dict(os.environ), timeout=timeout,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"nix-cache-uploader {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
        )
    return proc


@dataclass
class KeyPair:
    secret_file: str
    public_file: str
    public: str
    name: str


def make_keys(directory: Path, name: str = "test-cache-1") -> KeyPair:
    sk, pk = directory / f"{name}.secret", directory / f"{name}.public"
    run_cli("keygen", name, str(sk), str(pk))
    return KeyPair(str(sk), str(pk), pk.read_text().strip(), name)
