"""Evaluating the NixOS module with the real Nix and nixpkgs' lib.

``evaluate({"enable": True, ...})`` runs ``lib.evalModules`` on
nixos-module/module.nix with the stand-ins of tests/support/nixos-module.nix
and returns what a Nix expression over ``config`` selects, as JSON.  Failed
assertions and evaluation errors (a wrong type, a conflict) raise, as they
stop a NixOS build.

nixpkgs' lib is found at ``$NIXPKGS_LIB`` (the nixpkgs checkout, or its
``lib`` directory), else at ``../shared/nixpkgs-lib`` beside the checkout.
Without it the tests skip, or fail when ``CI=true``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.requirements import require_binary

__all__ = ["EvalError", "Evaluation", "evaluate", "nixpkgs_lib"]

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests" / "support" / "nixos-module.nix"
SERVICE = "config.systemd.services.nix-cache-uploader"


class EvalError(Exception):
    """The module does not evaluate: what NixOS would print, in ``message``."""

    def __init__(self, message: str, failed_assertions: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.failed_assertions = list(failed_assertions)


@dataclass(frozen=True)
class Evaluation:
    value: Any
    warnings: list[str]


def nixpkgs_lib() -> Path:
    """The directory of nixpkgs' lib (its default.nix); skip or fail without it."""
    given = os.environ.get("NIXPKGS_LIB")
    # Beside the checkout, as in the workplace this project is built in
    # (a `shared/nixpkgs-lib` next to it or next to a directory above it).
    candidates = [Path(given)] if given else [d / "shared" / "nixpkgs-lib" for d in REPO.parents]
    for root in candidates:
        for lib in (root, root / "lib"):
            if (lib / "default.nix").is_file() and (lib / "modules.nix").is_file():
                return lib.resolve()
    message = (
        f"nixpkgs' lib is not at {candidates[0]} (nor in a shared/ above it): set "
        "NIXPKGS_LIB to a nixpkgs checkout (or its lib directory) to evaluate the NixOS module"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _nix_string(text: str) -> str:
    return json.dumps(text).replace("${", "\\${")


def evaluate(
    settings: Mapping[str, Any],
    *,
    select: str = SERVICE,
    modules: Sequence[str] = (),
    without_types: Sequence[str] = (),
) -> Evaluation:
    """Evaluate the module with ``services.nix-cache-uploader = settings``
    (JSON values) plus ``modules`` (Nix expressions, for what JSON cannot
    say: paths, mkForce, other options); return what ``select`` (a Nix
    expression over ``config`` and ``lib``) evaluates to.  ``without_types``:
    option types to take out of lib, as older nixpkgs lack them."""
    nix_instantiate = require_binary("nix-instantiate")
    removed = " ".join(_nix_string(t) for t in without_types)
    expr = f"""
      {{ settings }}:
      let
        nixpkgsLib = import {_nix_string(str(nixpkgs_lib()))};
        lib = nixpkgsLib // {{ types = removeAttrs nixpkgsLib.types [ {removed} ]; }};
        result = import {_nix_string(str(HARNESS))} {{
          inherit lib;
          modules = [
            {{ services.nix-cache-uploader = builtins.fromJSON settings; }}
            {" ".join(f"({m})" for m in modules)}
          ];
        }};
        inherit (result) config;
      in
      {{
        inherit (result) failedAssertions warnings;
        value = if result.failedAssertions == [ ] then {select} else null;
      }}
    """
    env = dict(os.environ)
    env.pop("NIX_PATH", None)  # <nixpkgs> must not leak in
    # Pure evaluation: no store writes, no daemon, no network.
    env["NIX_CONFIG"] = "substituters =\n"
    cmd = [nix_instantiate, "--eval", "--strict", "--json", "--expr", expr,
           "--argstr", "settings", json.dumps(settings)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise EvalError(out.stderr)
    result = json.loads(out.stdout)
    if result["failedAssertions"]:
        failed = result["failedAssertions"]
        raise EvalError("Failed assertions:\n" + "\n".join(failed), failed)
    return Evaluation(result["value"], result["warnings"])
