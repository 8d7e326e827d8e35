"""The Nix files: each parses, and the NixOS module keeps what the deployment
promises (hardening, key handling, the same defaults as the code).

CI has no nixpkgs, so the module cannot be evaluated or its VM test run here
(nixos-module/README.md says how); these checks catch what they can without.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.requirements import require_binary
from uploader.config import DEFAULT_GC_ROOTS, DEFAULT_STATE_DIR, Settings
from uploader.spool import DEFAULT_SPOOL

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "nixos-module" / "module.nix"
HOOK = REPO / "hook" / "post-build-hook"
QUICKSTART = REPO / "docs" / "quickstart.md"
NIX_FILES = sorted(
    p
    for p in REPO.rglob("*.nix")
    if not any(part.startswith(".") for part in p.relative_to(REPO).parts)
)

# What the deployment issue asks of the service, with the value where one
# value is the point.
HARDENING = {
    "NoNewPrivileges": "true",
    "ProtectSystem": '"strict"',
    "ProtectHome": "true",
    "PrivateTmp": "true",
    "PrivateDevices": "true",
    "CapabilityBoundingSet": '""',
    "AmbientCapabilities": '""',
    "ProtectKernelTunables": "true",
    "ProtectKernelModules": "true",
    "ProtectKernelLogs": "true",
    "ProtectControlGroups": "true",
    "RestrictNamespaces": "true",
    "RestrictRealtime": "true",
    "LockPersonality": "true",
    "MemoryDenyWriteExecute": "true",
    "Nice": "19",
    "CPUWeight": "20",
    "IOSchedulingClass": '"idle"',
    "Restart": '"on-failure"',
    "KillSignal": '"SIGTERM"',
    "SystemCallFilter": None,
    "RestrictAddressFamilies": None,
    "ReadWritePaths": None,
    "RestartSec": None,
    "TimeoutStopSec": None,
    "LoadCredential": None,
    "User": None,
    "Group": None,
    "StateDirectory": None,
    "EnvironmentFile": None,
}
# In the quick start's unit but not a directive of the module, which sets
# the environment through `environment` and `path` instead.
UNIT_ONLY = {"Environment"}


def module_text() -> str:
    return MODULE.read_text()


def module_directives() -> set[str]:
    """Capitalised attribute names in module.nix: its systemd directives
    (its own options and locals are lower-case; HOME, all capitals, is an
    environment variable)."""
    return set(re.findall(r"^\s+([A-Z][A-Za-z]*[a-z][A-Za-z]*) =", module_text(), re.M))


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


@pytest.mark.parametrize("directive", sorted(HARDENING))
def test_module_sets_each_hardening_directive(directive: str) -> None:
    values = re.findall(rf"^\s+{directive} = (.*?);?$", module_text(), re.M)
    assert values, f"module.nix does not set {directive}"
    if HARDENING[directive] is not None:
        assert values == [HARDENING[directive]]


def test_module_filters_system_calls_and_address_families() -> None:
    text = module_text()
    assert re.search(r'SystemCallFilter = \[\s*"@system-service"\s*"~@privileged"\s*\];', text)
    families = re.search(r"RestrictAddressFamilies = \[(.*?)\];", text, re.S)
    assert families is not None
    assert re.findall(r'"(AF_\w+)"', families.group(1)) == ["AF_UNIX", "AF_INET", "AF_INET6"]


def test_module_passes_the_key_as_a_credential_and_refuses_store_paths() -> None:
    text = module_text()
    assert '"--secret-key-file %d/secret-key"' in text
    assert 'LoadCredential = "secret-key:${toString cfg.secretKeyFile}";' in text
    assert "inStore = path: lib.hasPrefix builtins.storeDir (toString path);" in text
    assert "!inStore cfg.secretKeyFile" in text
    assert "with lib;" not in text


def test_module_gives_the_drain_its_time() -> None:
    (default,) = re.findall(r"drain-timeout or (\d+(?:\.\d+)?);", module_text())
    assert float(default) == Settings.drain_timeout
    assert "TimeoutStopSec = builtins.ceil drainTimeout + 30;" in module_text()


def test_module_has_the_same_defaults_as_the_code_and_the_hook() -> None:
    text = module_text()

    def local(name: str) -> str:
        (value,) = re.findall(rf'^\s+{name} = "([^"]*)";', text, re.M)
        return value

    (hook_default,) = re.findall(r"\$\{NIX_CACHE_UPLOADER_SPOOL:-([^}]*)\}", HOOK.read_text())
    assert local("defaultSpool") == DEFAULT_SPOOL == hook_default
    assert local("defaultStateDir") == DEFAULT_STATE_DIR
    assert local("defaultGcRootsDir") == DEFAULT_GC_ROOTS
    assert 'StateDirectory = "nix-cache-uploader";' in text
    assert DEFAULT_STATE_DIR == "/var/lib/nix-cache-uploader"


def test_module_and_quickstart_unit_set_the_same_directives() -> None:
    (unit,) = re.findall(r"^```ini\n(.*?)^```", QUICKSTART.read_text(), re.M | re.S)
    service = unit.split("[Service]", 1)[1].split("[Install]", 1)[0]
    in_unit = set(re.findall(r"^([A-Za-z]+)=", service, re.M))
    assert module_directives() == in_unit - UNIT_ONLY
