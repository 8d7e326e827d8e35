"""One daemon per spool, per state directory and per GC-root directory.

Two `run` processes on one spool would both upload the same entries and
overwrite each other's status; two on one GC-root directory would each drop
the roots of the other's queued builds at start.  Each takes an exclusive
``flock`` on the spool, state and GC-root directories themselves (no lock file to leave behind or to
mistake for an entry); the kernel drops it when the process ends, however it
ends.  The holder of a lock is found in ``/proc/locks`` so that the refusal
can name it.
"""

from __future__ import annotations

import errno
import fcntl
import os

from uploader._exceptions import ConfigError

__all__ = ["DirectoryLock"]


class DirectoryLock:
    """An exclusive lock on a directory, held until ``release`` or exit."""

    def __init__(self, path: str, what: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"{what} {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"cannot lock {what} {path}: {e.strerror}") from None
            who = f"pid {holder}" if holder else "another process"
            raise ConfigError(
                f"another nix-cache-uploader run ({who}) already uses the {what} {path}; "
                "stop it first, or give this one its own --spool, --state-dir and "
                "--gc-roots-dir"
            ) from None
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> int | None:
    """The process holding a flock on the file behind ``fd``, from /proc/locks."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None
