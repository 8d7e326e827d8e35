"""Re-enqueueing an already uploaded 2000-path closure drains in ≤ 2 s with
no NAR read on loopback, ≤ 3 s through a link (the issue sets it for "far").

The small workload is pushed once (untimed); then, each with a fresh daemon
state unless noted: 2000 entries (one per path) renamed into the spool of a
running daemon, the same again into the same daemon (its state now knows the
paths), one entry whose closure is all 2000 paths, and 2000 entries already
waiting when the daemon starts (Python start-up included).  Timed until the
spool is empty; "no NAR read" is shown by the daemon's log (no `uploaded`
line) and its status (``uploaded_paths`` = 0).  For reference, `nix copy`
to a file:// cache that already holds the closure.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Sequence

from benchmarks.baselines import file_url
from benchmarks.harness import (
    Bench,
    Row,
    enqueue,
    fmt_s,
    median,
    met,
    push_command,
    remove,
    run_measured,
    spool_empty,
)
from benchmarks.small import drain, start_and_drain, uploader
from benchmarks.workloads import Built, small_paths
from tests.support.daemon import UploaderRun
from tests.support.services import nix_client_env
from uploader.state import read_status

__all__ = ["LINKED", "NAME", "run"]

NAME = "noop"
LINKED = True
_UPLOADED = re.compile(r"^\S+ uploaded /nix/store/", re.MULTILINE)


def _drop(bench: Bench, up: UploaderRun, drvs: Sequence[str]) -> float:
    """Stage entries beside the spool, rename them in at once, time the drain."""
    staging = up.root / "staging"
    staging.mkdir(exist_ok=True)
    enqueue(staging, drvs)
    names = sorted(os.listdir(staging))
    start = time.perf_counter()
    for name in names:
        os.rename(staging / name, up.spool / name)
    # A drop the daemon does not notice would wait for its periodic rescan:
    # look at what its status says a moment later, to tell that apart.
    noticed = None
    while not spool_empty(up.spool) and noticed is None:
        if time.perf_counter() - start > 3:
            status = read_status(str(up.state_dir)) or {}
            noticed = int(status.get("pending", 0)) + int(status.get("in_flight", 0))
        time.sleep(0.02)
    drain(up)
    seconds = time.perf_counter() - start
    if noticed == 0:
        bench.say(
            f"noop: after 3 s the daemon's status showed none of the {len(names)} dropped "
            f"entries (missed spool events?); they drained after {seconds:.1f}s"
        )
    return seconds


def _no_upload(up: UploaderRun) -> int:
    """How many paths the daemon uploaded (must be 0): log lines and status."""
    status = read_status(str(up.state_dir)) or {}
    return len(_UPLOADED.findall(up.log())) + int(status.get("uploaded_paths", 0))


def _variants(bench: Bench, built: Built, bucket: str) -> dict[str, float]:
    results: dict[str, float] = {}
    uploaded = 0
    fresh = [uploader(bench, bucket, "noop-uploader") for _ in range(3)]
    try:
        up = fresh[0]
        up.start()
        results["cold"] = _drop(bench, up, built.drvs)
        results["warm"] = _drop(bench, up, built.drvs)
        up = fresh[1]
        up.start()
        results["closure"] = _drop(bench, up, built.drvs[:1])
        results["startup"] = start_and_drain(fresh[2], built.drvs)
        for up in fresh:
            up.stop()
            uploaded += _no_upload(up)
    finally:
        for label, up in zip(("noop-running", "noop-closure", "noop-startup"), fresh, strict=True):
            bench.retire(up, label)
    if uploaded:
        raise RuntimeError(f"a no-op re-enqueue uploaded {uploaded} paths")
    return results


def _nix_copy_present(bench: Bench, built: Built) -> float:
    """`nix copy` to a file:// cache that already holds the closure."""
    directory = bench.tmp("noop-file-cache")
    try:
        cmd = ["nix", "copy", "--to", file_url(directory, bench, "zstd"), *built.outputs]
        subprocess.run(cmd, env=nix_client_env(), check=True, capture_output=True)
        start = time.perf_counter()
        subprocess.run(cmd, env=nix_client_env(), check=True, capture_output=True)
        return time.perf_counter() - start
    finally:
        remove(directory)


def run(bench: Bench) -> list[Row]:
    built = small_paths(bench)
    count = len(built.closure)
    bucket = bench.bucket("noop")
    try:
        bench.say(f"noop: uploading the {count}-path closure once (untimed)")
        setup = run_measured(push_command(bench, bucket, built.outputs), bench.work / "noop.log")
        if setup.returncode != 0 or bench.narinfos(bucket) != count:
            raise RuntimeError(f"noop setup push failed:\n{setup.log[-2000:]}")
        runs = bench.repeat(
            f"noop: {count} uploaded paths", lambda _: _variants(bench, built, bucket)
        )
    finally:
        bench.drop_bucket(bucket)
    copy = (
        f"nix copy to a file:// cache holding them: "
        f"{fmt_s(median(_nix_copy_present(bench, built) for _ in range(bench.runs)))}"
        if bench.link is None
        else "—"
    )
    t = {k: median(r[k] for r in runs) for k in runs[0]}
    proof = "0 uploaded (log and status)"
    limit = 2 if bench.link is None else 3

    def row(what: str, key: str, baseline: str = "—") -> Row:
        return Row(
            f"noop{bench.where}: {what}", f"{fmt_s(t[key])}, {proof}", baseline, "—",
            f"≤ {limit} s", met(t[key] <= limit),
        )  # fmt: skip

    return [
        row(f"{count} entries for uploaded paths dropped into a running daemon "
            "(fresh state: the cache is asked)", "cold"),
        row(f"the same {count} entries again (the daemon's state knows the paths)", "warm"),
        row(f"1 entry whose closure is the {count} uploaded paths, running daemon",
            "closure", copy),
        row(f"{count} entries waiting at daemon start (Python start-up included)", "startup"),
    ]  # fmt: skip
