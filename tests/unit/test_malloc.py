"""The allocator's settings, made through libc's mallopt at every start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from uploader import malloc


def test_the_arena_cap_is_set_without_running_a_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """libc is found among the symbols already loaded: finding it by name
    ran `ldconfig -p` at the start of every command."""

    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a child process was started: {args}")

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr(subprocess, "Popen", no_child)
    assert malloc.limit_arenas() is True


def test_a_cap_from_the_environment_is_left_alone() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from uploader.malloc import limit_arenas; print(limit_arenas())"],
        env={"MALLOC_ARENA_MAX": "4", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "False"
