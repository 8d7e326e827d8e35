"""What every measurement shares: the services, fresh buckets and
directories, timing, and running Nix, the hook and the uploader."""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import boto3

from benchmarks.linkproxy import RunningLink
from tests.support.cli import KeyPair
from tests.support.daemon import HOOK, UploaderRun
from tests.support.services import SeaweedFS, nix_client_env

__all__ = [
    "LOGS",
    "REPO",
    "RESULTS",
    "Bench",
    "Measured",
    "Row",
    "cpu_seconds",
    "fmt_bytes",
    "fmt_rate",
    "fmt_s",
    "median",
    "nix_build",
    "run_measured",
    "spawn_hook",
    "wait_until",
]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# Each uploader daemon's log is kept here (cleared per invocation), for profiling.
LOGS = RESULTS / "logs"
T = TypeVar("T")
_T0 = time.monotonic()


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    measurement: str
    ours: str
    baseline: str
    ratio: str
    target: str = "—"
    met: str = "—"


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 0.1 else f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def fmt_rate(nbytes: float, seconds: float) -> str:
    return f"{nbytes / (1 << 20) / seconds:.0f} MiB/s"


@dataclass
class Bench:
    """One invocation: its services, key, scratch space and settings."""

    work: Path
    weed: SeaweedFS
    keys: KeyPair
    quick: bool
    runs: int
    xz: bool = True  # run baseline (a-xz) (--no-xz: it takes minutes)
    salt: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    built: list[str] = field(default_factory=list)  # store paths to delete at the end
    cache: dict[str, Any] = field(default_factory=dict)  # workloads, built once
    # The link between the uploader (and the baselines) and S3; None: loopback.
    # Checks and clean-up (``s3()``) always go straight to SeaweedFS.
    link: RunningLink | None = None
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def endpoint(self) -> str:
        """Where the timed clients reach S3: through the link, if any."""
        return self.link.endpoint if self.link else self.weed.endpoint

    @property
    def where(self) -> str:
        """What row names say about the link: nothing on loopback."""
        return f" [{self.link.link.describe()}]" if self.link else ""

    def say(self, msg: str) -> None:
        print(f"bench [{time.monotonic() - _T0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    def name(self, prefix: str) -> str:
        return f"{prefix}-{self.salt}-{next(self._ids)}"

    def tmp(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=self.work))

    def bucket(self, prefix: str) -> str:
        """A new bucket, written to once already.  SeaweedFS allocates a
        bucket's volumes on its first write of content (0.2 s here), which only a
        brand-new cache pays, not the pushes and baselines measured."""
        name = self.weed.create_bucket(self.name(prefix))
        client = self.s3()
        client.put_object(Bucket=name, Key="bench-first-write", Body=b"x")
        client.delete_object(Bucket=name, Key="bench-first-write")
        return name

    def url(self, bucket: str) -> str:
        return f"s3://{bucket}?endpoint={self.endpoint}&region=us-east-1"

    def s3(self) -> Any:
        """A boto3 client for the SeaweedFS under test."""
        return boto3.client("s3", endpoint_url=self.weed.endpoint, region_name="us-east-1")

    def keys_in(self, bucket: str, suffix: str = "") -> list[str]:
        client = self.s3()
        found = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            found += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
        return found

    def object_bytes(self, bucket: str, prefix: str) -> int:
        """Total size of the objects under ``prefix``."""
        client = self.s3()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sum(o["Size"] for page in pages for o in page.get("Contents", []))

    def narinfos(self, bucket: str) -> int:
        return len(self.keys_in(bucket, ".narinfo"))

    def drop_bucket(self, bucket: str) -> None:
        """Empty and delete a bucket, so the SeaweedFS data stays small."""
        client = self.s3()
        keys = self.keys_in(bucket)
        for i in range(0, len(keys), 1000):
            objs = [{"Key": k} for k in keys[i : i + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": objs, "Quiet": True})
        client.delete_bucket(Bucket=bucket)

    def repeat(self, what: str, fn: Callable[[int], T]) -> list[T]:
        """``fn(run)`` for each run; the run number lets callers alternate order."""
        results = []
        for run in range(self.runs):
            self.say(f"{what}: run {run + 1}/{self.runs}")
            results.append(fn(run))
        return results

    def retire(self, up: UploaderRun, label: str, *, kill: bool = False) -> None:
        """Stop a daemon (or kill it), keep its log, remove its directories."""
        if kill:
            up.kill()
        else:
            up.stop()
        LOGS.mkdir(parents=True, exist_ok=True)
        if up.log_path.exists():
            shutil.copyfile(up.log_path, LOGS / f"{self.name(label)}.log")
        remove(up.root)

    def delete_built(self) -> None:
        """Remove this invocation's store paths (nothing roots them)."""
        if not self.built:
            return
        proc = subprocess.run(
            ["nix-store", "--delete", *sorted(set(self.built))],
            env=nix_client_env(), capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            self.say(f"could not delete the workload store paths: {proc.stderr.strip()[-300:]}")


def nix_build(
    expr: str,
    *,
    hook: str | None = None,
    max_jobs: int | None = None,
    bench: Bench | None = None,
) -> tuple[float, list[str]]:
    """Build ``expr`` through nix-daemon; the wall time of nix-build and its outputs."""
    with tempfile.NamedTemporaryFile("w", suffix=".nix", delete=False) as f:
        f.write(expr)
    cmd = ["nix-build", f.name, "--no-out-link"]
    if hook:
        cmd += ["--option", "post-build-hook", hook]
    if max_jobs:
        cmd += ["--max-jobs", str(max_jobs)]
    try:
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=nix_client_env(), capture_output=True, text=True)
        seconds = time.perf_counter() - start
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"nix-build failed:\n{proc.stderr[-3000:]}")
    outputs = proc.stdout.split()
    if bench is not None:
        bench.built += outputs
    return seconds, outputs


def nix_output(*args: str) -> str:
    """Stdout of a Nix command run as a client of the daemon."""
    proc = subprocess.run(args, env=nix_client_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def nix_lines(*args: str) -> list[str]:
    return nix_output(*args).split()


def spawn_hook(hook: str | Path, drv: str, env: dict[str, str] | None = None) -> float:
    """Run a post-build hook the way nix-daemon does (Nix 2.8: OUT_PATHS
    empty) and return its wall time, spawn to exit."""
    full = {"PATH": "/usr/bin:/bin", "DRV_PATH": drv, "OUT_PATHS": "", **(env or {})}
    start = time.perf_counter_ns()
    pid = os.posix_spawn(str(hook), [str(hook)], full)
    _, status = os.waitpid(pid, 0)
    elapsed = (time.perf_counter_ns() - start) / 1e9
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"hook {hook} exited {os.waitstatus_to_exitcode(status)}")
    return elapsed


def enqueue(spool: Path, drvs: Sequence[str]) -> None:
    """One spool entry per derivation, written by the real hook."""
    for drv in drvs:
        spawn_hook(HOOK, drv, {"NIX_CACHE_UPLOADER_SPOOL": str(spool)})


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measured:
    seconds: float
    max_rss: int  # bytes: the process's and its reaped children's peak (wait4)
    returncode: int
    log: str
    cpu: float = 0.0  # user + system seconds of the process and its reaped children


def run_measured(args: Sequence[str], log_path: Path) -> Measured:
    """Run a command to completion; wall time, peak RSS and CPU time from ``wait4``."""
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(
        seconds, usage.ru_maxrss * 1024, proc.returncode, log_path.read_text(),
        usage.ru_utime + usage.ru_stime,
    )  # fmt: skip


def push_command(bench: Bench, bucket: str, paths: Sequence[str]) -> list[str]:
    return [
        sys.executable, "-m", "uploader", "push", "--to", bench.url(bucket),
        "--secret-key-file", bench.keys.secret_file, *paths,
    ]  # fmt: skip


def wait_until(check: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def spool_empty(spool: Path) -> bool:
    """What `nix-cache-uploader wait` checks: no entry left in the spool."""
    return not any(p.name.endswith(".entry") for p in spool.iterdir())


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
