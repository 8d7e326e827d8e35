"""The pipelines we compare against, as the Nix manual describes them.

(a) ``nix copy --to 'file://DIR?compression=zstd&secret-key=…'`` then the
    directory uploaded to the bucket with boto3 (Debian's Nix 2.8 has no S3
    store), timed together; also with Nix's default xz, for the record.
    Through a link (linkproxy.py), the upload goes through it too, 8 files
    at a time.
(b) the manual's synchronous post-build-hook: ``nix copy`` inside the hook, so
    every build waits for its upload.  Nix 2.8 hands the hook an empty
    OUT_PATHS, so the hook asks ``nix-store --query --outputs $DRV_PATH``.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import REPO, Bench, remove
from tests.support.services import nix_client_env

__all__ = [
    "ZSTD_LEVEL",
    "Pipeline",
    "file_url",
    "manual_pipeline",
    "sync_hook",
    "upload_threads",
]

# zstd's default level, which `nix copy` uses when compression-level is unset
# (checked: identical output); the uploader's default too.  Set explicitly.
ZSTD_LEVEL = 3


def upload_threads(bench: Bench) -> int:
    """Files the baseline uploads at once: one on loopback (a plain loop);
    through a link, 8, as a CI script that knows about latency would do
    (`aws s3 sync` sends 10): one at a time, 4000 objects would take 4000
    round trips, and the comparison would only measure that."""
    return 8 if bench.link else 1


def file_url(directory: Path, bench: Bench, compression: str) -> str:
    params = f"compression={compression}&secret-key={bench.keys.secret_file}"
    if compression == "zstd":
        params += f"&compression-level={ZSTD_LEVEL}"
    return f"file://{directory}?{params}"


@dataclass(frozen=True)
class Pipeline:
    copy_seconds: float
    upload_seconds: float

    @property
    def seconds(self) -> float:
        return self.copy_seconds + self.upload_seconds


def manual_pipeline(
    bench: Bench, paths: Sequence[str], bucket: str, compression: str = "zstd"
) -> Pipeline:
    """Baseline (a): ``nix copy`` to a fresh file:// cache, then the upload."""
    directory = bench.tmp("file-cache")
    try:
        start = time.perf_counter()
        copy = subprocess.run(
            ["nix", "copy", "--to", file_url(directory, bench, compression), *paths],
            env=nix_client_env(), capture_output=True, text=True,
        )  # fmt: skip
        copied = time.perf_counter()
        if copy.returncode != 0:
            raise RuntimeError(f"nix copy failed:\n{copy.stderr[-2000:]}")
        upload = subprocess.run(
            [sys.executable, "-m", "benchmarks.s3upload", "--threads", str(upload_threads(bench)),
             str(directory), bench.endpoint, bucket],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        uploaded = time.perf_counter()
        if upload.returncode != 0:
            raise RuntimeError(f"baseline upload failed:\n{upload.stderr[-2000:]}")
    finally:
        remove(directory)
    return Pipeline(copied - start, uploaded - copied)


def sync_hook(bench: Bench, directory: Path, bucket: str | None) -> Path:
    """Baseline (b): a post-build-hook running ``nix copy`` to a file://
    cache in ``directory`` and, with ``bucket``, uploading what is new there."""
    url = file_url(directory / "cache", bench, "zstd")
    lines = [
        "#!/bin/sh",
        "# Baseline (b): the Nix manual's post-build-hook, synchronous.",
        "set -eu",
        "export PATH=/usr/bin:/bin",
        "export NIX_CONFIG='substituters =",
        "experimental-features = nix-command'",
        'outs=$(nix-store --query --outputs "$DRV_PATH")',
        f"nix copy --to {shlex.quote(url)} $outs",
    ]
    if bucket:
        creds = "AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench"
        lines += [
            f"cd {shlex.quote(str(REPO))}",
            f"exec env {creds} {shlex.quote(sys.executable)} -m benchmarks.s3upload"
            f" --manifest {directory}/uploaded {directory}/cache {bench.weed.endpoint} {bucket}",
        ]
    hook = directory / "hook"
    hook.write_text("\n".join(lines) + "\n")
    hook.chmod(0o755)
    return hook
