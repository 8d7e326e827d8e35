"""Target 4: uploading one path with a ≥ 1 GiB NAR keeps the uploader's peak
RSS ≤ 160 MiB.  Also, without a target: `push --compression xz` of many
medium paths, where each NAR compressed at once holds an xz encoder.

`push` is run to completion and its peak RSS read from ``wait4`` (the
process and the `nix` queries it reaped, whichever peaked higher); the same
path through the daemon (`run`, one spool entry) has its ``VmHWM`` read from
/proc before it is stopped.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import (
    Bench,
    Row,
    fmt_bytes,
    fmt_rate,
    median,
    met,
    push_command,
    run_measured,
)
from benchmarks.small import start_and_drain, uploader
from benchmarks.workloads import Built, big_path, many_paths

__all__ = ["NAME", "run"]

NAME = "memory"
_LIMIT = 160 << 20


def _push(bench: Bench, built: Built) -> tuple[float, int]:
    bucket = bench.bucket("memory-push")
    try:
        measured = run_measured(push_command(bench, bucket, built.outputs), bench.work / "m.log")
        if measured.returncode != 0 or bench.narinfos(bucket) != 1:
            raise RuntimeError(f"push of the big path failed:\n{measured.log[-2000:]}")
        return measured.seconds, measured.max_rss
    finally:
        bench.drop_bucket(bucket)


def _push_xz(bench: Bench, built: Built) -> tuple[float, int]:
    bucket = bench.bucket("memory-xz")
    try:
        command = [*push_command(bench, bucket, built.outputs), "--compression", "xz"]
        measured = run_measured(command, bench.work / "m.log")
        if measured.returncode != 0 or bench.narinfos(bucket) != len(built.outputs):
            raise RuntimeError(f"push of the many paths failed:\n{measured.log[-2000:]}")
        return measured.seconds, measured.max_rss
    finally:
        bench.drop_bucket(bucket)


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a running process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def _daemon(bench: Bench, built: Built) -> tuple[float, int]:
    bucket = bench.bucket("memory-run")
    up = uploader(bench, bucket, "memory-uploader")
    try:
        seconds = start_and_drain(up, built.drvs)
        assert up.process is not None
        peak = vm_hwm(up.process.pid)
        if bench.narinfos(bucket) != 1:
            raise RuntimeError(f"the daemon did not upload the big path:\n{up.log()[-2000:]}")
        return seconds, peak
    finally:
        bench.retire(up, "memory-run")
        bench.drop_bucket(bucket)


def run(bench: Bench) -> list[Row]:
    built = big_path(bench)
    many = many_paths(bench)
    size = built.nar_bytes
    runs = bench.repeat(
        f"memory: one path, {fmt_bytes(size)} NAR",
        lambda _: (_push(bench, built), _daemon(bench, built), _push_xz(bench, many)),
    )
    push_rss = [r[0][1] for r in runs]
    run_rss = [r[1][1] for r in runs]
    xz_rss = [r[2][1] for r in runs]
    push_s = median(r[0][0] for r in runs)
    run_s = median(r[1][0] for r in runs)
    xz_s = median(r[2][0] for r in runs)

    def mib(n: float) -> str:
        return f"{n / (1 << 20):.0f} MiB"

    return [
        Row(
            f"memory: push of one path with a {fmt_bytes(size)} NAR, peak RSS (wait4)",
            f"{mib(median(push_rss))} (max {mib(max(push_rss))}; {fmt_rate(size, push_s)})",
            "—", "—", "≤ 160 MiB", met(max(push_rss) <= _LIMIT),
        ),
        Row(
            "memory: the same path through the daemon (run), peak RSS (VmHWM)",
            f"{mib(median(run_rss))} (max {mib(max(run_rss))}; {fmt_rate(size, run_s)})",
            "—", "—", "≤ 160 MiB", met(max(run_rss) <= _LIMIT),
        ),
        Row(
            f"memory: push --compression xz of {len(many.outputs)} paths of 150 to 400 KiB "
            f"({fmt_bytes(many.nar_bytes)} NAR), peak RSS (wait4)",
            f"{mib(median(xz_rss))} (max {mib(max(xz_rss))}; {xz_s:.1f} s)",
            "—", "—", "—", "—",
        ),
    ]  # fmt: skip
