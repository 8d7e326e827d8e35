"""What the fleet's docs tell NixOS users matches the module (nixos-module/module.nix)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = (REPO / "nixos-module" / "module.nix").read_text()


def test_the_module_has_an_attest_key_option_and_refuses_the_setting() -> None:
    assert re.search(r"^\s*attestKeyFile = lib\.mkOption", MODULE, re.MULTILINE)
    assert "assertion = !(cfg.settings ? attest-key-file);" in MODULE


@pytest.mark.parametrize("doc", ["fleet.md", "configuration.md"])
def test_the_docs_send_nixos_builders_to_the_option_not_to_settings(doc: str) -> None:
    text = " ".join((REPO / "docs" / doc).read_text().split())
    assert "attestKeyFile" in text
    for sentence in re.split(r"(?<=[.;:])\s", text):
        if "NixOS" in sentence and "attest" in sentence:
            assert "through `settings`" not in sentence, sentence
            assert "module's `settings`" not in sentence, sentence
            assert "still to come" not in sentence, sentence
