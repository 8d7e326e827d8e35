"""≥ 2000 tiny paths from spool to visible narinfo at ≥ 100 paths/s, and
≥ 2x baseline (a) on loopback; through the "region" link ≥ 6x, through
"far" ≥ 10x, with at most 1.2x the CPU time the daemon spends on loopback
(measured in the same run).

Ours: one spool entry per derivation, written by the real hook (DRV_PATH
only, as Nix 2.8 gives it), then a fresh `nix-cache-uploader run` started and
timed until the spool is empty (what `wait` checks; `wait` is run after to
agree) and the narinfos counted.  (a): `nix copy` of the same paths to
file:// + the boto3 upload loop.  Limit (c): raw boto3 PUTs of 500-byte
objects, sequential and from 16 threads (loopback only).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config

from benchmarks.baselines import upload_threads
from benchmarks.bulk import manual
from benchmarks.harness import (
    Bench,
    Row,
    cpu_seconds,
    enqueue,
    fmt_s,
    median,
    met,
    spool_empty,
    wait_until,
)
from benchmarks.workloads import Built, small_paths
from tests.support.daemon import UploaderRun

__all__ = ["LINKED", "NAME", "drain", "run", "start_and_drain", "uploader"]

NAME = "small"
LINKED = True
# Ratio to baseline (a) each place of S3 must reach.
_TARGETS = {None: 2.0, "region": 6.0, "far": 10.0}


def uploader(bench: Bench, bucket: str, prefix: str) -> UploaderRun:
    return UploaderRun(
        root=bench.tmp(prefix), store_url=bench.url(bucket), secret_key_file=bench.keys.secret_file
    )


def drain(up: UploaderRun, timeout: float = 1800) -> None:
    """Until the spool is empty (polled every 20 ms), then `wait` must agree."""
    wait_until(lambda: spool_empty(up.spool), timeout, "the uploader to drain its spool")
    up.wait_drained(timeout=30)
    quarantine = up.spool / "quarantine"
    if quarantine.exists() and any(quarantine.iterdir()):
        raise RuntimeError(f"entries were quarantined:\n{up.log()[-3000:]}")


def start_and_drain(up: UploaderRun, drvs: Sequence[str]) -> float:
    """Seconds from starting the daemon on these waiting entries to an empty spool."""
    enqueue(up.spool, drvs)
    start = time.perf_counter()
    up.start()
    drain(up)
    return time.perf_counter() - start


def _ours(bench: Bench, built: Built) -> tuple[float, float]:
    """Seconds to drain, and the CPU time the daemon used."""
    bucket = bench.bucket("small-ours")
    up = uploader(bench, bucket, "small-uploader")
    try:
        seconds = start_and_drain(up, built.drvs)
        assert up.process is not None
        cpu = cpu_seconds(up.process.pid)
        found = bench.narinfos(bucket)
        if found != len(built.closure):
            raise RuntimeError(f"{found} narinfos in the bucket, expected {len(built.closure)}")
        return seconds, cpu
    finally:
        bench.retire(up, "small")
        bench.drop_bucket(bucket)


def put_rate(bench: Bench, count: int, threads: int) -> float:
    """PUTs per second of 500-byte objects into a fresh bucket."""
    bucket = bench.bucket("small-put")
    client = boto3.client(
        "s3", endpoint_url=bench.weed.endpoint, region_name="us-east-1",
        config=Config(max_pool_connections=threads),
    )  # fmt: skip
    body = b"x" * 500

    def put(i: int) -> None:
        client.put_object(Bucket=bucket, Key=f"obj/{i}", Body=body, ContentType="text/plain")

    try:
        start = time.perf_counter()
        if threads == 1:
            for i in range(count):
                put(i)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(put, range(count)))
        return count / (time.perf_counter() - start)
    finally:
        bench.drop_bucket(bucket)


def _one_run(bench: Bench, built: Built, run: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for name in ("ours", "a") if run % 2 == 0 else ("a", "ours"):
        if name == "ours":
            results["ours"], results["cpu"] = _ours(bench, built)
        else:
            results["a"] = manual(bench, built.outputs, len(built.closure), "small-a").seconds
    if bench.link is None:
        count = len(built.closure)
        results["put1"] = put_rate(bench, count, 1)
        results["put16"] = put_rate(bench, count, 16)
    else:
        # The CPU time the same work takes on loopback, for comparison.
        link, bench.link = bench.link, None
        try:
            results["loopback-cpu"] = _ours(bench, built)[1]
        finally:
            bench.link = link
    return results


def run(bench: Bench) -> list[Row]:
    built = small_paths(bench)
    count = len(built.closure)
    runs = bench.repeat(
        f"small{bench.where}: {count} tiny paths", lambda r: _one_run(bench, built, r)
    )
    t = {k: median(r[k] for r in runs) for k in runs[0]}
    rate, rate_a = count / t["ours"], count / t["a"]
    target = _TARGETS[bench.link.link.name if bench.link else None]
    rows = [
        Row(
            f"small{bench.where}: {count} tiny paths vs (a) nix copy file:// + boto3 upload "
            + ("loop" if bench.link is None else f"with {upload_threads(bench)} threads"),
            f"{fmt_s(t['ours'])} ({rate:.0f} paths/s; CPU {fmt_s(t['cpu'])})",
            f"(a): {fmt_s(t['a'])} ({rate_a:.0f} paths/s)",
            f"{t['a'] / t['ours']:.2f}x faster", f"≥ {target:g}x faster",
            met(t["a"] >= target * t["ours"]),
        ),
    ]  # fmt: skip
    if bench.link is not None:
        cpu = t["cpu"] / t["loopback-cpu"]
        return [
            *rows,
            Row(
                f"small{bench.where}: the daemon's CPU time vs the same {count} paths on loopback",
                fmt_s(t["cpu"]), f"loopback: {fmt_s(t['loopback-cpu'])}",
                f"{cpu:.2f}x", "≤ 1.2x", met(cpu <= 1.2),
            ),
        ]  # fmt: skip
    return [
        Row(
            f"small: {count} tiny paths, spool entries → visible narinfos (fresh daemon)",
            f"{rate:.0f} paths/s ({fmt_s(t['ours'])})", "—", "—",
            "≥ 100 paths/s", met(rate >= 100),
        ),
        *rows,
        Row(
            "small: limit (c) raw boto3 PUTs of 500 B objects (each path needs ≥ 2 PUTs)",
            f"{rate:.0f} paths/s",
            f"{t['put1']:.0f} PUT/s sequential, {t['put16']:.0f} PUT/s with 16 threads",
            f"ours = {2 * rate / t['put16']:.0%} of the 16-thread PUT rate (2 PUTs/path)",
        ),
    ]  # fmt: skip
