"""Target 1: the hook costs the build loop (almost) nothing.

* One invocation: our hook as the tests hand it to nix-daemon
  (``make_hook_wrapper``: today a copy with the spool baked in), and the hook
  itself with the spool in its environment, against a hook that is
  ``#!/bin/sh`` + ``exit 0``; spawned alternately, many times.
* A DAG build through nix-daemon with our hook, with no hook, and with the
  manual's synchronous ``nix copy`` hook (baseline b); fresh salt every build.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks.baselines import sync_hook
from benchmarks.harness import (
    Bench,
    Row,
    fmt_s,
    median,
    met,
    nix_build,
    remove,
    spawn_hook,
)
from benchmarks.workloads import compile_dag_expr
from tests.support.daemon import HOOK, make_hook_wrapper

__all__ = ["NAME", "run"]

NAME = "hook"
_FAKE_DRV = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-bench-hook-probe.drv"
# Creating a file on a settled ext4 takes 10-30 µs here; for minutes after a
# mass deletion, 30-300 µs, rising and falling (see _settled_create).
_SETTLED_CREATE = 50e-6
# For all the runs together.
_SETTLE_AT_MOST = 420.0


def _exit0(directory: Path) -> Path:
    hook = directory / "exit0"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    return hook


def _settled_create(bench: Bench, spool: Path, deadline: float) -> float:
    """Median seconds to create a file in ``spool``, once that is as cheap
    as on a settled file system (waits until ``deadline`` at most).

    An ext4 without a journal (this machine's) does not reuse an inode freed
    in the last minute (six while its inode table is not written back):
    creating a file steps over each such inode, one lookup apiece.  After a
    mass deletion (an earlier benchmark's clean-up) every new file costs up
    to 0.3 ms more, for minutes and unevenly.  That is the file system
    digesting someone else's deletions, not the hook, so the hook is timed
    once it has: sync, then probe every 3 s until three probes in a row are
    settled.  The probe is the spool itself (a directory's files take their
    inodes near it, and ext4 spreads directories apart); its files stay until
    the end, like the entries.
    """
    os.sync()
    start = time.monotonic()
    made = settled = 0
    while True:
        times = []
        for _ in range(25):
            began = time.perf_counter()
            os.close(os.open(spool / f"probe-{made}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            times.append(time.perf_counter() - began)
            made += 1
        cost = median(times)
        settled = settled + 1 if cost <= _SETTLED_CREATE else 0
        waited = time.monotonic() - start
        if settled == 3 or time.monotonic() > deadline:
            if waited > 10:
                bench.say(f"hook: waited {waited:.0f} s for the file system to settle")
            return cost
        if made == 25 and not settled:
            bench.say(
                f"hook: creating a file takes {cost * 1e6:.0f} µs: the file system is "
                "still digesting recent deletions; waiting until it settles"
            )
        time.sleep(3)


def _invocations(
    bench: Bench, directory: Path, run: int, count: int, deadline: float
) -> tuple[float, float, float, float]:
    """Median seconds per invocation: exit-0 hook, ours as given to nix-daemon,
    ours direct; and to create a file in the spool just before.

    Each run gets a spool of its own and nothing is deleted until every run is
    done: deleting the last run's entries would make the next run measure
    that clean-up instead of the hook (see ``_settled_create``)."""
    spool = directory / f"spool-{run}"
    spool.mkdir(mode=0o2770)
    create = _settled_create(bench, spool, deadline)
    noop, wrapper = _exit0(directory), make_hook_wrapper(directory, spool)
    direct_env = {"NIX_CACHE_UPLOADER_SPOOL": str(spool)}
    times: tuple[list[float], list[float], list[float]] = ([], [], [])
    for _ in range(count):
        times[0].append(spawn_hook(noop, _FAKE_DRV))
        times[1].append(spawn_hook(wrapper, _FAKE_DRV))
        times[2].append(spawn_hook(HOOK, _FAKE_DRV, direct_env))
    written = len(list(spool.glob("*.entry")))
    if written != 2 * count:
        raise RuntimeError(f"our hook wrote {written} entries for {2 * count} invocations")
    return median(times[0]), median(times[1]), median(times[2]), create


def _dag_builds(bench: Bench, run: int, size: int, reps: int) -> dict[str, list[float]]:
    """Wall times of fresh DAG builds: ``reps`` each with no hook, an `exit 0`
    hook and ours (interleaved, order rotating per run), then one with each
    baseline (b) hook."""
    directory = bench.tmp("hook-dag")
    bucket = bench.bucket("hook-b")
    try:
        spool = directory / "spool"
        spool.mkdir(mode=0o2770)
        (directory / "b-file").mkdir()
        (directory / "b-s3").mkdir()
        hooks: dict[str, str | None] = {
            "none": None,
            "exit0": str(_exit0(directory)),
            "ours": str(make_hook_wrapper(directory, spool)),
            "b-file": str(sync_hook(bench, directory / "b-file", None)),
            "b-s3": str(sync_hook(bench, directory / "b-s3", bucket)),
        }
        cheap = ["none", "exit0", "ours"]
        cheap = cheap[run % 3 :] + cheap[: run % 3]
        seconds: dict[str, list[float]] = {name: [] for name in hooks}
        for name in cheap * reps + ["b-file", "b-s3"]:
            elapsed, outputs = nix_build(
                compile_dag_expr(size, salt=bench.name("dag")), hook=hooks[name], bench=bench
            )
            seconds[name].append(elapsed)
            if len(outputs) != size:
                raise RuntimeError(f"DAG build ({name}) gave {len(outputs)} outputs")
        entries = len(list(spool.glob("*.entry")))
        uploaded = bench.narinfos(bucket)
        if entries != size * reps or uploaded != size:
            raise RuntimeError(
                f"hooks did not run for every build: {entries} spool entries for "
                f"{size * reps} builds, {uploaded} narinfos uploaded by baseline b for {size}"
            )
        return seconds
    finally:
        remove(directory)
        bench.drop_bucket(bucket)


def _vs(t: dict[str, float], baseline: str) -> str:
    return f"(b) {t[baseline] / t['none']:.2f}x no hook; ours {t[baseline] / t['ours']:.1f}x faster"


def run(bench: Bench) -> list[Row]:
    count = 100 if bench.quick else 500
    directory = bench.tmp("hook-spawn")
    deadline = time.monotonic() + _SETTLE_AT_MOST
    try:
        spawns = bench.repeat(
            f"hook: {count} invocations each",
            lambda r: _invocations(bench, directory, r, count, deadline),
        )
    finally:
        remove(directory)
    noop, wrapped, direct, create = (median(s[i] for s in spawns) for i in range(4))
    size, reps = (20, 1) if bench.quick else (60, 3)
    builds = bench.repeat(
        f"hook: {size}-derivation DAG builds", lambda r: _dag_builds(bench, r, size, reps)
    )
    t = {name: median(x for b in builds for x in b[name]) for name in builds[0]}
    ratio = t["ours"] / t["none"]
    dag = f"{size}-derivation DAG build, each a gcc -O2 compile (median of {reps * bench.runs})"
    base = f"`exit 0` hook: {fmt_s(noop)}"
    return [
        Row(
            f"hook: one invocation, as given to nix-daemon ({count}x{bench.runs} spawns)",
            fmt_s(wrapped), base, f"{wrapped / noop:.2f}x", "≤ 1.5x", met(wrapped <= 1.5 * noop),
        ),
        Row(
            "hook: one invocation, hook/post-build-hook itself (spool in its environment)",
            fmt_s(direct), base, f"{direct / noop:.2f}x", "≤ 1.5x", met(direct <= 1.5 * noop),
        ),
        Row(
            "hook: creating one file in the spool, just before the invocations were timed "
            f"(≤ {_SETTLED_CREATE * 1e6:.0f} µs: settled)",
            f"{create * 1e6:.0f} µs", "—", "—",
        ),
        Row(
            f"hook: {dag} with our hook vs no hook",
            fmt_s(t["ours"]), f"no hook: {fmt_s(t['none'])}", f"{ratio:.3f}x", "≤ 1.05x",
            met(ratio <= 1.05),
        ),
        Row(
            f"hook: {dag} with an `exit 0` hook vs no hook (the floor for any hook)",
            f"ours: {fmt_s(t['ours'])}", f"`exit 0` hook: {fmt_s(t['exit0'])}",
            f"exit 0: {t['exit0'] / t['none']:.3f}x no hook; ours {t['ours'] / t['exit0']:.3f}x it",
        ),
        Row(
            f"hook: {size}-derivation DAG build (1 per run), baseline (b) manual's hook: "
            "nix copy to file:// (zstd) + boto3 upload of new files to the bucket",
            f"ours: {fmt_s(t['ours'])}", f"(b): {fmt_s(t['b-s3'])}",
            _vs(t, "b-s3"),
        ),
        Row(
            f"hook: {size}-derivation DAG build (1 per run), baseline (b): nix copy to "
            "file:// only",
            f"ours: {fmt_s(t['ours'])}", f"(b file://): {fmt_s(t['b-file'])}",
            _vs(t, "b-file"),
        ),
    ]  # fmt: skip
