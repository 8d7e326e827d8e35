"""The queue commands a CI job and an operator use around the daemon:
`status`, `wait`, and `run`'s settings from flags and the config file."""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.support.cli import KeyPair, run_cli
from tests.support.daemon import UploaderRun
from tests.support.entries import entry_bytes, write_entry
from tests.support.nix import build, substitute, trivial_expr
from tests.support.services import SeaweedFS
from tests.support.tmpfs import small_tmpfs
from uploader.cli import EXIT_FAILURE, EXIT_TIMEOUT, EXIT_USAGE, main
from uploader.nixbase32 import ALPHABET
from uploader.storepath import hash_part

# About the spool, the command line and users, not S3: one S3 server is enough.
pytestmark = [pytest.mark.integration, pytest.mark.seaweedfs_only]


def _drop_entry(spool: Path, name: str, *paths: str) -> None:
    write_entry(spool / name, entry_bytes(*(f"out {p}" for p in paths)))


def _ghost_path() -> str:
    return f"/nix/store/{''.join(random.choices(ALPHABET, k=32))}-ghost"


def _status(uploader: UploaderRun) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(run_cli("status", "--json", *uploader.queue_args()).stdout)
    return report


def _settled_status(uploader: UploaderRun, timeout: float = 10) -> dict[str, Any]:
    """The status once the daemon has published its idle state (it writes
    status.json about once a second, so right after `wait` it may lag)."""
    deadline = time.monotonic() + timeout
    while True:
        report = _status(uploader)
        if (
            report.get("in_flight") == 0
            and not report.get("retrying")
            and (report.get("uploaded_paths"))
        ):
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"status did not settle: {report}")
        time.sleep(0.2)


def _write_toml(path: Path, **settings: str) -> Path:
    # JSON string syntax is valid TOML for these plain values.
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items()))
    return path


def _config_for(uploader: UploaderRun, store_url: str, secret_key_file: str) -> dict[str, str]:
    return {
        "to": store_url,
        "secret-key-file": secret_key_file,
        "spool": str(uploader.spool),
        "state-dir": str(uploader.state_dir),
        "gc-roots-dir": str(uploader.gc_roots),
    }


def test_status_json_follows_the_daemon(
    uploader: UploaderRun, seaweedfs: SeaweedFS, bucket: str
) -> None:
    uploader.start()
    ghost = _ghost_path()
    _drop_entry(uploader.spool, "ghost.entry", ghost)
    (out,) = build(trivial_expr("status"), hook=str(uploader.hook))
    uploader.wait_drained(timeout=120)

    report = _settled_status(uploader)
    assert report["daemon"] == "running"
    assert uploader.process is not None and report["pid"] == uploader.process.pid
    assert report["pending"] == 0
    assert report["in_flight"] == 0
    assert report["uploaded_paths"] >= 1
    assert [q["entry"] for q in report["quarantined"]] == ["ghost.entry"]
    assert "not valid in the local Nix store" in report["quarantined"][0]["reason"]
    assert any(ghost in e["error"] for e in report["last_errors"])
    assert seaweedfs.get(bucket, f"{hash_part(out)}.narinfo") is not None

    assert uploader.stop() == 0
    _drop_entry(uploader.spool, "later.entry", _ghost_path())
    report = _status(uploader)
    assert report["daemon"] == "stopped"
    assert report["pending"] == 1
    human = run_cli("status", *uploader.queue_args()).stdout
    assert "daemon:      stopped" in human
    assert "1 pending" in human


def test_wait_times_out_with_exit_3_when_entries_are_stuck(uploader: UploaderRun) -> None:
    # The daemon was never started: the entry cannot drain.
    _drop_entry(uploader.spool, "stuck.entry", _ghost_path())
    result = run_cli("wait", *uploader.queue_args(), "--timeout", "1", check=False, timeout=30)
    assert result.returncode == EXIT_TIMEOUT
    assert "timed out after 1s: 1 entry still queued" in result.stderr


def test_run_without_a_target_says_to_is_required(uploader: UploaderRun, tmp_path: Path) -> None:
    empty = _write_toml(tmp_path / "empty.toml")
    result = run_cli("run", "--config", str(empty), *uploader.queue_args(),
                     "--secret-key-file", uploader.secret_key_file, check=False)  # fmt: skip
    assert result.returncode in (EXIT_FAILURE, EXIT_USAGE)
    assert "--to is required" in result.stderr


def test_a_config_file_supplies_every_setting(
    uploader: UploaderRun, seaweedfs: SeaweedFS, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    settings = _config_for(uploader, seaweedfs.store_url(bucket), keys.secret_file)
    uploader.config_file = _write_toml(tmp_path / "config.toml", **settings)
    uploader.start()
    assert "--to" not in uploader.command()

    (out,) = build(trivial_expr("configured"), hook=str(uploader.hook))
    uploader.wait_drained(timeout=120)  # `wait --config` finds the spool there too
    dest = str(tmp_path / "fresh")
    copied = substitute(seaweedfs.http_url(bucket), [out], keys.public, dest=dest)
    assert copied.returncode == 0, copied.stderr
    assert _status(uploader)["daemon"] == "running"


def test_flags_override_the_config_file(
    uploader: UploaderRun, seaweedfs: SeaweedFS, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    other = seaweedfs.create_bucket(f"flag-{uuid.uuid4().hex[:12]}")
    settings = _config_for(uploader, seaweedfs.store_url(bucket), keys.secret_file)
    uploader.config_file = _write_toml(tmp_path / "config.toml", **settings)
    uploader.extra_args = ["--to", seaweedfs.store_url(other)]
    uploader.start()

    (out,) = build(trivial_expr("overridden"), hook=str(uploader.hook))
    uploader.wait_drained(timeout=120)
    narinfo = f"{hash_part(out)}.narinfo"
    assert seaweedfs.get(other, narinfo) is not None, uploader.log()
    assert seaweedfs.get(bucket, narinfo) is None


def test_an_unknown_setting_in_the_config_file_is_a_clear_error(
    uploader: UploaderRun, seaweedfs: SeaweedFS, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    settings = _config_for(uploader, seaweedfs.store_url(bucket), keys.secret_file)
    # A likely typo: the Python spelling of secret-key-file.
    settings["secret_key_file"] = settings.pop("secret-key-file")
    config = _write_toml(tmp_path / "config.toml", **settings)
    result = run_cli("run", "--config", str(config), check=False, timeout=60)
    assert result.returncode == EXIT_FAILURE
    assert str(config) in result.stderr
    assert "unknown setting 'secret_key_file' (did you mean 'secret-key-file'?)" in result.stderr
    assert not (uploader.state_dir / "status.json").exists()


def test_a_second_daemon_on_the_same_spool_refuses_naming_the_first(
    uploader: UploaderRun, tmp_path: Path
) -> None:
    uploader.start()
    assert uploader.process is not None
    second = subprocess.run(uploader.argv(), capture_output=True, text=True, timeout=60,
                            cwd=uploader.cwd)  # fmt: skip
    assert second.returncode == EXIT_FAILURE
    assert f"another nix-cache-uploader run (pid {uploader.process.pid})" in second.stderr
    assert str(uploader.spool) in second.stderr
    # The refused one wrote no status over the first one's.
    assert _status(uploader)["daemon"] == "running"
    assert _status(uploader)["pid"] == uploader.process.pid

    # Another spool but the same state directory: refused as well.
    other = UploaderRun(root=tmp_path / "other", store_url=uploader.store_url,
                        secret_key_file=uploader.secret_key_file)  # fmt: skip
    argv = other.argv()
    argv[argv.index("--state-dir") + 1] = str(uploader.state_dir)
    third = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=other.cwd)
    assert third.returncode == EXIT_FAILURE
    assert "already uses the state directory" in third.stderr

    # Its own spool and state directory, but the first one's GC roots: refused
    # before it could drop the roots of the first one's queued builds.
    (out,) = build(trivial_expr("shared-roots"))
    root = uploader.gc_roots / "queued-elsewhere"
    root.symlink_to(out)
    argv = other.argv()
    argv[argv.index("--gc-roots-dir") + 1] = str(uploader.gc_roots)
    fourth = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=other.cwd)
    assert fourth.returncode == EXIT_FAILURE
    assert f"already uses the gc-roots-dir {uploader.gc_roots}" in fourth.stderr
    assert "its own --spool, --state-dir and --gc-roots-dir" in fourth.stderr
    assert root.is_symlink()
    root.unlink()

    # Once the first stops, the lock is gone with it.
    assert uploader.stop() == 0
    uploader.process = None
    uploader.start()


def test_sighup_is_answered_with_a_line_and_the_daemon_keeps_serving(
    uploader: UploaderRun, seaweedfs: SeaweedFS, bucket: str
) -> None:
    uploader.start()
    assert uploader.process is not None
    os.kill(uploader.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "SIGHUP: rescanning the spool" not in uploader.log():
        assert uploader.process.poll() is None, uploader.log()
        assert time.monotonic() < deadline, uploader.log()
        time.sleep(0.05)
    (out,) = build(trivial_expr("after-hup"), hook=str(uploader.hook))
    uploader.wait_drained(timeout=120)
    assert seaweedfs.get(bucket, f"{hash_part(out)}.narinfo") is not None
    assert _status(uploader)["daemon"] == "running"


def test_a_full_state_directory_does_not_stop_uploads(
    uploader: UploaderRun, seaweedfs: SeaweedFS, bucket: str, tmp_path: Path
) -> None:
    """The state directory holds only a memory and the status: full from the
    start, the daemon warns once for each and uploads all the same; the
    status is written again once there is room."""
    paths = [build(trivial_expr(f"state-full-{i}"))[0] for i in range(3)]
    for i, path in enumerate(paths):
        _drop_entry(uploader.spool, f"full-{i}.entry", path)
    with small_tmpfs(uploader.state_dir, "64k"):
        filler = uploader.state_dir / "filler"
        with open(filler, "wb") as f, pytest.raises(OSError, match="No space"):
            f.write(b"\0" * (1 << 20))
        with open(uploader.log_path, "ab") as log:
            uploader.process = subprocess.Popen(
                uploader.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=uploader.cwd,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while uploader.pending() and time.monotonic() < deadline:
            assert uploader.process.poll() is None, uploader.log()
            time.sleep(0.2)
        assert uploader.pending() == [], uploader.log()
        filler.unlink()
        while "status written again" not in uploader.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert uploader.stop() == 0
        log_text = uploader.log()
    assert log_text.count("cannot use the state database") == 1
    assert "(database or disk is full)" in log_text
    assert log_text.count("cannot write status to") == 1, log_text
    assert "status written again" in log_text
    for path in paths:
        assert seaweedfs.get(bucket, f"{hash_part(path)}.narinfo") is not None


def test_a_daemon_that_cannot_write_its_status_is_running_and_a_hung_one_is_not(
    uploader: UploaderRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk the status cannot be replaced, but the daemon still
    touches it: `status` says it runs and how old its figures are. A daemon
    that hangs touches nothing, and is `not responding`."""
    monkeypatch.setattr(importlib.import_module("uploader.cli.daemon"), "_STALE_AFTER", 6.0)
    runner = CliRunner()

    def status(*extra: str) -> str:
        result = runner.invoke(main, ["status", *extra, *uploader.queue_args()])
        assert result.exit_code == 0, result.output
        return result.stdout

    status_file = uploader.state_dir / "status.json"
    with small_tmpfs(uploader.state_dir, "1m"):
        try:
            uploader.start()
            assert uploader.process is not None
            filler = uploader.state_dir / "filler"
            with open(filler, "wb") as f, pytest.raises(OSError, match="No space"):
                f.write(b"\0" * (2 << 20))
            deadline = time.monotonic() + 30
            while "cannot write status to" not in uploader.log():
                assert time.monotonic() < deadline, uploader.log()
                time.sleep(0.1)
            written = json.loads(status_file.read_text())["updated_at"]
            while time.time() - written < 7:
                time.sleep(0.2)
            after = time.time()
            while status_file.stat().st_mtime < after:  # touched again since
                assert time.monotonic() < deadline, uploader.log()
                time.sleep(0.2)
            report = json.loads(status("--json"))
            assert report["daemon"] == "running"
            assert report["status_behind"] >= 6
            assert report["updated_at"] == written
            text = status()
            assert "daemon:      running, but it has not been able to write its status for" in text
            assert f"(is {uploader.state_dir} full? see the daemon's log)" in text
            # Hung: nothing touches the file any more.
            os.kill(uploader.process.pid, signal.SIGSTOP)
            try:
                time.sleep(6.5)
                report = json.loads(status("--json"))
                assert report["daemon"] == "not responding"
                assert "status_behind" not in report
            finally:
                os.kill(uploader.process.pid, signal.SIGCONT)
            filler.unlink()
            deadline = time.monotonic() + 30
            while "status written again" not in uploader.log():
                assert time.monotonic() < deadline, uploader.log()
                time.sleep(0.1)
            assert json.loads(status("--json"))["daemon"] == "running"
            assert uploader.stop() == 0
        finally:
            uploader.kill()  # a failed check must not leave the tmpfs busy


def test_an_outage_lists_the_oldest_retrying_entries_and_counts_them_all(
    uploader: UploaderRun, seaweedfs: SeaweedFS, bucket: str
) -> None:
    # S3 unreachable (nothing listens on the port): every entry retries.
    # The status file lists the 100 oldest and counts them all; 5,000
    # listed made it 1.2 MB, rewritten every few seconds.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    uploader.store_url = f"s3://{bucket}?endpoint=http://127.0.0.1:{closed}&region=us-east-1"
    (out,) = build(trivial_expr("outage"))
    names = [f"{i:04d}.entry" for i in range(150)]
    for name in names:
        _drop_entry(uploader.spool, name, out)
    uploader.start()
    deadline = time.monotonic() + 60
    while (report := _status(uploader)).get("retrying_count") != 150:
        assert time.monotonic() < deadline, f"entries did not all fail: {report}"
        time.sleep(0.2)
    assert [r["entry"] for r in report["retrying"]] == names[:100]
    assert all("127.0.0.1" in r["error"] for r in report["retrying"]), report["retrying"][0]
    assert (uploader.state_dir / "status.json").stat().st_size < 64 * 1024
    human = run_cli("status", *uploader.queue_args()).stdout
    assert "retrying:    150\n" in human
    assert "  … and 140 more (--json lists the oldest 100)" in human
