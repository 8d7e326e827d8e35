"""Room for open files: the soft limit raised towards the hard one.

A daemon far from S3 keeps up to 256 requests in flight (``MAX_WIDTH`` in
roundtrips.py), each a socket, beside the NARs being read, spool entries
and Nix's pipes.  The soft limit most shells and systemd give (1024) leaves
little room; the hard limit is the administrator's (systemd's default is
524288), and the soft one is the process's to raise up to it.  Should files
still run out, the NAR that met it is tried again later (nar.py), never
given up.  Best effort: what the system refuses is left as it is.
"""

from __future__ import annotations

import errno
import resource

__all__ = ["EXHAUSTED", "WANTED", "exhausted_hint", "raise_open_files", "ran_out"]

# Errors that say the machine ran out of something, and of what.
EXHAUSTED = {
    errno.EMFILE: "this process's open-file limit; raise it (LimitNOFILE= in the unit)",
    errno.ENFILE: "the system's open-file limit (fs.file-max)",
    errno.ENOMEM: "memory",
    errno.ENOBUFS: "buffer space",
    errno.EAGAIN: None,
    errno.EINTR: None,
}

WANTED = 8192


def raise_open_files(wanted: int = WANTED) -> int:
    """Raise the soft limit on open files to ``wanted`` (or the hard limit,
    if lower); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return soft


def exhausted_hint(e: OSError) -> str:
    """`` (out of …); tried again later`` for an error of exhaustion, else ``""``."""
    what = EXHAUSTED.get(e.errno) if e.errno is not None else None
    return f" (out of {what}); tried again later" if what else ""


def ran_out(error: BaseException) -> bool:
    """Whether ``error`` came of the machine running out (its cause, or the
    cause's cause, an error of exhaustion)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in EXHAUSTED:
            return True
        seen = seen.__cause__
    return False
