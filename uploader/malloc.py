"""Fewer malloc arenas and large buffers always mapped: bounded memory with
many threads.

glibc gives threads that contend for the heap arenas of their own, up to
eight per core, and memory freed in one is not reused by another.  The
uploader's threads pass NAR-sized buffers around (compressing, hashing,
sending parts), so with the default a push of several large NARs peaked
near 210 MiB; with two arenas at about 130 MiB, as fast.  Python's own
allocator serves small objects, so the lock contention this could add is
small.

Buffers of ``MMAP_FROM`` and more (parts of a NAR being sent, zstd's jobs)
are mapped and go back to the system when freed.  By default glibc raises
that threshold each time such a buffer is freed, after which 8 MiB parts
came from the arenas and stayed there: a 1.4 GiB NAR streamed to S3 peaked
at about 150 MiB instead of 105.

The NAR is read in 1 MiB chunks, below ``MMAP_FROM``: mapped, every chunk
cost 256 page faults to map and zero, and its unmapping a TLB flush on every
core; 1.4 GiB of NAR took a second of system time that way.  Served from an
arena, a freed chunk is the next one's memory, as long as the arena keeps up
to ``TRIM_FROM`` of free memory instead of handing it back at once.

Best effort: on another libc, or if ``MALLOC_ARENA_MAX`` is set, nothing is
changed.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["limit_arenas"]

_M_ARENA_MAX = -8  # mallopt(3)
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
ARENAS = 2
MMAP_FROM = 2 << 20
TRIM_FROM = 8 << 20


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap the number of malloc arenas and map large buffers; call before
    threads start.  Returns whether the cap was set."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        # The symbols already loaded, libc's among them: finding libc by name
        # would run `ldconfig -p` at every command's start.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, MMAP_FROM)
    mallopt(_M_TRIM_THRESHOLD, TRIM_FROM)
    return bool(mallopt(_M_ARENA_MAX, arenas))
