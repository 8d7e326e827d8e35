"""Target 6: builds running while the uploader drains a backlog take ≤ 1.15x
as long as with the uploader idle.

A set of CPU-bound builds (fresh salt each time, max-jobs = nproc so they use
every core) is timed three ways, in rotating order: with an idle daemon; with
a daemon draining a backlog (spool entries for the bulk and big workloads'
derivations, into a fresh bucket) as it runs by default, putting itself
behind builds (nice 19, its session's autogroup at nice 19, idle IO class:
see uploader/priority.py); and, for contrast, with ``--normal-priority``.

With ``kernel.sched_autogroup_enabled = 1`` (here, and the default of most
distribution kernels) every session gets an equal CPU share whatever its
processes' nice values; the daemon, like a systemd service, leads a session
of its own, so nice alone would only rank it against itself.
"""

from __future__ import annotations

import os
import time

from benchmarks.harness import Bench, Row, enqueue, fmt_bytes, fmt_s, median, met, nix_build
from benchmarks.workloads import big_path, bulk_closure, cpu_builds_expr
from tests.support.daemon import UploaderRun
from uploader.state import read_status

__all__ = ["NAME", "run"]

NAME = "interference"


def _busy(up: UploaderRun, timeout: float = 30) -> None:
    """Until the daemon has taken a batch (is uploading, not starting up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = read_status(str(up.state_dir)) or {}
        if status.get("in_flight"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the uploader took no work within {timeout:.0f}s:\n{up.log()[-2000:]}")


def _builds(bench: Bench, variant: str, drvs: list[str], count: int) -> tuple[float, int]:
    """Seconds for the builds beside the uploader ``variant``; entries left after."""
    bucket = bench.bucket(f"interf-{variant}")
    up = UploaderRun(
        root=bench.tmp(f"interf-{variant}"), store_url=bench.url(bucket),
        secret_key_file=bench.keys.secret_file,
        extra_args=["--normal-priority"] if variant == "plain" else [],
    )  # fmt: skip
    try:
        if variant != "idle":
            enqueue(up.spool, drvs)
        up.start()
        if variant != "idle":
            _busy(up)
        seconds, _ = nix_build(
            cpu_builds_expr(count, bench.name("cpu")), max_jobs=os.cpu_count(), bench=bench
        )
        left = len(up.pending())
        if variant != "idle" and left == 0:
            bench.say(f"interference: the {variant} uploader drained before the builds ended")
        return seconds, left
    finally:
        bench.retire(up, f"interference-{variant}", kill=True)
        try:
            bench.drop_bucket(bucket)
        except Exception as e:  # an upload killed mid-way may leave the bucket odd
            bench.say(f"interference: could not drop bucket {bucket}: {e}")


def run(bench: Bench) -> list[Row]:
    bulk, big = bulk_closure(bench), big_path(bench)
    drvs = bulk.drvs + big.drvs
    backlog = bulk.nar_bytes + big.nar_bytes
    count = 8 if bench.quick else 40
    variants = ["idle", "default", "plain"]

    def one(run: int) -> dict[str, tuple[float, int]]:
        order = variants[run % 3 :] + variants[: run % 3]
        return {v: _builds(bench, v, drvs, count) for v in order}

    runs = bench.repeat(f"interference: {count} CPU-bound builds", one)
    t = {v: median(r[v][0] for r in runs) for v in variants}
    left = {v: min(r[v][1] for r in runs) for v in variants}
    what = f"{count} CPU-bound builds (max-jobs {os.cpu_count()})"
    base = f"uploader idle: {fmt_s(t['idle'])}"
    tail = f"{len(drvs)}-entry backlog, {fmt_bytes(backlog)} NAR"
    return [
        Row(
            f"interference: {what} while the uploader drains a {tail} "
            "(default: low priority, set by the daemon itself)",
            f"{fmt_s(t['default'])} (≥ {left['default']} entries still queued at the end)",
            base, f"{t['default'] / t['idle']:.3f}x", "≤ 1.15x",
            met(t["default"] <= 1.15 * t["idle"]),
        ),
        Row(
            "interference: the same with `--normal-priority` (contrast)",
            f"{fmt_s(t['plain'])} (≥ {left['plain']} entries still queued)", base,
            f"{t['plain'] / t['idle']:.3f}x",
        ),
    ]  # fmt: skip
