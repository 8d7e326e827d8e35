"""GC roots that keep queued outputs alive until they are uploaded.

One symlink per store path, named after it, in a directory under
``/nix/var/nix/gcroots`` that the uploader owns; Nix's garbage collector
treats every symlink there that points into the store as a root.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable

from uploader.storepath import basename

__all__ = ["GcRoots"]

log = logging.getLogger(__name__)


class GcRoots:
    """The uploader's GC-root directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._warned = False

    def add(self, paths: Iterable[str], skip: Callable[[str], bool] | None = None) -> None:
        """Root ``paths``, except those ``skip`` says need none (asked just
        before each: it may change while this runs)."""
        for path in paths:
            if skip is not None and skip(path):
                continue
            link = os.path.join(self.directory, basename(path))
            try:
                os.symlink(path, link)
            except FileExistsError:
                pass
            except OSError as e:
                # Uploading still works without roots; only the protection
                # against a garbage collection before upload is lost.
                if not self._warned:
                    log.warning(
                        "cannot create GC roots in %s (%s); queued paths may be "
                        "garbage-collected before they are uploaded",
                        self.directory,
                        e.strerror,
                    )
                    self._warned = True
                return

    def remove(self, paths: Iterable[str]) -> None:
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, basename(path)))

    def current(self) -> set[str]:
        """Store paths rooted here now."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return set()
        found = set()
        for name in names:
            with contextlib.suppress(OSError):
                found.add(os.readlink(os.path.join(self.directory, name)))
        return found

    def keep_only(self, paths: Iterable[str]) -> tuple[int, set[str]]:
        """Drop the roots of paths no entry names (left by a crash, or by
        entries removed from the spool): how many, and the roots kept."""
        current = self.current()
        needed = set(paths)
        self.remove(current - needed)
        return len(current - needed), current & needed
