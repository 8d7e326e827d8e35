"""GC roots: one symlink per path, skipping what needs none any more."""

from __future__ import annotations

import os
from pathlib import Path

from uploader.gcroots import GcRoots

PATHS = [f"/nix/store/{c * 32}-p" for c in "abcdfg"]


def test_skip_is_asked_before_each_path_and_may_change_meanwhile(tmp_path: Path) -> None:
    roots = GcRoots(str(tmp_path))
    found: set[str] = {PATHS[0]}
    asked: list[str] = []

    def skip(path: str) -> bool:
        asked.append(path)
        if path == PATHS[2]:
            found.update(PATHS[3:5])  # the cache answered while rooting
        return path in found

    roots.add(PATHS, skip=skip)

    assert asked == PATHS
    assert roots.current() == {PATHS[1], PATHS[2], PATHS[5]}
    assert all(os.readlink(tmp_path / os.path.basename(p)) == p for p in roots.current())
    roots.remove(PATHS)  # skipped ones were never made: no error
    assert roots.current() == set()
