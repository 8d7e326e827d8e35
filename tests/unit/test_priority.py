"""The daemon puts itself behind builds (in a child process: it cannot be undone)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, os, threading
from uploader.priority import lower_priority
done = lower_priority()
seen = {}
def child():
    seen["thread_nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
t = threading.Thread(target=child); t.start(); t.join()
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
