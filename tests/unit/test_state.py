"""The daemon's memory (state.sqlite): private to the uploader, and never a
reason for an upload to fail."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tmpfs import small_tmpfs
from uploader._exceptions import ConfigError
from uploader.state import KnownCache

# Holds SQLite's WAL write lock (byte 120 of the -shm file) as another
# process would, through a read-only descriptor, until its stdin closes.
_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 120)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask a service usually has: files 0644 unless made otherwise."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(db: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in db.parent.iterdir()}


def test_the_database_and_its_side_files_are_the_uploaders_alone(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    known = KnownCache(str(db), "t")
    known.remember(["a" * 32])
    known.remember_upstream("https://up", {"b" * 32: True})
    modes = _modes(db)
    assert set(modes) >= {"state.sqlite", "state.sqlite-wal", "state.sqlite-shm"}
    assert set(modes.values()) == {0o600}, modes
    known.close()


def test_an_older_world_readable_database_is_made_private(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    old = KnownCache(str(db), "t")
    old.remember(["a" * 32])
    for p in tmp_path.iterdir():
        p.chmod(0o644)  # as versions before 0600 left them
    new = KnownCache(str(db), "t")  # the daemon restarted (the old one still open)
    assert set(_modes(db).values()) == {0o600}, _modes(db)
    assert new.known(["a" * 32]) == {"a" * 32}
    old.close()
    new.close()


def test_a_group_readable_database_is_made_private(tmp_path: Path) -> None:
    """Group access is removed too, not only others'.  Broken, a member of
    the uploader's group can lock the database and stall the daemon's
    writes, the reason the files are 0600."""
    db = tmp_path / "state.sqlite"
    db.touch()
    db.chmod(0o640)
    KnownCache(str(db), "t").close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_the_memory_of_the_cache_expires_after_known_ttl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the cache was seen to have is trusted for known-ttl only.
    Broken, a narinfo removed by hand or by another tool is never uploaded
    again by this daemon."""
    known = KnownCache(str(tmp_path / "state.sqlite"), "t", ttl=10)
    known.remember(["h" * 32])
    assert known.known(["h" * 32]) == {"h" * 32}
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 11)
    assert known.known(["h" * 32]) == set()
    known.close()


def test_upstream_misses_are_asked_again_after_an_hour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream cache that lacked a path is asked again after an hour,
    while its hits are trusted for known-ttl.  Broken, a path the upstream
    gets later is still uploaded here for days."""
    known = KnownCache(str(tmp_path / "state.sqlite"), "t")
    known.remember_upstream("https://up", {"h" * 32: False, "i" * 32: True})
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 3601)
    assert known.upstream_answers("https://up", ["h" * 32, "i" * 32]) == {"i" * 32: True}
    known.close()


def test_a_lock_someone_else_holds_costs_requests_not_uploads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "state.sqlite"
    known = KnownCache(str(db), "t")
    known.remember(["a" * 32])
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, f"{db}-shm"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with caplog.at_level(logging.WARNING, logger="uploader.state"):
            known.remember(["b" * 32])  # no exception: the upload goes on
            known.remember(["c" * 32])
            known.forget(["a" * 32])
            known.remember_upstream("https://up", {"d" * 32: False})
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings  # reported once, not per call
        assert "state.sqlite cannot be written (database is locked)" in warnings[0]
        assert "fuser" in warnings[0]
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    # Once the lock is gone, the memory works again.
    known.remember(["e" * 32])
    assert known.known(["a" * 32, "b" * 32, "e" * 32]) == {"a" * 32, "e" * 32}
    known.close()


def test_a_database_this_user_cannot_open_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    db.mkdir()  # as unusable as another user's file, also to root
    with pytest.raises(ConfigError, match=r"cannot use the state database .*state.sqlite \("):
        KnownCache(str(db), "t")


def test_a_database_that_cannot_be_opened_on_a_full_disk_is_opened_once_there_is_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon started on a full disk runs without its memory, and gets it
    back once there is room, without a restart."""
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        with open(disk / "filler", "wb") as f, pytest.raises(OSError, match="No space"):
            f.write(b"\0" * (1 << 20))
        known = KnownCache(str(disk / "state.sqlite"), "t", must_open=False)
        assert known.problem is not None
        assert "cannot use the state database" in known.problem
        assert "(database or disk is full)" in known.problem
        with caplog.at_level(logging.WARNING, logger="uploader.state"):
            known.remember(["a" * 32])  # nothing to remember it in: no error either
            assert known.known(["a" * 32]) == set()
            (disk / "filler").unlink()
            # Not tried again before its time...
            known.remember(["b" * 32])
            assert known.known(["b" * 32]) == set()
            assert caplog.text == ""
            # ...and then used again.
            monkeypatch.setattr("uploader.state.time.monotonic", lambda: 1e12)
            known.remember(["c" * 32])
            assert known.known(["a" * 32, "c" * 32]) == {"c" * 32}
        assert known.problem is None
        assert caplog.text.count("can be used again") == 1
        assert stat.S_IMODE((disk / "state.sqlite").stat().st_mode) == 0o600
        known.close()


def test_a_database_that_need_not_open_answers_nothing_instead_of_failing(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    db.mkdir()
    known = KnownCache(str(db), "t", must_open=False)
    assert known.problem is not None and "cannot use the state database" in known.problem
    known.remember(["a" * 32])
    assert known.known(["a" * 32]) == set()
    known.close()
