"""One `gc --delete` at a time per bucket: a lock object with an expiry.

A gc writes ``lifecycle/v1/locks/TIME-RANDOM.json`` and lists the locks; if
any other lock has not expired, it removes its own and refuses, naming the
other.  (Two started at the same moment may both refuse; neither runs on
the word of a clock.)  It rewrites its lock every 30 seconds from a thread;
a lock expires two minutes after its last refresh, so a gc that crashed
blocks the next for at most that long, and a gc that could not refresh
stops before it deletes anything more.  Uploaders read the locks too: an
uploader relying on a gc candidate waits for the gcs it saw to finish.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from uploader._exceptions import UploaderError
from uploader.lifecycle.layout import JSON_TYPE, LOCKS, decode, encode, listing, timed_key
from uploader.targets import Target

__all__ = ["EXPIRY", "REFRESH", "GcLock", "LockHeld", "LockInfo", "held_locks", "wait_for"]

log = logging.getLogger(__name__)

EXPIRY = 120.0
REFRESH = 30.0
# Deleting stops this long before the lock would expire unrefreshed.
_MARGIN = 30.0
_POLL = 1.0


class LockHeld(UploaderError):
    """Another gc holds the bucket's lock."""


@dataclass(frozen=True)
class LockInfo:
    key: str
    host: str
    pid: int
    started: float
    expires: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"{self.host} pid {self.pid}, since {since} ({self.key})"


def _read(target: Target, key: str, listed: float) -> LockInfo | None:
    data = target.get(key)
    if data is None:
        return None
    try:
        r = decode(data, key)
        return LockInfo(
            key, str(r["host"]), int(r["pid"]), float(r["started"]), float(r["expires"])
        )
    except (UploaderError, KeyError, TypeError, ValueError):
        # Unreadable: held as long as a lock written when it was last modified.
        return LockInfo(key, "?", 0, listed, listed + EXPIRY)


def held_locks(target: Target, now: float | None = None) -> list[LockInfo]:
    """The locks that have not expired, oldest first."""
    now = time.time() if now is None else now
    locks = (_read(target, key, mtime) for key, mtime in listing(target, LOCKS))
    return sorted((lock for lock in locks if lock and lock.expires > now), key=lambda x: x.key)


def wait_for(target: Target, locks: list[LockInfo]) -> None:
    """Until each of these locks is released or expired (the gcs an
    uploader saw; a gc started later sees the uploader's root)."""
    waiting = {lock.key for lock in locks}
    if waiting:
        log.info("waiting for a running gc to finish: %s", locks[0].describe())
    while waiting:
        held = {lock.key for lock in held_locks(target)}
        waiting &= held
        if waiting:
            time.sleep(_POLL)


class GcLock:
    """This gc's lock: taken, refreshed from a thread, released."""

    def __init__(self, target: Target, *, expiry: float = EXPIRY, refresh: float = REFRESH) -> None:
        self.target = target
        self.expiry = expiry
        self.refresh_every = refresh
        self.started = time.time()
        self.key = timed_key(LOCKS, self.started)
        self._refreshed = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or raise LockHeld naming the gc that has it."""
        self._write()
        others = [lock for lock in held_locks(self.target) if lock.key != self.key]
        if others:
            self.target.delete(self.key)
            raise LockHeld(
                f"another gc is running on this bucket: {others[0].describe()}; "
                f"try again when it has finished (a crashed one's lock expires "
                f"{self.expiry:.0f} s after its last refresh)"
            )
        self._thread = threading.Thread(target=self._refresh_loop, name="gc-lock", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        now = time.time()
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "expires": now + self.expiry,
        }
        self.target.put_bytes(self.key, encode(record), JSON_TYPE)
        self._refreshed = now

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_every):
            try:
                self._write()
            except UploaderError as e:
                log.warning("refreshing the gc lock %s: %s", self.key, e)

    def check(self) -> None:
        """Raise unless the lock is surely still ours for a while: called
        before each deletion, so a gc cut off from the bucket stops."""
        if time.time() > self._refreshed + self.expiry - min(_MARGIN, self.expiry / 4):
            raise UploaderError(
                f"the gc lock {self.key} could not be refreshed in time; "
                "stopping before deleting anything more"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.target.delete(self.key)
        except UploaderError as e:
            log.warning("removing the gc lock %s: %s (it expires by itself)", self.key, e)
