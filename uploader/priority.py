"""Getting out of the way of builds: the daemon's CPU and IO priority.

``nice`` alone is not enough on kernels with autogroup scheduling (the
default on most distributions): every session gets an equal share of the
CPU whatever its processes' nice values, and the daemon runs in a session of
its own (as a service, or started with setsid).  A session leader therefore
also lowers its autogroup.  IO goes to the idle class, which schedulers that
honour it (BFQ) serve only when nothing else waits.  All of it is best
effort: what the system refuses is skipped.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["lower_priority"]

_NICE = 19
# ioprio_set(2): no wrapper in Python's os module.
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "i686": 289, "armv7l": 314}
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13


def lower_priority() -> list[str]:
    """Lower this process (and the threads it starts afterwards); return
    what was done, for the log."""
    done = []
    try:
        os.setpriority(os.PRIO_PROCESS, 0, _NICE)
        done.append(f"nice {_NICE}")
    except OSError:
        pass
    if os.getsid(0) == os.getpid():
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(_NICE))
            done.append(f"autogroup nice {_NICE}")
        except OSError:
            pass
    number = _IOPRIO_SET.get(platform.machine())
    if number is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        value = _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
        if libc.syscall(number, _IOPRIO_WHO_PROCESS, 0, value) == 0:
            done.append("idle IO class")
    return done
