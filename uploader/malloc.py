"""Fewer malloc arenas: bounded memory with many threads.

glibc gives threads that contend for the heap arenas of their own, up to
eight per core, and memory freed in one is not reused by another.  The
uploader's threads pass NAR-sized buffers around (compressing, hashing,
sending parts), so with the default a push of several large NARs peaked
near 210 MiB; with two arenas at about 130 MiB, as fast.  Python's own
allocator serves small objects, so the lock contention this could add is
small.  Best effort: on another libc, or if ``MALLOC_ARENA_MAX`` is set,
nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["limit_arenas"]

_M_ARENA_MAX = -8  # mallopt(3)
ARENAS = 2


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap the number of malloc arenas; call before threads start.  Returns
    whether the cap was set."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))
