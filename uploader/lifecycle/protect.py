"""The uploader's side of the gc protocol (docs/lifecycle.md, "The protocol").

Per push or daemon batch: write a root listing every path it may rely on,
then read the mark; each time the cache "already has" a path that the mark
names a candidate, wait for the gcs that were running, ask again, and write
its narinfo again (the same bytes) or report it gone, to be uploaded.  A NAR
the mark says no narinfo names is written even when it exists, and checked
again once the gcs running then have finished.  The engine and the daemon
only call this; it holds no state of theirs.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterable

from uploader.lifecycle.gclock import LockInfo, ServerClock, held_locks, server_clock, wait_for
from uploader.lifecycle.layout import check_layout
from uploader.lifecycle.listing import narinfo_key
from uploader.lifecycle.marks import Marks
from uploader.lifecycle.roots import RootWriter
from uploader.storepath import hash_part
from uploader.targets import Target

__all__ = ["Protection"]

NARINFO_TYPE = "text/x-nix-narinfo"
# Set only by the test that shows the concurrency test can fail: uploaders
# then ignore the mark, as one that does not follow the protocol would.
_UNSAFE = "NIX_CACHE_UPLOADER_UNSAFE_IGNORE_GC_MARK"


class Protection:
    """Roots and mark checks for the uploads into one cache, one root at a time."""

    def __init__(
        self,
        target: Target,
        name: str | None = None,
        *,
        forget: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.target = target
        self.name = name or socket.gethostname()
        # Told the hash parts of paths gc deleted: a local memory of the cache drops them.
        self.forget = forget
        self.marks = Marks(target)
        self.root: RootWriter | None = None
        self._layout_checked = False
        self._locks: list[LockInfo] | None = None
        # The server's clock, read from the root's LastModified when a lock
        # must be judged (gclock.ServerClock); when the root was written.
        self._clock: ServerClock | None = None
        self._root_written: tuple[str, float] | None = None  # key, monotonic time
        self._lock = threading.Lock()
        self._ignore = os.environ.get(_UNSAFE) == "1"

    def prepare(self) -> None:
        """Check the bucket's layout (once): what ``begin`` needs first, which
        a caller may ask for before it knows the paths."""
        if not self._layout_checked:
            check_layout(self.target, write=True)
            self._layout_checked = True

    def forget_layout(self) -> None:
        """Check the layout again before the next root (the bucket was gone:
        made again, it lacks one)."""
        self._layout_checked = False

    def begin(self, paths: Iterable[str]) -> None:
        """Write a new root (in progress) listing ``paths``, then read the mark."""
        self.prepare()
        self.root = RootWriter(self.target, self.name)
        self.root.start(paths)
        self._wrote_root()
        self._refresh()

    def extend(self, paths: Iterable[str]) -> None:
        """Add paths to the root; the mark is read again after it grew, so
        that it is read after the root covers them."""
        assert self.root is not None
        if self.root.extend(paths):
            self._wrote_root()
            self._refresh()

    def reread_mark(self) -> None:
        """Read the mark again without a new root: for a caller whose last
        complete root still lists every path it relies on (and is kept)."""
        self.prepare()
        self._refresh()

    def complete(self) -> None:
        if self.root is not None:
            self.root.complete()
            self._wrote_root()
            self.root = None

    def _wrote_root(self) -> None:
        """The root was (re)written: its LastModified is this write's."""
        assert self.root is not None
        with self._lock:
            self._clock, self._root_written = None, (self.root.key, time.monotonic())

    def _refresh(self) -> None:
        deleted = self.marks.refresh()
        if deleted and self.forget is not None:
            self.forget(deleted)
        with self._lock:
            self._locks = None  # listed again, after this mark, when needed

    def _server_clock(self) -> ServerClock | None:
        """The server's clock, from this uploader's last root write (under
        ``_lock``): locks are judged by it, so that a clock ahead of the
        server's does not take a running gc's lock for expired.  None before
        any root (or one gc deleted): the locks' own word and this machine's
        clock then."""
        if self._clock is None and self._root_written is not None:
            self._clock = server_clock(self.target, *self._root_written)
        return self._clock

    def _wait_for_running_gc(self) -> None:
        """Wait for the gcs that held the lock after the mark was read (a gc
        that starts later sees this uploader's root)."""
        with self._lock:
            clock = self._server_clock()
            if self._locks is None:
                self._locks = held_locks(self.target, clock)
            locks = self._locks
        wait_for(self.target, locks, clock)

    def gone(self, paths: Iterable[str]) -> set[str]:
        """Of ``paths``, which the cache seemed to have, those gc took:
        candidates are asked again once the running gc finished; those still
        there get their narinfo written again, newer than the mark."""
        if self._ignore:
            return set()
        candidates = [p for p in paths if self.marks.candidate(hash_part(p))]
        if not candidates:
            return set()
        self._wait_for_running_gc()
        taken: set[str] = set()
        for path in candidates:
            key = narinfo_key(hash_part(path))
            data = self.target.get(key)
            if data is None:
                taken.add(path)
            else:
                self.target.put_bytes(key, data, NARINFO_TYPE)
        if taken and self.forget is not None:
            self.forget({hash_part(p) for p in taken})
        return taken

    def nar_unreferenced(self, key: str) -> bool:
        """Whether the mark says no narinfo names this NAR (a gc may delete
        it): then it is written even when it exists, and settled after."""
        return not self._ignore and self.marks.unreferenced_nar(key)

    def settle_nar(self, key: str, write: Callable[[], None]) -> None:
        """After writing such a NAR: once the gcs running now have finished,
        make sure it is still there (else write it again, and look again)."""
        while True:
            with self._lock:
                clock = self._server_clock()
            wait_for(self.target, held_locks(self.target, clock), clock)
            if self.target.exists(key):
                return
            write()
