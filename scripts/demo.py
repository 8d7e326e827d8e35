"""The end-to-end demo behind `scripts/demo` (see the README)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.integration.test_daemon import dag_expr
from tests.support.cli import make_keys, run_cli
from tests.support.daemon import UploaderRun
from tests.support.nix import build, multi_output_expr, substitute
from tests.support.services import running_services


def say(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def main() -> int:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    with tempfile.TemporaryDirectory(prefix="ncu-demo-") as tmp, running_services() as (_, weed):
        work = Path(tmp)
        bucket = weed.create_bucket("demo-cache")
        url = weed.store_url(bucket)
        say(f"SeaweedFS serves S3 at {weed.endpoint}; cache URL {url}")
        keys = make_keys(work, "demo-cache-1")
        say(f"signing key {keys.name}; public key {keys.public}")
        uploader = UploaderRun(
            root=work / "uploader", store_url=url, secret_key_file=keys.secret_file
        )
        uploader.start()
        say(f"uploader daemon running (pid {uploader.process and uploader.process.pid}), "
            f"spool {uploader.spool}")  # fmt: skip
        try:
            expr = multi_output_expr()
            outputs = build(dag_expr(12), hook=str(uploader.hook))
            outputs += build(expr, hook=str(uploader.hook)) + build(expr, attr="lib")
            say(f"nix-daemon built {len(outputs)} outputs with the post-build-hook; "
                f"{len(uploader.pending())} spool entries queued")  # fmt: skip
            uploader.wait_drained()
            say("spool drained (nix-cache-uploader wait)")
            print(run_cli("status", *uploader.queue_args()).stdout, file=sys.stderr)
        finally:
            uploader.stop()
        dest = str(work / "fresh-store")
        copied = substitute(weed.http_url(bucket), outputs, keys.public, dest=dest)
        if copied.returncode != 0:
            say(f"FAILED: a fresh store could not substitute:\n{copied.stderr}")
            return 1
        check = subprocess.run(
            ["nix-store", "--store", dest, "--verify", "--check-contents"],
            capture_output=True, text=True,
        )  # fmt: skip
        if check.returncode != 0:
            say(f"FAILED: the fresh store does not verify:\n{check.stderr}")
            return 1
        say(f"OK: a fresh store substituted all {len(outputs)} outputs and their closures "
            "from the bucket with signatures checked, and verified their contents")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
