"""The spool: the queue between the post-build hook and the uploader daemon.

This module owns reading the entries ``hook/post-build-hook`` writes (their
format is :mod:`uploader.spoolentry`'s) without trusting them (a planted
symlink, fifo, oversize or malformed file is a :class:`SpoolError`, never a
hang or a followed link), removing an entry once it is done, the
``quarantine/`` directory for bad input, and noticing new entries
(watchdog/inotify).  What to upload for an entry is the daemon's business.

The hook writes an entry in place under its final name, so an entry may be
seen before it is complete: reading it raises :class:`IncompleteEntryError`
then, and the watch reports it only when its writer closes it.  One that
stays incomplete for :data:`INCOMPLETE_GRACE` (its hook was killed, or the
disk was full) is malformed: a plain :class:`SpoolError`, to quarantine.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from watchdog.events import (
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from uploader._exceptions import ConfigError, IncompleteEntryError, SpoolError
from uploader.spoolentry import (
    END_LINE,
    FORMAT_HEADER,
    FORMAT_REFUSED,
    FORMAT_V1_HEADER,
    MAX_ENTRY_SIZE,
    Entry,
    parse_entry,
)

__all__ = [
    "DEFAULT_SPOOL",
    "ENTRY_SUFFIX",
    "INCOMPLETE_GRACE",
    "Spool",
    "SpoolWatch",
    "init_spool",
]

# One fact in two places: hook/post-build-hook and nixos-module/ default to it too.
DEFAULT_SPOOL = "/var/spool/nix-cache-uploader"
ENTRY_SUFFIX = ".entry"
# An entry without its end line is left alone while its last write is younger
# than this: a hook takes milliseconds, so it is ample for a machine under
# heavy load, and short enough that a person sees the quarantine reason soon.
INCOMPLETE_GRACE = 600.0

_TEMP_PREFIX = ".tmp-"
_REASON_SUFFIX = ".reason"
_QUARANTINE = "quarantine"
# Opening these is a property of the entry, not of the machine: quarantine it.
_BAD_OPEN_ERRNOS = {errno.ELOOP, errno.ENXIO, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}

log = logging.getLogger(__name__)


def _check_name(name: str) -> str:
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise SpoolError(f"not a spool entry name: {name!r}")
    return name


def _unlink(path: str) -> bool:
    """Remove ``path``; False if it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    while limit > 0 and (chunk := os.read(fd, limit)):
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def _scan(directory: str, wanted: Callable[[str], bool]) -> list[tuple[float, str]]:
    """(mtime, name) of the wanted non-directories in ``directory``, oldest first."""
    found = []
    with os.scandir(directory) as it:
        for e in it:
            if not wanted(e.name) or e.is_dir(follow_symlinks=False):
                continue
            try:
                found.append((e.stat(follow_symlinks=False).st_mtime, e.name))
            except FileNotFoundError:
                continue
    return sorted(found)


def _is_entry_name(name: str) -> bool:
    return not name.startswith(".") and name.endswith(ENTRY_SUFFIX)


class SpoolWatch(FileSystemEventHandler):
    """A running watch on the spool; :meth:`stop` ends it and waits for its thread.

    It reports an entry when its writer closes it (inotify's IN_CLOSE_WRITE:
    the hook writes in place) or when it is renamed into the spool (older
    hooks, `retry`, a person's `mv`), never when it is created: a file just
    created is still empty.
    """

    def __init__(self, root: str, on_entry: Callable[[str], None]) -> None:
        # inotify, not watchdog's platform default: close events and moves
        # from outside the spool (unpaired IN_MOVED_TO, which watchdog's
        # "full events" report as moves) exist only there.  Imported here so
        # that importing this module never needs it.
        from watchdog.observers.inotify import InotifyObserver

        self._root = root
        self._on_entry = on_entry
        self._observer = InotifyObserver(generate_full_events=True)
        events: list[type[FileSystemEvent]] = [FileClosedEvent, FileMovedEvent]
        self._observer.schedule(self, root, recursive=False, event_filter=events)
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            path = os.fsdecode(event.dest_path)  # empty when moved out of the spool
        elif isinstance(event, FileClosedEvent):
            path = os.fsdecode(event.src_path)
        else:
            return
        directory, name = os.path.split(path)
        if directory != self._root or not _is_entry_name(name):
            return
        try:
            self._on_entry(name)
        except Exception:
            # An exception would end watchdog's thread, and with it every later entry.
            log.exception("spool watch: handling new entry %r failed", name)


class Spool:
    """A spool directory: entries at the top, bad ones under ``quarantine/``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_entry_size: int = MAX_ENTRY_SIZE,
        *,
        incomplete_grace: float = INCOMPLETE_GRACE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.quarantine_path = os.path.join(self.path, _QUARANTINE)
        self.max_entry_size = max_entry_size
        self.incomplete_grace = incomplete_grace
        self._clock = clock  # wall time, as file mtimes are

    def pending(self) -> list[str]:
        """Entry names waiting in the spool, oldest first (mtime, then name)."""
        return [name for _, name in _scan(self.path, _is_entry_name)]

    def read(self, name: str) -> Entry:
        """Read and validate one entry; FileNotFoundError if it is already gone.

        IncompleteEntryError while it lacks its end line, unless it has not
        been written to for ``incomplete_grace`` seconds: then SpoolError.
        """
        path = os.path.join(self.path, _check_name(name))
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if e.errno not in _BAD_OPEN_ERRNOS:
                raise
            symlink = e.errno == errno.ELOOP
            why = "is a symlink, not a regular file" if symlink else f"cannot open: {e.strerror}"
            raise SpoolError(f"spool entry {name!r}: {why}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a fifo"}.get(
                    stat.S_IFMT(st.st_mode), "a special file"
                )
                raise SpoolError(f"spool entry {name!r}: is {kind}, not a regular file")
            data = _read_at_most(fd, self.max_entry_size + 1)
        finally:
            os.close(fd)
        try:
            return parse_entry(data, name, st.st_mtime, self.max_entry_size)
        except IncompleteEntryError:
            idle = self._clock() - st.st_mtime
            if idle < self.incomplete_grace:
                raise
            raise SpoolError(
                f"spool entry {name!r}: incomplete: no {END_LINE!r} line and no write for "
                f"{idle / 60:.0f} minutes (its hook was killed, or the disk was full)"
            ) from None

    def ack(self, name: str) -> None:
        """Remove a finished entry; removing one that is already gone is fine."""
        _unlink(os.path.join(self.path, _check_name(name)))

    def quarantine(self, name: str, reason: str) -> str | None:
        """Move the entry itself (never what it links to) to ``quarantine/``,
        with a reason.  Return None, or the reason's line when it could not
        be written beside the entry (a full disk): the entry is quarantined
        all the same, and `record_reason` may write the line later."""
        _check_name(name)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.quarantine_path, 0o750)
            os.chmod(self.quarantine_path, 0o750)  # whatever the umask said
        try:
            os.rename(os.path.join(self.path, name), os.path.join(self.quarantine_path, name))
        except FileNotFoundError:
            return None
        when = datetime.now(UTC).isoformat(timespec="seconds")
        line = " ".join(f"{reason} (quarantined {when})".splitlines())
        try:
            self.record_reason(name, line)
        except OSError as e:
            log.warning("%s: the reason could not be recorded beside it: %s", name, e)
            return line
        return None

    def record_reason(self, name: str, line: str) -> bool:
        """Write the reason of the quarantined entry ``name``; False when it
        is no longer quarantined (requeued, or removed by hand)."""
        reason_path = os.path.join(self.quarantine_path, _check_name(name) + _REASON_SUFFIX)
        if not os.path.lexists(os.path.join(self.quarantine_path, name)):
            return False
        _unlink(reason_path)  # O_EXCL below: never write through a planted link
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            with os.fdopen(os.open(reason_path, flags, 0o640), "w", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            # Nothing half-written stays: `status` says no reason was recorded.
            with contextlib.suppress(OSError):
                _unlink(reason_path)
            raise
        return True

    def quarantined(self) -> list[tuple[str, str]]:
        """(name, reason) for every quarantined entry, by name."""
        result = []
        for name in self._quarantined_names():
            reason_path = os.path.join(self.quarantine_path, name + _REASON_SUFFIX)
            try:
                fd = os.open(reason_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                result.append((name, "(no reason recorded)"))
                continue
            try:
                reason = _read_at_most(fd, 4096).decode("utf-8", errors="replace").strip()
            finally:
                os.close(fd)
            result.append((name, reason))
        return result

    def _quarantined_names(self) -> list[str]:
        try:
            found = _scan(self.quarantine_path, lambda n: not n.endswith(_REASON_SUFFIX))
        except FileNotFoundError:
            return []
        return sorted(name for _, name in found if not name.startswith("."))

    def requeue(self, names: Iterable[str] | None = None) -> int:
        """Move quarantined entries (all when ``names`` is None) back; return how many."""
        moved = 0
        for name in self._quarantined_names() if names is None else names:
            source = os.path.join(self.quarantine_path, _check_name(name))
            try:
                os.rename(source, os.path.join(self.path, name))
            except FileNotFoundError:
                continue
            moved += 1
            _unlink(source + _REASON_SUFFIX)
        return moved

    def requeue_formats_read_now(self) -> list[str]:
        """Move back the quarantined entries that were quarantined for a
        format this uploader reads; the names moved.  An older daemon does
        so with a newer hook's entries when the hook is upgraded first
        (`install` over an older install, before the service restarts)."""
        names = []
        for name, reason in self.quarantined():
            if FORMAT_REFUSED.match(reason) and self._quarantined_header(name) in (
                FORMAT_HEADER,
                FORMAT_V1_HEADER,
            ):
                names.append(name)
        self.requeue(names)
        return names

    def _quarantined_header(self, name: str) -> str | None:
        """The first line of a quarantined entry (a regular file), if any."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(os.path.join(self.quarantine_path, name), flags)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            head = _read_at_most(fd, len(FORMAT_HEADER) + 1)
        finally:
            os.close(fd)
        return head.decode("utf-8", errors="replace").split("\n", 1)[0]

    def stale_temp_files(self, older_than: float) -> list[str]:
        """Hook temp files not touched for ``older_than`` seconds (left by a crash)."""
        cutoff = time.time() - older_than
        temps = _scan(self.path, lambda n: n.startswith(_TEMP_PREFIX))
        return sorted(name for mtime, name in temps if mtime < cutoff)

    def remove_stale_temp_files(self, older_than: float = 3600) -> list[str]:
        """Remove :meth:`stale_temp_files`; return the names removed."""
        stale = self.stale_temp_files(older_than)
        return [name for name in stale if _unlink(os.path.join(self.path, name))]

    def watch(self, on_entry: Callable[[str], None]) -> SpoolWatch:
        """Call ``on_entry(name)`` for each entry written into the spool (at
        its writer's close) or renamed into it.

        The callback runs on watchdog's thread, not the caller's: an asyncio
        caller should hand over with ``loop.call_soon_threadsafe``.  It may be
        called more than once for a name, and exceptions it raises are logged
        and swallowed.  Start the watch before scanning :meth:`pending`, so an
        entry arriving in between is not missed.
        """
        return SpoolWatch(self.path, on_entry)


def init_spool(path: str | os.PathLike[str], group: str | None = None) -> None:
    """Create the spool directory with mode 2770 (setgid: entries get its group).

    With ``group``, the directory is given that group (and owner root when
    running as root), so the hook's entries are readable by the uploader.
    """
    os.makedirs(path, mode=0o770, exist_ok=True)
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"spool {os.fspath(path)!r}: no such group {group!r}") from None
        os.chown(path, 0 if os.geteuid() == 0 else -1, gid)
    os.chmod(path, 0o2770)
