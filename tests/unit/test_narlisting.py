"""NAR listings (uploader/narlisting.py): the `<hash>.ls` JSON read off a NAR
as it streams past, as Nix writes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from uploader._exceptions import NarError
from uploader.nar import dump
from uploader.narlisting import NarListing


def listing(root: Path) -> dict[str, Any]:
    nar = NarListing()
    for chunk in dump(str(root)):
        nar.feed(chunk)
    result: dict[str, Any] = json.loads(nar.json())
    return result


def test_listing_marks_only_executables_and_points_at_the_contents(tmp_path: Path) -> None:
    """Broken, `nix store ls` and `nix store cat` on the cache would show
    every file as non-executable, or executable, or read the wrong bytes."""
    root = tmp_path / "tree"
    root.mkdir()
    (root / "bin").write_bytes(b"#!/bin/sh\n")
    (root / "bin").chmod(0o755)
    (root / "data").write_bytes(b"hello")
    nar = b"".join(dump(str(root)))
    entries = listing(root)["root"]["entries"]
    assert entries["data"] == {"type": "regular", "size": 5, "narOffset": nar.index(b"hello")}
    assert entries["bin"]["executable"] is True
    offset = entries["bin"]["narOffset"]
    assert nar[offset : offset + 10] == b"#!/bin/sh\n"


def test_listing_refuses_bytes_after_the_root_node(tmp_path: Path) -> None:
    """Broken, a NAR with trailing bytes would get a listing that does not
    describe exactly the bytes that were hashed and uploaded."""
    (tmp_path / "f").write_bytes(b"x")
    nar = NarListing()
    with pytest.raises(NarError, match="goes on after its root node"):
        nar.feed(b"".join(dump(str(tmp_path / "f"))) + b"\0" * 8)
