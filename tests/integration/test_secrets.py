"""No credential in any output (invariant 10), under every kind of failure.

Each failure is forced through the fault proxy (or a closed port) with
logging at its most verbose; then everything the program wrote (stderr, the
log, status.json, `status`) is searched for signed query strings, the access
key id and the secret access key.  A retried request also says so at most
once at WARNING: urllib3's per-attempt "Retrying …" lines quote the whole
presigned URL.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import time
import traceback
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.cli import KeyPair, run_cli
from tests.support.daemon import UploaderRun
from tests.support.faults import FaultProxy, Rule
from tests.support.nix import build, trivial_expr
from tests.support.services import free_ports
from uploader._exceptions import TargetError
from uploader.targets.s3 import S3Target
from uploader.targets.url import parse_store_url

pytestmark = [pytest.mark.integration, pytest.mark.seaweedfs_only]

# SeaweedFS accepts any credentials: these look like real ones, so that a
# leak of either would be found wherever it went.
KEY_ID = "AKIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16))
SECRET = secrets.token_urlsafe(30).replace("-", "+").replace("_", "/")
# Persistent faults: every request of the kind fails, so the command fails.
KINDS = {
    "forbidden": Rule("forbidden", count=10**6),
    "error": Rule("error", count=10**6),
    "slowdown": Rule("slowdown", count=10**6, seconds=0),
    "reset mid-upload": Rule("drop-request", "PUT", count=10**6),
}


def assert_no_secret(text: str, where: str) -> None:
    lowered = text.lower()
    for needle in ("x-amz-", "signature=", KEY_ID, SECRET, quote(SECRET, safe="")):
        assert needle.lower() not in lowered, f"{needle!r} in {where}:\n{text}"


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    return dict(os.environ)


@pytest.fixture
def fresh_path(nix_daemon: object) -> str:
    (path,) = build(trivial_expr())
    return path


def closed_port_url() -> str:
    (port,) = free_ports(1)
    return f"s3://nobody-home?endpoint=http://127.0.0.1:{port}&region=us-east-1"


@pytest.mark.parametrize("kind", ["refused", *KINDS])
def test_push_writes_no_secret(
    faults: FaultProxy,
    bucket: str,
    keys: KeyPair,
    fresh_path: str,
    credentials: dict[str, str],
    kind: str,
) -> None:
    if kind == "refused":
        url = closed_port_url()
    else:
        faults.add(KINDS[kind])
        url = faults.store_url(bucket)
    args = ["push", "--to", url, "--secret-key-file", keys.secret_file, fresh_path]

    loud = run_cli(*args, "-vv", check=False, env=credentials)
    assert loud.returncode == 1, loud.stderr
    assert_no_secret(loud.stderr, "push -vv")
    assert "DEBUG" in loud.stderr, "not at debug level"

    quiet = run_cli(*args, check=False, env=credentials)
    assert quiet.returncode == 1
    assert_no_secret(quiet.stderr, "push")
    assert "Retrying" not in quiet.stderr, "urllib3's per-attempt warnings"
    # The one path's error and the summary; nothing per attempt, nothing twice.
    assert len(quiet.stderr.splitlines()) <= 2, quiet.stderr


@pytest.mark.parametrize("kind", ["stall", *KINDS])
def test_failed_requests_carry_no_secret(
    faults: FaultProxy, bucket: str, credentials: dict[str, str], kind: str
) -> None:
    """The exceptions themselves, with their whole chain of causes, as a
    traceback would print them unscrubbed."""
    faults.add(Rule("stall", count=10**6, seconds=3) if kind == "stall" else KINDS[kind])
    url = parse_store_url(faults.store_url(bucket))
    target = S3Target(url, max_attempts=2, read_timeout=1)
    with pytest.raises(TargetError) as error:
        target.put_bytes("abc.narinfo", b"x", "text/x-nix-narinfo")
    assert_no_secret("".join(traceback.format_exception(error.value)), kind)
    # Reads fail too, except where a 403 just means "absent" (or "not listable").
    for attempt in (
        lambda: target.list_keys(""),
        lambda: target.get("nix-cache-info"),
        lambda: target.exists("abc.narinfo"),
    ):
        try:
            attempt()
        except TargetError as e:
            assert_no_secret("".join(traceback.format_exception(e)), kind)


@pytest.mark.slow
def test_daemon_writes_no_secret(
    faults: FaultProxy, uploader: UploaderRun, bucket: str, credentials: dict[str, str]
) -> None:
    faults.add(Rule("slowdown", "PUT", count=10**6, seconds=0))
    uploader.store_url = faults.store_url(bucket)
    uploader.start(["-vv"])
    build(trivial_expr(), hook=str(uploader.hook))
    status_file = uploader.state_dir / "status.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = json.loads(status_file.read_text())
        if any(r["attempts"] >= 2 for r in status["retrying"]):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no entry retried twice:\n{uploader.log()}")
    shown = run_cli("status", *uploader.queue_args(), env=credentials).stdout
    shown_json = run_cli("status", "--json", *uploader.queue_args(), env=credentials).stdout
    assert uploader.stop() == 0

    assert "SlowDown" in status_file.read_text()
    for text, where in [
        (uploader.log(), "the daemon's log"),
        (status_file.read_text(), "status.json"),
        (shown, "status"),
        (shown_json, "status --json"),
    ]:
        assert_no_secret(text, where)
    warnings = [line for line in uploader.log().splitlines() if line.startswith("WARNING")]
    assert not [w for w in warnings if "Retrying" in w], "urllib3's per-attempt warnings"


def test_scrubbed_logs_keep_the_object_name(
    tmp_path: Path, credentials: dict[str, str], keys: KeyPair, fresh_path: str
) -> None:
    """Scrubbing removes the signature, not what a reader needs: which
    object, on which endpoint, failed how."""
    url = closed_port_url()
    result = run_cli("push", "--to", url, "--secret-key-file", keys.secret_file, fresh_path,
                     "-vv", check=False, env=credentials)  # fmt: skip
    assert "s3://nobody-home/" in result.stderr
    retries = [line for line in result.stderr.splitlines() if "attempt 2 of" in line]
    assert retries, f"-vv shows each retry:\n{result.stderr}"
    assert "s3://nobody-home/" in retries[0] and "Connect" in retries[0]
    assert url.split("endpoint=")[1].split("&")[0].removeprefix("http://") in result.stderr
