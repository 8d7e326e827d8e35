"""Uploads through an S3 server that misbehaves: 503 SlowDown with
Retry-After, 500, connections cut halfway through a request or a response,
stalls.  Each push and daemon run must end with every path in the cache, and
at no moment may a narinfo have been written before its NAR was complete."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.test_daemon import assert_bucket_consistent, assert_substitutes, dag_expr
from tests.support.cli import KeyPair, run_cli
from tests.support.daemon import UploaderRun
from tests.support.faults import FaultProxy, Rule
from tests.support.nix import build, multi_output_expr, random_blob_expr, trivial_expr
from tests.support.services import nix_client_env
from uploader.narinfo import NarInfo
from uploader.storepath import hash_part

# The proxy stands in front of SeaweedFS: what is tested is the client's
# handling of faults, not a second server's.
pytestmark = [pytest.mark.integration, pytest.mark.seaweedfs_only]

KINDS = ["slowdown", "error", "drop-request", "drop-response", "stall"]


def assert_written_in_order(proxy: FaultProxy, bucket: str) -> int:
    """Invariants 1 and 2 in the order the server accepted writes: each
    narinfo after its whole NAR and after its references' narinfos."""
    done: dict[str, int] = {}
    for i, r in enumerate(proxy.accepted):
        key = r.path.removeprefix(f"/{bucket}/")
        single_put = r.method == "PUT" and "uploadId=" not in r.query
        multipart_completed = r.method == "POST" and "uploadId=" in r.query
        if single_put or multipart_completed:
            done.setdefault(key, i)
    narinfos = [k for k in done if k.endswith(".narinfo")]
    for key in narinfos:
        text = proxy.get(bucket, key)
        assert text is not None, key
        info = NarInfo.parse(text.decode())
        assert done.get(info.url, len(done) + 1) < done[key], f"{key} written before {info.url}"
        for ref in info.references:
            ref_key = f"{ref[:32]}.narinfo"
            if ref_key != key:
                assert done.get(ref_key, len(done) + 1) < done[key], f"{key} before {ref_key}"
    return len(narinfos)


def rules_for(kind: str, count: int = 2) -> list[Rule]:
    """``count`` faults of one kind on NAR and narinfo writes, one on a HEAD."""
    return [
        Rule(kind, "PUT", r"/nar/", count=count),
        Rule(kind, "PUT", r"\.narinfo(\?|$)", count=count),
        Rule(kind, "HEAD", r"/nix-cache-info(\?|$)", count=1),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_push_survives(
    faults: FaultProxy, bucket: str, keys: KeyPair, tmp_path: Path, kind: str
) -> None:
    expr = multi_output_expr()
    out = build(expr)[0]
    faults.add(*rules_for(kind))

    result = run_cli("push", "--to", faults.store_url(bucket), "--secret-key-file",
                     keys.secret_file, out, check=False)  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "uploaded 3 paths" in result.stderr
    assert [r.hits for r in faults.rules] == [r.count for r in faults.rules], "faults not met"
    assert assert_written_in_order(faults, bucket) == 3
    assert assert_bucket_consistent(faults, bucket) == 3
    assert_substitutes(faults, bucket, [out], keys, tmp_path / "fresh")


def test_multipart_upload_survives_a_cut_part_and_a_failed_completion(
    faults: FaultProxy, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    (path,) = build(random_blob_expr("large", 20_000_000))
    faults.add(
        Rule("drop-request", "PUT", r"[?&]partNumber=2(&|$)", count=1),
        Rule("error", "POST", r"uploadId=", count=1),
    )

    pushed = run_cli("push", "-vv", "--to", faults.store_url(bucket, compression="none"),
                     "--secret-key-file", keys.secret_file, path)  # fmt: skip

    assert [r.hits for r in faults.rules] == [1, 1], "faults not met"
    # Each retry says so, as the small requests' do, and names no upload id.
    retried = [line for line in pushed.stderr.splitlines() if "; attempt 2 of " in line]
    assert any(f"UploadPart s3://{bucket}/nar/" in line for line in retried), pushed.stderr
    assert any(
        f"CompleteMultipartUpload s3://{bucket}/nar/" in line and ": 500 InternalError" in line
        for line in retried
    ), pushed.stderr
    assert "uploadId" not in pushed.stderr
    assert assert_written_in_order(faults, bucket) == 1
    assert assert_bucket_consistent(faults, bucket) == 1
    assert_substitutes(faults, bucket, [path], keys, tmp_path / "fresh")


def test_daemon_survives_every_kind_at_once(
    faults: FaultProxy, uploader: UploaderRun, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    # More faults than one request's retries absorb: some entries fail an
    # attempt and wait for the daemon's own backoff.
    for kind in KINDS:
        faults.add(*rules_for(kind, count=3))
    uploader.store_url = faults.store_url(bucket)
    uploader.start()
    outputs = build(dag_expr(12), hook=str(uploader.hook))
    uploader.wait_drained(timeout=300)

    assert all(r.hits for r in faults.rules if r.method == "PUT"), "faults not met"
    assert assert_written_in_order(faults, bucket) == 12
    assert assert_bucket_consistent(faults, bucket) == 12
    assert_substitutes(faults, bucket, outputs, keys, tmp_path / "fresh")
    assert uploader.stop() == 0


def test_a_nix_cache_info_push_may_not_read_is_not_overwritten(
    faults: FaultProxy, bucket: str, keys: KeyPair
) -> None:
    """A user without s3:GetObject gets 403 for nix-cache-info whether or
    not it is there: the operator's own is kept, and push says why."""
    own = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n"
    faults.client().put_object(Bucket=bucket, Key="nix-cache-info", Body=own)
    (out,) = build(multi_output_expr(), attr="lib")
    faults.add(Rule("denied", "HEAD", r"/nix-cache-info(\?|$)", count=100),
               Rule("denied", "GET", r"/nix-cache-info(\?|$)", count=100))  # fmt: skip

    result = run_cli("push", "--to", faults.store_url(bucket), "--secret-key-file",
                     keys.secret_file, out)  # fmt: skip

    assert faults.rules[0].hits >= 1 and faults.rules[1].hits >= 1, "the faults were not met"
    assert faults.get(bucket, "nix-cache-info") == own
    assert "cannot tell whether" in result.stderr and "denied (403); not writing one" in (
        result.stderr
    )
    assert "uploaded 1 path" in result.stderr


def test_a_clock_off_by_hours_is_named_as_such_and_the_daemon_waits_for_it(
    faults: FaultProxy, uploader: UploaderRun, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    """S3 refuses every request of a machine whose clock is off (its HEADs
    answer a bare 403): the message names the clock, in one line, not a
    permission; the daemon keeps the entries until the clock is right."""
    (out,) = build(multi_output_expr(), attr="lib")
    faults.add(Rule("skewed", count=10**6))
    result = run_cli("push", "--to", faults.store_url(bucket), "--secret-key-file",
                     keys.secret_file, out, check=False)  # fmt: skip
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert "RequestTimeTooSkewed" in line and "this machine's clock is more than 15 minutes" in line
    assert "NTP" in line and "denied" not in line and "&#39;" not in line

    config = tmp_path / "retry.toml"
    config.write_text("retry-min = 0.2\nretry-max = 1.0\n")
    uploader.extra_args = ["--config", str(config)]
    uploader.store_url = faults.store_url(bucket)
    uploader.start()
    (later,) = build(trivial_expr("after-skew"), hook=str(uploader.hook))
    deadline = time.monotonic() + 60
    while "clock" not in (problem := _status(uploader).get("cache_problem") or ""):
        assert time.monotonic() < deadline, uploader.log()
        time.sleep(0.2)
    assert "RequestTimeTooSkewed" in problem
    assert len(list(uploader.spool.glob("*.entry"))) == 1
    faults.rules[0].count = 0  # the clock is set right
    uploader.wait_drained(timeout=120)
    assert "the cache takes the requests again" in uploader.log()
    assert assert_bucket_consistent(faults, bucket) == 1
    assert_substitutes(faults, bucket, [later], keys, tmp_path / "fresh")
    assert uploader.stop() == 0


def _status(uploader: UploaderRun) -> dict[str, object]:
    report: dict[str, object] = json.loads(
        run_cli("status", "--json", *uploader.queue_args()).stdout
    )
    return report


def test_a_stop_past_the_drain_timeout_aborts_a_large_upload_and_leaves_no_orphan(
    faults: FaultProxy, uploader: UploaderRun, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    """SIGTERM while a large NAR's part is stuck: past drain-timeout the
    daemon stops, its upload is aborted (not completed as a NAR no narinfo
    names), and the entry stays to be uploaded at the next start."""
    config = tmp_path / "drain.toml"
    config.write_text("drain-timeout = 0.5\n")
    uploader.extra_args = ["--config", str(config)]
    uploader.store_url = faults.store_url(bucket, compression="none")
    path = _build_with_its_second_part_stalled(faults, uploader, "stopped")
    assert uploader.stop() == 0
    _nothing_left_and_uploaded_at_restart(faults, uploader, bucket, keys, tmp_path, path)


def test_a_forced_stop_aborts_the_uploads_under_way(
    faults: FaultProxy, uploader: UploaderRun, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    """A second stop request does not wait for the requests under way; it
    left their multipart uploads in the bucket, invisible and billed until
    a lifecycle rule removes them."""
    uploader.store_url = faults.store_url(bucket, compression="none")
    path = _build_with_its_second_part_stalled(faults, uploader, "forced")
    assert uploader.process is not None
    uploader.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    uploader.process.send_signal(signal.SIGTERM)
    assert uploader.process.wait(timeout=30) == 1
    assert "aborted 1 multipart upload under way" in uploader.log(), uploader.log()
    _nothing_left_and_uploaded_at_restart(faults, uploader, bucket, keys, tmp_path, path)


def _build_with_its_second_part_stalled(
    faults: FaultProxy, uploader: UploaderRun, name: str
) -> str:
    """Start the daemon and build a 40 MB output through its hook, the
    proxy holding the NAR's second part for 4 s; the output, once held."""
    faults.add(Rule("stall", "PUT", r"[?&]partNumber=2(&|$)", seconds=4))
    uploader.start()
    (path,) = build(random_blob_expr(name, 40_000_000), hook=str(uploader.hook))
    deadline = time.monotonic() + 60
    while not faults.rules[0].hits:
        assert time.monotonic() < deadline, f"the part never stalled:\n{uploader.log()}"
        time.sleep(0.05)
    return path


def _nothing_left_and_uploaded_at_restart(
    faults: FaultProxy,
    uploader: UploaderRun,
    bucket: str,
    keys: KeyPair,
    tmp_path: Path,
    path: str,
) -> None:
    """Once the held part ends: no NAR, no incomplete upload, the entry
    still queued; a restart uploads it, and it substitutes."""
    time.sleep(4)  # the stalled part ends; nothing may complete after it
    client = faults.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix="nar/").get("Contents", [])
    assert listed == [], f"an orphan NAR: {listed}\n{uploader.log()}"
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert len(list(uploader.spool.glob("*.entry"))) == 1

    uploader.start()
    uploader.wait_drained(timeout=120)
    assert assert_bucket_consistent(faults, bucket) == 1
    assert_substitutes(faults, bucket, [path], keys, tmp_path / "fresh")


def test_push_stopped_by_sigterm_aborts_its_upload_as_ctrl_c_does(
    faults: FaultProxy, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    """A CI job's timeout, `timeout(1)` and systemd stop `push` with
    SIGTERM: it died on the spot and left an incomplete multipart upload,
    invisible and billed until a lifecycle rule removes it."""
    (path,) = build(random_blob_expr("terminated", 40_000_000))
    faults.add(Rule("stall", "PUT", r"[?&]partNumber=2(&|$)", seconds=4))
    url = faults.store_url(bucket, compression="none")
    push = subprocess.Popen(
        [sys.executable, "-m", "uploader", "push", "--to", url,
         "--secret-key-file", keys.secret_file, path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not faults.rules[0].hits:
            assert push.poll() is None and time.monotonic() < deadline, "the part never stalled"
            time.sleep(0.05)
        push.send_signal(signal.SIGTERM)
        _, stderr = push.communicate(timeout=60)
    finally:
        if push.poll() is None:
            push.kill()
            push.wait()
    assert push.returncode == 128 + signal.SIGTERM, stderr
    assert "push stopped by SIGTERM; its uploads under way were aborted" in stderr
    assert "Traceback" not in stderr
    time.sleep(4)  # the stalled part ends; nothing may complete after it
    client = faults.client()
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=bucket, Prefix="nar/").get("Contents", []) == []
    assert faults.get(bucket, f"{hash_part(path)}.narinfo") is None

    run_cli("push", "--to", url, "--secret-key-file", keys.secret_file, path)
    assert assert_bucket_consistent(faults, bucket) == 1
    assert_substitutes(faults, bucket, [path], keys, tmp_path / "fresh")


def test_a_build_that_arrives_while_the_cache_stalls_is_rooted_at_once(
    faults: FaultProxy, uploader: UploaderRun, bucket: str
) -> None:
    """A batch held up by a slow cache took minutes in which the builds
    queued behind it had no GC root: Nix's garbage collector could take
    them. They are rooted as they arrive."""
    roots_dir = Path(f"/nix/var/nix/gcroots/ncu-test-{uuid.uuid4().hex[:8]}")
    roots_dir.mkdir()
    uploader.extra_args = ["--gc-roots-dir", str(roots_dir)]
    uploader.store_url = faults.store_url(bucket)
    faults.add(Rule("stall", "PUT", r"\.narinfo$", seconds=8))
    try:
        uploader.start()
        (first,) = build(trivial_expr("stalled-first"), hook=str(uploader.hook))
        deadline = time.monotonic() + 30
        while not faults.rules[0].hits:
            assert time.monotonic() < deadline, f"the narinfo never stalled:\n{uploader.log()}"
            time.sleep(0.05)
        (later,) = build(trivial_expr("stalled-later"), hook=str(uploader.hook))
        while not (roots_dir / Path(later).name).is_symlink():
            assert time.monotonic() < deadline, f"{later} was not rooted:\n{uploader.log()}"
            time.sleep(0.05)
        collected = subprocess.run(["nix-store", "--delete", later], env=nix_client_env(),
                                   capture_output=True, text=True)  # fmt: skip
        assert collected.returncode != 0 and "still alive" in collected.stderr, collected
        uploader.wait_drained(timeout=120)
        for path in (first, later):
            assert faults.get(bucket, f"{hash_part(path)}.narinfo") is not None
        deadline = time.monotonic() + 10
        while list(roots_dir.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(roots_dir.iterdir()) == []
    finally:
        uploader.kill()
        shutil.rmtree(roots_dir, ignore_errors=True)


def test_a_bucket_refusing_writes_costs_a_line_per_attempt_not_per_build(
    faults: FaultProxy, uploader: UploaderRun, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    # Every write refused (403 AccessDenied, as for a policy without
    # s3:PutObject) while builds keep arriving: they wait with the failed
    # ones and are tried with them, so the log and the requests grow with
    # the attempts, not with the builds.
    denied = Rule("denied", "PUT", "", count=10**9)
    faults.add(denied)
    uploader.store_url = faults.store_url(bucket)
    uploader.start()
    outputs = []
    for _ in range(6):  # waves of builds
        outputs += build(dag_expr(4), hook=str(uploader.hook))
        time.sleep(0.5)
    failed = [line for line in uploader.log().splitlines() if "failed, retrying in" in line]
    assert 1 <= len(failed) <= 6, failed  # 3 here; 21 when each build tried on its own
    assert all("AccessDenied" in line and "s3:PutObject" in line for line in failed), failed
    assert denied.hits <= 2 * len(failed), "one refused write per attempt (and its retry)"
    denied.count = 0  # writes allowed again
    run_cli("retry", *uploader.queue_args())
    uploader.wait_drained(timeout=120)
    assert_substitutes(faults, bucket, outputs, keys, tmp_path / "fresh")
