"""Build logs (`run --upload-logs`) and NAR listings (`--write-nar-listing`)
published by the daemon: `nix log` on a machine that has no log of its own
finds the one the builder published."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support.daemon import UploaderRun
from tests.support.nix import build, instantiate
from tests.support.services import S3Server, nix_client_env
from uploader.buildlogs import log_key
from uploader.storepath import hash_part

pytestmark = pytest.mark.integration


def noisy_expr(marker: str) -> str:
    return f"""derivation {{
  name = "noisy"; system = builtins.currentSystem; builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = ["-c" "echo building {marker}; echo {marker} > $out"];
}}"""


def nix_log_elsewhere(
    cache: str, installable: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """`nix log` as on a machine without the local log (an empty log directory)."""
    env = nix_client_env(NIX_LOG_DIR=str(tmp_path / "no-logs"))
    return subprocess.run(
        ["nix", "log", "--option", "substituters", cache, installable],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("upload_logs", [True, False], ids=["upload-logs", "default"])
def test_nix_log_finds_the_published_build_log(
    uploader: UploaderRun, s3: S3Server, bucket: str, tmp_path: Path, upload_logs: bool
) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    expr = noisy_expr(marker)
    drv = instantiate(expr)
    if upload_logs:
        uploader.extra_args = ["--upload-logs", "--write-nar-listing"]
    uploader.start()
    (out,) = build(expr, hook=str(uploader.hook))
    uploader.wait_drained(timeout=120)

    published = s3.get(bucket, log_key(drv))
    cache = s3.http_url(bucket)
    if not upload_logs:
        assert published is None, "logs are opt-in"
        assert s3.get(bucket, f"{hash_part(out)}.ls") is None
        assert nix_log_elsewhere(cache, drv, tmp_path).returncode != 0
        return
    assert published is not None and f"building {marker}".encode() in published
    listing = s3.get(bucket, f"{hash_part(out)}.ls")
    assert listing is not None and json.loads(listing)["root"]["type"] == "regular"
    for installable in (drv, out):  # by the .drv, and by an output (through its Deriver)
        shown = nix_log_elsewhere(cache, installable, tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert f"building {marker}" in shown.stdout
