"""A ≥ 1 GiB closure of real binaries reaches the bucket (every narinfo
visible) ≥ 2x faster than baseline (a) at the same zstd level, on loopback
and through the "region" link; through the "far" link, within 1.05x of
the time the link alone needs for the compressed bytes.

Ours: `nix-cache-uploader push` into a fresh bucket, timed until it exits,
then the narinfos counted.  (a): `nix copy` to file:// with zstd level 3,
then the boto3 upload, timed together; (a-xz) the same with Nix's default
xz, once (it is slow).  Limit (c): `zstd -T0 -3` over the same NAR bytes,
dumped to files first so that only compression is timed (loopback only,
as is a-xz).

Every run of ours also counts the CPU time it costs the machine: the
uploader's, the S3 server's (SeaweedFS runs on the same cores, where a
user's S3 would not) and the link proxy's.  Their sum over the cores is
the fastest the push could be here, whatever the uploader overlaps; the
baseline over it is the best ratio this machine allows.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

from benchmarks.baselines import ZSTD_LEVEL, Pipeline, manual_pipeline
from benchmarks.harness import (
    Bench,
    Measured,
    Row,
    cpu_seconds,
    fmt_bytes,
    fmt_rate,
    fmt_s,
    median,
    met,
    push_command,
    remove,
    run_measured,
)
from benchmarks.workloads import Built, bulk_closure, nar_sizes
from tests.support.services import nix_client_env

__all__ = ["LINKED", "NAME", "push_closure", "run"]

NAME = "bulk"
LINKED = True


@dataclass(frozen=True)
class Pushed:
    measured: Measured
    nar_files: int  # bytes of the NAR files written
    server_cpu: float  # seconds of CPU SeaweedFS used meanwhile
    link_cpu: float  # and the link proxy (0 on loopback)


def push_closure(bench: Bench, roots: list[str], expected: int, prefix: str) -> Pushed:
    """`push` of ``roots`` into a fresh bucket (checked, then dropped)."""
    bucket = bench.bucket(prefix)
    try:
        log = bench.work / f"{bucket}.log"
        server, link = _helpers_cpu(bench)
        measured = run_measured(push_command(bench, bucket, roots), log)
        server_after, link_after = _helpers_cpu(bench)
        if measured.returncode != 0:
            raise RuntimeError(f"push exited {measured.returncode}:\n{measured.log[-2000:]}")
        _check(bench, bucket, expected, "push")
        return Pushed(
            measured, bench.object_bytes(bucket, "nar/"), server_after - server, link_after - link
        )
    finally:
        bench.drop_bucket(bucket)


def _helpers_cpu(bench: Bench) -> tuple[float, float]:
    """CPU seconds used so far by SeaweedFS and by the link proxy."""
    assert bench.weed.process is not None
    server = cpu_seconds(bench.weed.process.pid)
    return server, cpu_seconds(bench.link.process.pid) if bench.link else 0.0


def _check(bench: Bench, bucket: str, expected: int, who: str) -> None:
    found = bench.narinfos(bucket)
    if found != expected:
        raise RuntimeError(f"{who}: {found} narinfos in the bucket, expected {expected}")


def manual(
    bench: Bench, paths: list[str], expected: int, prefix: str, compression: str = "zstd"
) -> Pipeline:
    """Baseline (a) into a fresh bucket (checked, then dropped)."""
    bucket = bench.bucket(prefix)
    try:
        result = manual_pipeline(bench, paths, bucket, compression)
        _check(bench, bucket, expected, f"baseline (a, {compression})")
        return result
    finally:
        bench.drop_bucket(bucket)


def _zstd_limit(bench: Bench, built: Built) -> float:
    """Seconds for `zstd -T0 -3` over the closure's NARs, pre-dumped to files."""
    directory = bench.tmp("nars")
    try:
        files = []
        for i, path in enumerate(sorted(built.closure)):
            files.append(str(directory / f"{i}.nar"))
            with open(files[-1], "wb") as f:
                subprocess.run(["nix-store", "--dump", path], stdout=f, check=True,
                               env=nix_client_env())  # fmt: skip
        start = time.perf_counter()
        subprocess.run(
            ["zstd", "-q", "-T0", f"-{ZSTD_LEVEL}", "-c", *files],
            stdout=subprocess.DEVNULL, check=True,
        )  # fmt: skip
        return time.perf_counter() - start
    finally:
        remove(directory)


def _one_run(bench: Bench, built: Built, run: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for name in ("ours", "a") if run % 2 == 0 else ("a", "ours"):
        if name == "ours":
            pushed = push_closure(bench, built.outputs, len(built.closure), "bulk-ours")
            ours = pushed.measured
            results["ours"], results["rss"], results["files"] = (
                ours.seconds, ours.max_rss, pushed.nar_files
            )  # fmt: skip
            results["cpu"], results["server-cpu"], results["link-cpu"] = (
                ours.cpu, pushed.server_cpu, pushed.link_cpu
            )  # fmt: skip
        else:
            a = manual(bench, built.outputs, len(built.closure), "bulk-a")
            results["a"], results["a-copy"], results["a-upload"] = (
                a.seconds, a.copy_seconds, a.upload_seconds
            )  # fmt: skip
    if bench.link is None:
        results["zstd"] = _zstd_limit(bench, built)
    # Each run's pair, so the spread behind the medians shows in the log.
    bench.say(
        f"bulk{bench.where}: run {run + 1}: ours {fmt_s(results['ours'])} "
        f"(CPU: uploader {fmt_s(results['cpu'])}, S3 server {fmt_s(results['server-cpu'])}), "
        f"(a) {fmt_s(results['a'])} (copy {fmt_s(results['a-copy'])} + upload "
        f"{fmt_s(results['a-upload'])}): {results['a'] / results['ours']:.2f}x"
    )
    return results


def run(bench: Bench) -> list[Row]:
    built = bulk_closure(bench)
    size, count = built.nar_bytes, len(built.closure)
    runs = bench.repeat(
        f"bulk{bench.where}: {count} paths, {fmt_bytes(size)}",
        lambda r: _one_run(bench, built, r),
    )
    t = {k: median(r[k] for r in runs) for k in runs[0]}
    what = f"{count} paths, {fmt_bytes(size)} NAR of real binaries"
    speedup = t["a"] / t["ours"]
    rows = [
        Row(
            f"bulk{bench.where}: {what} → bucket, zstd level {ZSTD_LEVEL}",
            f"{fmt_s(t['ours'])} ({fmt_rate(size, t['ours'])}; "
            f"peak RSS {max(r['rss'] for r in runs) / (1 << 20):.0f} MiB)",
            f"(a) nix copy file:// + boto3: {fmt_s(t['a'])} (copy {fmt_s(t['a-copy'])} "
            f"+ upload {fmt_s(t['a-upload'])}; {fmt_rate(size, t['a'])})",
            f"{speedup:.2f}x faster", "≥ 2x faster", met(speedup >= 2),
        ),
        _cpu_row(bench, t),
    ]  # fmt: skip
    if bench.link is not None:
        link = bench.link.link
        floor = link.transfer_seconds(t["files"])
        rows.append(
            Row(
                f"bulk{bench.where}: the same vs the link alone carrying its "
                f"{fmt_bytes(t['files'])} of compressed NARs",
                fmt_s(t["ours"]), f"{fmt_s(floor)} at {link.bandwidth * 8 / 1e6:.0f} Mbit/s",
                f"{t['ours'] / floor:.2f}x the link time",
                "≤ 1.05x (far)" if link.name == "far" else "—",
                met(t["ours"] <= 1.05 * floor) if link.name == "far" else "—",
            )
        )  # fmt: skip
        return rows
    return rows + _loopback_rows(bench, built, t)


def _cpu_row(bench: Bench, t: dict[str, float]) -> Row:
    """What the push costs this machine's cores, so the best it could do here."""
    cores = os.cpu_count() or 1
    parts = [f"uploader {fmt_s(t['cpu'])}", f"S3 server {fmt_s(t['server-cpu'])}"]
    if bench.link is not None:
        parts.append(f"link proxy {fmt_s(t['link-cpu'])}")
    total = t["cpu"] + t["server-cpu"] + t["link-cpu"]
    floor = total / cores
    return Row(
        f"bulk{bench.where}: the CPU the same push costs on this machine, "
        f"S3 server included, over its {cores} cores",
        f"{' + '.join(parts)} = {total:.1f} core-s: {fmt_s(floor)} at best",
        f"(a) {fmt_s(t['a'])}",
        f"at most {t['a'] / floor:.2f}x faster here",
    )  # fmt: skip


def _loopback_rows(bench: Bench, built: Built, t: dict[str, float]) -> list[Row]:
    """xz, once, and the zstd limit: they do not depend on where S3 is."""
    size = built.nar_bytes
    zstd_limit = Row(
        f"bulk: limit (c) zstd -T0 -{ZSTD_LEVEL} over the same NAR bytes (pre-dumped)",
        fmt_rate(size, t["ours"]), f"{fmt_rate(size, t['zstd'])} ({fmt_s(t['zstd'])})",
        f"ours at {t['zstd'] / t['ours']:.0%} of the limit",
    )  # fmt: skip
    if not bench.xz:
        return [zstd_limit]
    # xz is slow (minutes per GiB): once, and with --quick on the smallest path only.
    xz_paths = [min(built.closure, key=built.closure.__getitem__)] if bench.quick else built.outputs
    xz_bytes = sum(built.closure[p] for p in xz_paths) if bench.quick else size
    bench.say(f"bulk: baseline (a-xz) once, {fmt_bytes(xz_bytes)}")
    xz_count = len(nar_sizes(xz_paths))
    xz = manual(bench, xz_paths, xz_count, "bulk-xz", "xz")
    ours_xz = (
        push_closure(bench, xz_paths, xz_count, "bulk-ours-xz").measured.seconds
        if bench.quick
        else t["ours"]
    )
    return [
        Row(
            f"bulk: (a-xz) nix copy with its default xz + boto3, once, {fmt_bytes(xz_bytes)}"
            + (" (smallest path only, --quick)" if bench.quick else ""),
            f"{fmt_s(ours_xz)} (zstd)",
            f"{fmt_s(xz.seconds)} (copy {fmt_s(xz.copy_seconds)}; "
            f"{fmt_rate(xz_bytes, xz.seconds)})",
            f"{xz.seconds / ours_xz:.1f}x faster",
        ),
        zstd_limit,
    ]
