"""The daemon's local memory, kept in its state directory.

``state.sqlite`` remembers which narinfos the cache holds (so a re-enqueued
closure costs no request) and what upstream caches answered.  It and its
``-wal`` and ``-shm`` files are the uploader's alone (0600): a user who can
open SQLite's files can lock them and stall every write.  It is only a
memory: when it cannot be used, the daemon asks the cache instead.
``status.json`` is the daemon's public face for `status` and `wait`, which may
run as users who cannot read the spool: queue depth, in-flight work,
failures; never anything secret.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from uploader._exceptions import ConfigError
from uploader.redact import scrub

__all__ = [
    "STATE_REOPEN_EVERY",
    "KnownCache",
    "entries_per_status",
    "read_status",
    "snapshot_settled",
    "spool_snapshot",
    "status_touched_at",
    "touch_status",
    "write_status",
]

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
# SQLite's own files beside the database; it creates them with the
# database's mode.
_SIDE_FILES = ("", "-wal", "-shm", "-journal")
# How long a write waits for a lock: only this process uses the database,
# so a lock held longer is someone else's and not worth waiting for.
_BUSY_TIMEOUT = 0.5
# A database that keeps failing is reported at most this often.
_REPORT_EVERY = 300.0
# One that could not be opened is tried again this often.
STATE_REOPEN_EVERY = 30.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS known (
    target TEXT NOT NULL, hash TEXT NOT NULL, seen REAL NOT NULL,
    PRIMARY KEY (target, hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS upstream (
    url TEXT NOT NULL, hash TEXT NOT NULL, present INTEGER NOT NULL, checked REAL NOT NULL,
    PRIMARY KEY (url, hash)
) WITHOUT ROWID;
"""
# A miss at an upstream cache is asked again after this long (Nix's own
# negative narinfo TTL); a hit is kept like the cache's own entries.
_UPSTREAM_MISS_TTL = 3600.0


class KnownCache:
    """Which narinfos a target (and upstreams) hold, as last seen; thread-safe."""

    def __init__(
        self, path: str, target: str, *, ttl: float = 7 * 86400.0, must_open: bool = True
    ) -> None:
        """Open (or create) the database at ``path``; raise ConfigError when it
        cannot be used, unless ``must_open`` is false: it is then opened
        again on use, every ``STATE_REOPEN_EVERY`` seconds, and ``problem`` says
        why it is not yet (a full disk stops nothing, and once there is room
        the memory works again without a restart)."""
        self.path = path
        self.target = target
        self.ttl = ttl
        self._lock = threading.Lock()
        self._reported = -_REPORT_EVERY
        self.problem: str | None = None
        self._db: sqlite3.Connection | _Unopened
        try:
            self._db = self._open()
        except ConfigError as e:
            if must_open:
                raise
            self.problem = str(e)
            self._db = _Unopened(time.monotonic() + STATE_REOPEN_EVERY)

    def _open(self) -> sqlite3.Connection:
        db = None
        try:
            _make_private(self.path)
            db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=_BUSY_TIMEOUT
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            return db
        except (OSError, sqlite3.Error) as e:
            if db is not None:
                db.close()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(
                f"cannot use the state database {self.path} ({reason}): it and its -wal and "
                "-shm files must belong to the user the daemon runs as, on a disk with "
                "room; deleting them is safe (it is only a memory of what the cache holds)"
            ) from e

    def _reopened(self) -> None:
        """Open the database that could not be opened, when it is time to try."""
        if not isinstance(self._db, _Unopened) or time.monotonic() < self._db.retry_at:
            return
        try:
            self._db = self._open()
        except ConfigError:
            self._db = _Unopened(time.monotonic() + STATE_REOPEN_EVERY)
            return
        self.problem = None
        log.warning("the state database %s can be used again", self.path)

    @contextlib.contextmanager
    def _using(self, what: str) -> Iterator[None]:
        """Hold the lock; a database error is logged (now and then) and
        swallowed: what is not remembered is asked of the cache again."""
        with self._lock:
            self._reopened()
            try:
                yield
            except _NotOpen:
                pass  # said when it could not be opened
            except sqlite3.Error as e:
                now = time.monotonic()
                if now - self._reported >= _REPORT_EVERY:
                    self._reported = now
                    log.warning(
                        "the state database %s cannot %s (%s): going on without it, "
                        "asking the cache instead; if it is locked, look for another "
                        "process holding it open (`fuser %s*`)",
                        self.path, what, e, self.path,
                    )  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def known(self, hash_parts: Iterable[str]) -> set[str]:
        wanted = list(hash_parts)
        found: set[str] = set()
        cutoff = time.time() - self.ttl
        with self._using("be read"):
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT hash FROM known WHERE target = ? AND seen > ? AND hash IN ({marks})",
                    (self.target, cutoff, *chunk),
                )
                found.update(r[0] for r in rows)
        return found

    def remember(self, hash_parts: Iterable[str]) -> None:
        now = time.time()
        rows = [(self.target, h, now) for h in hash_parts]
        with self._using("be written"):
            self._db.executemany("INSERT OR REPLACE INTO known VALUES (?, ?, ?)", rows)

    def forget(self, hash_parts: Iterable[str]) -> None:
        """Drop what is remembered of these narinfos (gc deleted them)."""
        rows = [(self.target, h) for h in hash_parts]
        with self._using("be written"):
            self._db.executemany("DELETE FROM known WHERE target = ? AND hash = ?", rows)

    def upstream_answers(self, url: str, hash_parts: Iterable[str]) -> dict[str, bool]:
        """Cached answers of upstream ``url`` that are still fresh."""
        wanted = list(hash_parts)
        now = time.time()
        answers: dict[str, bool] = {}
        with self._using("be read"):
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT hash, present, checked FROM upstream WHERE url = ? "
                    f"AND hash IN ({marks})",
                    (url, *chunk),
                )
                for h, present, checked in rows:
                    ttl = self.ttl if present else _UPSTREAM_MISS_TTL
                    if checked > now - ttl:
                        answers[h] = bool(present)
        return answers

    def remember_upstream(self, url: str, answers: dict[str, bool]) -> None:
        now = time.time()
        rows = [(url, h, int(p), now) for h, p in answers.items()]
        with self._using("be written"):
            self._db.executemany("INSERT OR REPLACE INTO upstream VALUES (?, ?, ?, ?)", rows)


class _NotOpen(sqlite3.Error):
    pass


class _Unopened:
    """Where the connection would be: every query fails until it is opened."""

    def __init__(self, retry_at: float) -> None:
        self.retry_at = retry_at

    def execute(self, *args: object) -> sqlite3.Cursor:
        raise _NotOpen("not open")

    def executemany(self, *args: object) -> sqlite3.Cursor:
        raise _NotOpen("not open")

    def close(self) -> None:
        pass


def _make_private(path: str) -> None:
    """Create the database 0600, and take group and world access from one
    an older version left 0644 (SQLite gives its side files the same mode)."""
    for suffix in _SIDE_FILES:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if not suffix else 0)
        try:
            fd = os.open(path + suffix, flags, 0o600)
        except FileNotFoundError:
            continue
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def write_status(state_dir: str, status: dict[str, Any]) -> None:
    """Replace status.json atomically, world-readable: scrubbed, since its
    error texts come from S3 clients that may quote a signed URL."""
    text = scrub(json.dumps(status, indent=1, sort_keys=True))
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".status-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(state_dir, STATUS_FILE))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def touch_status(state_dir: str) -> None:
    """Mark status.json as still being kept, without rewriting it: on a full
    disk a new status cannot be written, but an existing file's times can
    be set, so `status` can tell a daemon that cannot write from one that
    hangs."""
    os.utime(os.path.join(state_dir, STATUS_FILE))


def status_touched_at(state_dir: str) -> float | None:
    """When status.json was last written or touched."""
    try:
        return os.stat(os.path.join(state_dir, STATUS_FILE)).st_mtime
    except OSError:
        return None


def read_status(state_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(state_dir, STATUS_FILE)) as f:
            data: dict[str, Any] = json.load(f)
            return data
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# The spool's last change must be this much older than the daemon's look at
# it: a directory's mtime has the kernel's coarse clock (a few ms), so an
# entry made in the same tick as an earlier change could leave it unchanged.
_SETTLED = 0.05


def spool_snapshot(spool: str, entries: Callable[[], int]) -> dict[str, Any]:
    """What the daemon saw of the spool directory, for users who may not
    list it (`wait` and `status` in a CI job): its mtime, then how many
    entries it held, and when."""
    try:
        mtime = os.stat(spool).st_mtime_ns
        checked = time.time()
        count = entries()
    except OSError:
        return {}
    return {"spool_mtime_ns": mtime, "spool_checked_at": checked, "spool_entries": count}


def snapshot_settled(snapshot: Mapping[str, Any]) -> bool:
    """Whether a later change of the spool is sure to change its mtime."""
    mtime, checked = snapshot.get("spool_mtime_ns"), snapshot.get("spool_checked_at")
    if not isinstance(mtime, int) or not isinstance(checked, int | float):
        return False
    return checked - mtime / 1e9 >= _SETTLED


def entries_per_status(report: Mapping[str, Any], spool: str) -> int | None:
    """The entries in ``spool`` as the daemon last counted them, when the
    directory has not changed since (no entry came or went); else None."""
    count = report.get("spool_entries")
    if not isinstance(count, int) or not snapshot_settled(report):
        return None
    try:
        now = os.stat(spool).st_mtime_ns
    except OSError:
        return None
    return count if now == report.get("spool_mtime_ns") else None
