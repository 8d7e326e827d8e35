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

import resource

__all__ = ["WANTED", "raise_open_files"]

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
