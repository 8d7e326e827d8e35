"""The daemon puts itself behind builds (in a child process: it cannot be undone)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, os, platform, threading
from uploader.priority import lower_priority
done = lower_priority()
seen = {}
def child():
    seen["thread_nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
t = threading.Thread(target=child); t.start(); t.join()
# ioprio_get(2) of this process: the class is above bit 13.
ioprio_get = {"x86_64": 252, "aarch64": 31, "i686": 290, "armv7l": 315}.get(platform.machine())
if ioprio_get is not None:
    seen["io_class"] = ctypes.CDLL(None, use_errno=True).syscall(ioprio_get, 1, 0) >> 13
print(json.dumps({"done": done, "nice": os.getpriority(os.PRIO_PROCESS, 0),
                  "autogroup": open("/proc/self/autogroup").read(), **seen}))
"""


def test_a_session_leader_lowers_its_cpu_io_and_autogroup_priority() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
        start_new_session=True,
    ).stdout  # fmt: skip
    result = json.loads(out)
    assert result["nice"] == 19
    assert result["thread_nice"] == 19, "threads started afterwards inherit the priority"
    assert "nice 19" in result["done"]
    assert "autogroup nice 19" in result["done"]
    assert result["autogroup"].strip().endswith("nice 19")


def test_outside_its_own_session_the_autogroup_is_left_alone() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    assert "autogroup nice 19" not in json.loads(out)["done"]


def test_the_daemon_takes_the_idle_io_class() -> None:
    """The kernel reports the idle IO class (3), not merely the log line
    saying so.  Broken, the uploader's reads compete with the builds' for
    the disk, which the idle class exists to prevent."""
    if platform.machine() not in ("x86_64", "aarch64", "i686", "armv7l"):
        pytest.skip(f"no ioprio syscall number known for {platform.machine()}")
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(out)
    assert "idle IO class" in result["done"]
    assert result["io_class"] == 3
