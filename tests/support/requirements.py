"""External programs the tests need: skip without them locally, fail in CI.

A test that silently skips in CI proves nothing, so when ``CI=true`` a
missing program is a failure that says how to install it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import uuid
from typing import NoReturn

import pytest

__all__ = ["add_path_with_references", "require_binary", "require_module", "run_nix"]


def require_binary(name: str) -> str:
    """Return the path of program ``name``, or skip (locally) / fail (CI) without it."""
    path = shutil.which(name)
    if path is not None:
        return path
    _missing(f"{name} is not installed; run scripts/bootstrap to install it")


def require_module(name: str) -> None:
    """Skip (locally) or fail (CI) unless Python module ``name`` can be imported."""
    if importlib.util.find_spec(name) is not None:
        return
    _missing(f"Python module {name} is not installed; run scripts/bootstrap to install it")


def _missing(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def run_nix(program: str, *args: str) -> str:
    """Run a Nix program on the local store directly (no daemon), offline; return stdout.

    Needs write access to the store (root), as the unit tests' Nix oracles do.
    """
    env = dict(os.environ)
    env.pop("NIX_REMOTE", None)
    env["NIX_CONFIG"] = "experimental-features = nix-command\nsubstituters =\n"
    cmd = [require_binary(program), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}", pytrace=False)
    return out.stdout


def add_path_with_references() -> str:
    """Add a fresh text path referencing two other fresh ones; return its store path."""
    salt = uuid.uuid4().hex[:12]
    expr = f"""
      let b = builtins.toFile "b-{salt}" "b";
          a = builtins.toFile "a-{salt}" "a";
      in builtins.toFile "top-{salt}" "${{a}} ${{b}}"
    """
    out = run_nix("nix-instantiate", "--eval", "--read-write-mode", "--json", "--expr", expr)
    path: str = json.loads(out)
    return path
