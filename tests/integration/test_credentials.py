"""The daemon and push without AWS credentials, against real S3 servers:
one clear line, no traceback, no exit; uploads once credentials appear."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_metrics import scrape
from tests.support.cli import KeyPair, run_cli
from tests.support.daemon import UploaderRun
from tests.support.nix import build, trivial_expr
from tests.support.services import NixDaemon, S3Server, free_ports
from uploader.storepath import hash_part

pytestmark = pytest.mark.integration


def env_without_credentials(tmp_path: Path) -> dict[str, str]:
    """No credentials anywhere boto3 looks; the shared file appears later."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "aws-credentials")
    env["AWS_CONFIG_FILE"] = str(tmp_path / "aws-config")
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # no instance here to ask
    env["HOME"] = str(tmp_path)
    return env


def status(uploader: UploaderRun) -> dict[str, Any]:
    out = run_cli("status", "--json", *uploader.queue_args()).stdout
    report: dict[str, Any] = json.loads(out)
    return report


# The NixOS module's units name the environment file they read, or none
# (their config file is in the Nix store: the file beside it is no guide).
@pytest.mark.parametrize(
    ("unit_names", "service_hint"),
    [
        (None, "for the service put them into /etc/nix-cache-uploader/environment"),
        ("/run/secrets/ncu.env", "for the service put them into /run/secrets/ncu.env"),
        ("", "for the service give it an environment file with them "
             "(services.nix-cache-uploader.environmentFile on NixOS)"),
    ],
)  # fmt: skip
def test_push_without_credentials_says_where_to_put_them(
    nix_daemon: NixDaemon,
    s3: S3Server,
    bucket: str,
    keys: KeyPair,
    tmp_path: Path,
    unit_names: str | None,
    service_hint: str,
) -> None:
    (out,) = build(trivial_expr("no-credentials"))
    env = env_without_credentials(tmp_path)
    if unit_names is not None:
        env["NIX_CACHE_UPLOADER_ENVIRONMENT_FILE"] = unit_names
    result = run_cli("push", "--to", s3.store_url(bucket), "--secret-key-file",
                     keys.secret_file, out, check=False, env=env)  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "no AWS credentials found" in line
    for where in ("AWS_ACCESS_KEY_ID", str(tmp_path / "aws-credentials"), "instance"):
        assert where in line
    assert line.endswith(service_hint)
    assert s3.get(bucket, "nix-cache-info") is None


def test_the_daemon_waits_for_credentials_and_uploads_once_they_appear(
    uploader: UploaderRun, s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    config = tmp_path / "retry.toml"
    config.write_text("retry-min = 0.2\nretry-max = 1.0\n")
    (port,) = free_ports(1)
    uploader.extra_args = ["--config", str(config), "--metrics", str(port)]
    uploader.env = env_without_credentials(tmp_path)
    (out,) = build(trivial_expr("credentials-later"), hook=str(uploader.hook))
    uploader.start()
    deadline = time.monotonic() + 30
    while not status(uploader).get("cache_problem"):
        assert time.monotonic() < deadline, uploader.log()
        time.sleep(0.2)
    time.sleep(3)  # several probes with backoff
    assert uploader.process is not None and uploader.process.poll() is None, uploader.log()
    report = status(uploader)
    assert "no AWS credentials found" in report["cache_problem"]
    # The environment file beside the config file, where `install --config` puts it.
    assert f"for the service put them into {tmp_path}/environment" in report["cache_problem"]
    assert report["pending"] == 1 and report["quarantined"] == []
    assert "problem:     " in run_cli("status", *uploader.queue_args()).stdout
    assert scrape(port)["nix_cache_uploader_cache_usable"] == 0
    log = uploader.log()
    assert "Traceback" not in log
    assert log.count("no AWS credentials found") == 1, log

    # An operator fills in the credentials (the test servers take any).
    (tmp_path / "aws-credentials").write_text(
        "[default]\naws_access_key_id = later\naws_secret_access_key = later\n"
    )
    uploader.wait_drained(timeout=120)
    assert s3.get(bucket, f"{hash_part(out)}.narinfo") is not None
    assert status(uploader)["cache_problem"] is None
    assert scrape(port)["nix_cache_uploader_cache_usable"] == 1
    assert "the cache takes the requests again" in uploader.log()
