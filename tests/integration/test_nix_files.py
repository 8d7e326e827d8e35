"""The Nix files parse.  What the NixOS module sets is tested by evaluating
it (test_nixos_module.py); its VM test needs nixpkgs and KVM
(nixos-module/README.md says how)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.requirements import require_binary

REPO = Path(__file__).resolve().parents[2]
NIX_FILES = sorted(
    p
    for p in REPO.rglob("*.nix")
    if not any(part.startswith(".") for part in p.relative_to(REPO).parts)
)


def test_the_repository_has_the_nix_files() -> None:
    names = {str(p.relative_to(REPO)) for p in NIX_FILES}
    assert {"nixos-module/module.nix", "nixos-module/package.nix", "nixos-module/test.nix"} <= names


@pytest.mark.integration
@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_nix_file_parses(path: Path) -> None:
    """`nix-instantiate --parse` also rejects undefined variables (no `with`)."""
    nix_instantiate = require_binary("nix-instantiate")
    out = subprocess.run([nix_instantiate, "--parse", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_nix_files_name_lib_functions_in_full(path: Path) -> None:
    assert "with lib;" not in path.read_text()
