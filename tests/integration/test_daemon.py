"""The product end to end: nix-daemon builds with the hook, the uploader
daemon drains the spool into S3 (SeaweedFS and moto), a fresh store substitutes — across
a stopped uploader, SIGKILLs mid-drain and an S3 outage."""

from __future__ import annotations

import random
import resource
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.support.cli import KeyPair
from tests.support.daemon import UploaderRun
from tests.support.nix import build, dotted_expr, nix_path_info, substitute
from tests.support.services import S3Server, SeaweedFS, nix_client_env
from uploader.narinfo import NarInfo
from uploader.storepath import hash_part

pytestmark = pytest.mark.integration


def dag_expr(count: int, *, payload_bytes: int = 0, salt: str | None = None) -> str:
    """``count`` derivations, each depending on up to three earlier ones; the
    expression is the list of all of them, so nix-build builds every one."""
    salt = salt or uuid.uuid4().hex[:10]
    nodes = []
    for i in range(count):
        deps = sorted({d for d in (i - 1, i // 2, i // 3) if 0 <= d < i})
        refs = " ".join(f"echo ${{n{d}}} >> $out/deps;" for d in deps)
        payload = f"head -c {payload_bytes} /dev/urandom > $out/payload;" if payload_bytes else ""
        nodes.append(
            f'n{i} = derivation {{ name = "dag-{salt}-{i}"; system = builtins.currentSystem;'
            f' builder = "/bin/sh"; PATH = "/usr/bin:/bin";'
            f' args = ["-c" "mkdir $out; echo {i} > $out/id; {refs} {payload}"]; }};'
        )
    body = "\n  ".join(nodes)
    return f"let\n  {body}\nin [ {' '.join(f'n{i}' for i in range(count))} ]"


def assert_bucket_consistent(s3: S3Server, bucket: str) -> int:
    """Invariants 1 and 2 as a substituter sees them: every visible narinfo
    has its complete NAR and its references' narinfos.  Returns how many."""
    client = s3.client()
    objects: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            objects[obj["Key"]] = obj["Size"]
    narinfos = [k for k in objects if k.endswith(".narinfo")]
    for key in narinfos:
        text = s3.get(bucket, key)
        assert text is not None, f"{key} listed but not readable"
        info = NarInfo.parse(text.decode())
        assert objects.get(info.url) == info.file_size, f"{key}: NAR {info.url} incomplete"
        for ref in info.references:
            assert f"{ref[:32]}.narinfo" in objects, f"{key} visible before its reference {ref}"
    return len(narinfos)


def assert_substitutes(
    s3: S3Server, bucket: str, paths: list[str], keys: KeyPair, dest: Path
) -> None:
    copied = substitute(s3.http_url(bucket), paths, keys.public, dest=str(dest))
    assert copied.returncode == 0, copied.stderr
    missing = [p for p in paths if not Path(f"{dest}{p}").exists()]
    assert not missing, f"not substituted: {missing}"


def test_dag_built_with_the_hook_lands_in_the_cache(
    uploader: UploaderRun, s3: S3Server, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    uploader.start()
    outputs = build(dag_expr(60), hook=str(uploader.hook))
    assert len(outputs) == 60
    uploader.wait_drained()
    assert not (uploader.spool / "quarantine").exists() or not any(
        (uploader.spool / "quarantine").iterdir()
    )
    # Nix 2.8 gave the hook no OUT_PATHS: every output was resolved from its .drv.
    assert "out " not in "".join(p.read_text() for p in uploader.spool.glob("*.entry"))
    assert_substitutes(s3, bucket, outputs, keys, tmp_path / "fresh")
    assert assert_bucket_consistent(s3, bucket) == 60
    assert uploader.stop() == 0


def test_builds_go_on_while_the_uploader_is_down(
    uploader: UploaderRun, s3: S3Server, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    outputs = build(dag_expr(8), hook=str(uploader.hook))
    assert len(outputs) == 8
    assert len(uploader.pending()) == 8, "one spool entry per build"
    uploader.start()
    uploader.wait_drained()
    assert uploader.pending() == []
    assert_substitutes(s3, bucket, outputs, keys, tmp_path / "fresh")


def test_running_out_of_open_files_costs_retries_not_paths(
    uploader: UploaderRun, s3: S3Server, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    """The daemon raises its soft limit on open files; a NAR that cannot be
    opened for want of them all the same is tried again, not quarantined:
    the machine ran out, the path is fine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # as systemd and shells give
    try:
        uploader.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert uploader.process is not None
    (limit,) = [x for x in Path(f"/proc/{uploader.process.pid}/limits").read_text().splitlines()
                if x.startswith("Max open files")]  # fmt: skip
    assert int(limit.split()[3]) == min(8192, hard), "the soft limit is raised at start"
    assert uploader.stop() == 0

    outputs = build(dag_expr(80), hook=str(uploader.hook))
    # Far fewer than 80 uploads at once need, as an administrator's hard limit could be.
    limited = tmp_path / "python-with-few-files"
    limited.write_text(f'#!/bin/sh\nexec prlimit --nofile=40:40 -- {uploader.python} "$@"\n')
    limited.chmod(0o755)
    uploader.python = str(limited)
    uploader.start()
    uploader.wait_drained(timeout=180)
    log = uploader.log()
    assert "Too many open files (out of this process's open-file limit" in log
    assert "quarantined" not in log
    assert not (uploader.spool / "quarantine").exists() or not any(
        (uploader.spool / "quarantine").iterdir()
    )
    assert_substitutes(s3, bucket, outputs, keys, tmp_path / "fresh")


@pytest.mark.slow
def test_sigkill_during_drain_loses_nothing(
    uploader: UploaderRun, s3: S3Server, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    outputs = build(dag_expr(30, payload_bytes=3_000_000), hook=str(uploader.hook))
    assert len(uploader.pending()) == 30

    observations = 0
    stop = threading.Event()
    errors: list[BaseException] = []

    def observe() -> None:
        nonlocal observations
        while not stop.is_set():
            try:
                assert_bucket_consistent(s3, bucket)
                observations += 1
            except BaseException as e:  # reported in the main thread
                errors.append(e)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=observe)
    watcher.start()
    try:
        rng = random.Random(1234)
        for _ in range(4):
            uploader.start()
            time.sleep(rng.uniform(0.3, 1.5))
            uploader.kill()
        uploader.start()
        uploader.wait_drained()
    finally:
        stop.set()
        watcher.join()
    assert not errors, errors[0]
    assert observations > 10
    assert_bucket_consistent(s3, bucket)
    assert_substitutes(s3, bucket, outputs, keys, tmp_path / "fresh")


@pytest.mark.slow
@pytest.mark.seaweedfs_only  # stops and restarts the server; moto would forget the bucket
def test_s3_outage_is_waited_out(
    uploader: UploaderRun, seaweedfs: SeaweedFS, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    before = build(dag_expr(10, payload_bytes=500_000), hook=str(uploader.hook))
    uploader.start(["--compression", "none"])
    seaweedfs.stop()
    try:
        # Builds during the outage succeed; their entries wait.
        during = build(dag_expr(5), hook=str(uploader.hook))
        assert len(during) == 5
        time.sleep(30)
        assert uploader.process is not None and uploader.process.poll() is None
        assert len(uploader.pending()) >= 5
    finally:
        seaweedfs.start()
    uploader.wait_drained(timeout=300)
    assert "retrying in" in uploader.log()
    assert_bucket_consistent(seaweedfs, bucket)
    assert_substitutes(seaweedfs, bucket, before + during, keys, tmp_path / "fresh")


def test_a_bucket_deleted_and_made_again_gets_its_nix_cache_info_again(
    uploader: UploaderRun, s3: S3Server, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    """Nix takes a bucket for a cache only with nix-cache-info: a daemon
    whose bucket was deleted under it writes it again (and the layout) once
    the bucket is back, as it did for the new one."""
    config = tmp_path / "retry.toml"
    config.write_text("retry-min = 0.2\nretry-max = 1.0\n")
    uploader.extra_args = ["--config", str(config)]
    uploader.start()
    first = build(dag_expr(1), hook=str(uploader.hook))
    uploader.wait_drained(timeout=120)
    client = s3.client()
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)

    later = build(dag_expr(1), hook=str(uploader.hook))
    deadline = time.monotonic() + 60
    while "the bucket does not exist" not in uploader.log():
        assert time.monotonic() < deadline, uploader.log()
        time.sleep(0.2)
    s3.create_bucket(bucket)
    uploader.wait_drained(timeout=120)

    assert s3.get(bucket, "nix-cache-info") is not None, uploader.log()
    assert client.head_object(Bucket=bucket, Key="lifecycle/layout.json")
    assert_bucket_consistent(s3, bucket)
    assert_substitutes(s3, bucket, later, keys, tmp_path / "fresh")
    assert first != later


def test_queued_outputs_are_gc_rooted_until_uploaded(
    uploader: UploaderRun, s3: S3Server, bucket: str
) -> None:
    """While an entry waits (here: the cache is unreachable), its outputs are
    roots that Nix's garbage collector honours; once uploaded, they are gone."""
    roots_dir = Path(f"/nix/var/nix/gcroots/ncu-test-{uuid.uuid4().hex[:8]}")
    roots_dir.mkdir()
    uploader.extra_args = ["--gc-roots-dir", str(roots_dir)]
    uploader.store_url = "s3://unreachable?endpoint=http://127.0.0.1:9&region=us-east-1"
    try:
        (out,) = build(dag_expr(1), hook=str(uploader.hook))
        uploader.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not list(roots_dir.iterdir()):
            time.sleep(0.1)
        roots = subprocess.run(
            ["nix-store", "--gc", "--print-roots"], env=nix_client_env(),
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f"{roots_dir}/{Path(out).name} -> {out}" in roots
        uploader.stop()

        uploader.store_url = s3.store_url(bucket)
        uploader.start()
        uploader.wait_drained()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and list(roots_dir.iterdir()):
            time.sleep(0.1)
        assert list(roots_dir.iterdir()) == []
        assert s3.get(bucket, f"{hash_part(out)}.narinfo") is not None
    finally:
        uploader.kill()
        shutil.rmtree(roots_dir, ignore_errors=True)


def test_names_that_start_with_a_period_are_uploaded_like_any_other(
    uploader: UploaderRun, s3: S3Server, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    uploader.start()
    (top,) = build(dotted_expr(uuid.uuid4().hex[:8]), hook=str(uploader.hook))
    closure = nix_path_info([top], recursive=True)
    assert any(p.split("-", 1)[1].startswith(".hidden-") for p in closure)
    uploader.wait_drained(timeout=120)
    assert not (uploader.spool / "quarantine").exists() or not any(
        (uploader.spool / "quarantine").iterdir()
    )
    assert_substitutes(s3, bucket, sorted(closure), keys, tmp_path / "fresh")
    assert uploader.stop() == 0
