"""One `gc --delete` at a time per bucket: a lock object with an expiry.

A gc writes ``lifecycle/v1/locks/TIME-RANDOM.json`` and lists the locks; if
any other lock has not expired, it removes its own and refuses, naming the
other.  (Two started at the same moment may both refuse; neither runs on
the word of a clock.)  It rewrites its lock every 30 seconds from a thread;
a lock expires two minutes after its last refresh, so a gc that crashed
blocks the next for at most that long, and a gc that could not refresh
stops before it deletes anything more.  Uploaders read the locks too: an
uploader relying on a gc candidate waits for the gcs it saw to finish.

Expiry is judged by the server's clock, not the machines': a lock's last
refresh is its LastModified, and "now" is the LastModified of an object the
reader has just written itself (its own lock; an uploader's root) plus the
time its own monotonic clock says has passed since (`ServerClock`).  That
never runs ahead of the server, so a machine whose clock is off neither
takes a live gc's lock for expired nor marks narinfos with a time later
than the server's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from uploader._exceptions import UploaderError
from uploader.lifecycle.layout import JSON_TYPE, LOCKS, decode, encode, listing, timed_key
from uploader.progress import utc_time
from uploader.targets import Target

__all__ = [
    "EXPIRY",
    "REFRESH",
    "GcLock",
    "LockHeld",
    "LockInfo",
    "ServerClock",
    "held_locks",
    "server_clock",
    "wait_for",
]

log = logging.getLogger(__name__)

EXPIRY = 120.0
REFRESH = 30.0
# Deleting stops this long before the lock would expire unrefreshed.
_MARGIN = 30.0
_POLL = 1.0
# A clock this far from the server's is worth a word.
_SKEW_WARN = 30.0


class LockHeld(UploaderError):
    """Another gc holds the bucket's lock."""


@dataclass(frozen=True)
class ServerClock:
    """The server's time, from no later than it is: ``at`` is the
    LastModified of an object this process wrote, ``mono`` the monotonic
    time once that write had returned."""

    at: float
    mono: float

    def now(self) -> float:
        return self.at + (time.monotonic() - self.mono)


def server_clock(target: Target, key: str, mono: float) -> ServerClock | None:
    """The clock of the server that holds ``key``, written by this process
    (the write returned at monotonic time ``mono``); None if it is not
    listed (then the local clock has to do)."""
    directory = key.rpartition("/")[0]
    page = target.list_objects(directory + "/" if directory else "", key[:-1])
    for found, _, mtime in page.objects:
        if found == key:
            return ServerClock(mtime, mono)
    return None


@dataclass(frozen=True)
class LockInfo:
    key: str
    host: str
    pid: int
    started: float
    expires: float  # by the writer's clock: what older readers judge by
    refreshed: float  # LastModified: by the server's clock
    expiry: float = EXPIRY  # how long after ``refreshed``, as its writer says

    def held(self, clock: ServerClock | None) -> bool:
        if clock is None:
            return self.expires > time.time()
        return self.refreshed + self.expiry > clock.now()

    def describe(self) -> str:
        since = utc_time(self.started)
        return f"{self.host} pid {self.pid}, since {since} ({self.key})"


def _read(target: Target, key: str, listed: float) -> LockInfo | None:
    data = target.get(key)
    if data is None:
        return None
    try:
        r = decode(data, key)
        return LockInfo(
            key, str(r["host"]), int(r["pid"]), float(r["started"]), float(r["expires"]),
            listed, float(r.get("expiry", EXPIRY)),
        )  # fmt: skip
    except (UploaderError, KeyError, TypeError, ValueError):
        # Unreadable: held as long as a lock written when it was last modified.
        return LockInfo(key, "?", 0, listed, listed + EXPIRY, listed)


def held_locks(target: Target, clock: ServerClock | None = None) -> list[LockInfo]:
    """The locks that have not expired, oldest first: by the server's
    ``clock`` when there is one, else by each lock's word and this
    machine's clock."""
    locks = (_read(target, key, mtime) for key, mtime in listing(target, LOCKS))
    return sorted((lock for lock in locks if lock and lock.held(clock)), key=lambda x: x.key)


def wait_for(target: Target, locks: list[LockInfo], clock: ServerClock | None = None) -> None:
    """Until each of these locks is released or expired (the gcs an
    uploader saw; a gc started later sees the uploader's root)."""
    waiting = {lock.key for lock in locks}
    if waiting:
        log.info("waiting for a running gc to finish: %s", locks[0].describe())
    while waiting:
        held = {lock.key for lock in held_locks(target, clock)}
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
        self._answered = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The server's clock, once the lock is written: the time gc marks
        # and compares with LastModified (see the module's doc).
        self.clock: ServerClock | None = None

    def now(self) -> float:
        """The time by the server's clock (this machine's before acquire)."""
        return time.time() if self.clock is None else self.clock.now()

    def acquire(self) -> None:
        """Take the lock, or raise LockHeld naming the gc that has it."""
        self._write()
        try:
            self._check_alone()
        except BaseException:
            # Not running after all (another gc, or the bucket failed us):
            # a lock left behind would refuse the next gc for two minutes.
            with contextlib.suppress(UploaderError):
                self.target.delete(self.key)
            raise
        self._thread = threading.Thread(target=self._refresh_loop, name="gc-lock", daemon=True)
        self._thread.start()

    def _check_alone(self) -> None:
        """Learn the server's clock from the lock just written, and raise
        LockHeld if another gc holds a lock."""
        self.clock = server_clock(self.target, self.key, self._answered)
        if self.clock is None:
            log.warning(
                "the gc lock %s is not listed yet; judging other locks by this machine's clock",
                self.key,
            )
        else:
            skew = time.time() - self.clock.now()
            if abs(skew) > _SKEW_WARN:
                log.warning(
                    "this machine's clock is %.0f s %s the S3 server's; gc goes by the "
                    "server's, but keep clocks in sync (NTP)",
                    abs(skew), "ahead of" if skew > 0 else "behind",
                )  # fmt: skip
        others = [lock for lock in held_locks(self.target, self.clock) if lock.key != self.key]
        if others:
            raise LockHeld(
                f"another gc is running on this bucket: {others[0].describe()}; "
                f"try again when it has finished (a crashed one's lock expires "
                f"{self.expiry:.0f} s after its last refresh)"
            )

    def _write(self) -> None:
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "expires": time.time() + self.expiry,
            "expiry": self.expiry,
        }
        # Fresh from when the request left, not when it was answered: the
        # server stores it (its LastModified, by which every other gc judges
        # the lock) in between, and an answer late by d seconds would let
        # this gc delete d seconds past the moment the others may start.
        sent = time.monotonic()
        self.target.put_bytes(self.key, encode(record), JSON_TYPE)
        self._refreshed = sent
        # After the answer: the server's clock, taken from LastModified plus
        # the time since this moment, then never runs ahead of the server.
        self._answered = time.monotonic()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_every):
            try:
                self._write()
            except UploaderError as e:
                log.warning("refreshing the gc lock %s: %s", self.key, e)

    def check(self) -> None:
        """Raise unless the lock is surely still ours for a while: called
        before each deletion, so a gc cut off from the bucket stops."""
        if time.monotonic() > self._refreshed + self.expiry - min(_MARGIN, self.expiry / 4):
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
