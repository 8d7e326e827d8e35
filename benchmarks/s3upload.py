"""The baselines' second half: upload a directory that `nix copy --to file://`
wrote to a bucket, the simple way a CI script does it (boto3, one
``upload_file`` per file, in a loop, content types set; NARs before narinfos).

    python3 -m benchmarks.s3upload [--manifest FILE] [--threads N] DIR ENDPOINT BUCKET

With ``--threads`` N > 1, N files at a time: every NAR, then every narinfo.

With ``--manifest`` only files not listed there are uploaded, and their names
are appended: the synchronous hook (baseline b) calls it after every build.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config

__all__ = ["content_type", "main", "upload_dir"]


def content_type(key: str) -> str:
    if key.endswith(".narinfo"):
        return "text/x-nix-narinfo"
    if key == "nix-cache-info":
        return "text/x-nix-cache-info"
    if key.startswith("nar/"):
        return "application/x-nix-nar"
    return "application/octet-stream"


def _files(directory: str) -> list[str]:
    keys = []
    for root, _, names in os.walk(directory):
        for name in names:
            key = os.path.relpath(os.path.join(root, name), directory)
            if not key.startswith("."):
                keys.append(key)
    # NARs first and narinfos last, so no narinfo is visible before its NAR.
    return sorted(keys, key=lambda k: (k.endswith(".narinfo"), k))


def upload_dir(
    directory: str, endpoint: str, bucket: str, manifest: str | None = None, threads: int = 1
) -> int:
    """Upload the files of ``directory`` (those not in ``manifest``); how many."""
    done: set[str] = set()
    if manifest and os.path.exists(manifest):
        with open(manifest) as f:
            done = set(f.read().split())
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        config=Config(max_pool_connections=max(10, threads)),
    )  # fmt: skip
    todo = [k for k in _files(directory) if k not in done]

    def upload(key: str) -> None:
        client.upload_file(
            os.path.join(directory, key), bucket, key, ExtraArgs={"ContentType": content_type(key)}
        )

    if threads == 1:
        for key in todo:
            upload(key)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for narinfos in (False, True):
                list(pool.map(upload, [k for k in todo if k.endswith(".narinfo") == narinfos]))
    if manifest:
        with open(manifest, "a") as f:
            f.writelines(f"{k}\n" for k in todo)
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.s3upload")
    parser.add_argument("--manifest")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("directory")
    parser.add_argument("endpoint")
    parser.add_argument("bucket")
    args = parser.parse_args(argv)
    upload_dir(args.directory, args.endpoint, args.bucket, args.manifest, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
