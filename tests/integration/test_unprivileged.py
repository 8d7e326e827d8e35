"""The separation the design promises, with real users: the daemon runs as
its own unprivileged user holding the key, builds still reach the cache, and
other users can neither queue entries nor read the key."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import users
from tests.support.cli import KeyPair, make_keys
from tests.support.daemon import UploaderRun
from tests.support.nix import build, multi_output_expr, nix_path_info, substitute, trivial_expr
from tests.support.services import NixDaemon, SeaweedFS
from tests.support.users import SystemUser

# About the spool, the command line and users, not S3: one S3 server is enough.
pytestmark = [pytest.mark.integration, pytest.mark.seaweedfs_only]

# Session fixtures from tests/support/users.py, registered in this module by name.
uploader_user = users.uploader_user
uploader_python = users.uploader_python

NOBODY = 65534  # Debian's nobody:nogroup


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is root's only)."""
    root = Path(tempfile.mkdtemp(prefix="ncu-unprivileged-", dir="/var/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def keys_for(shared_root: Path, uploader_user: SystemUser) -> KeyPair:
    """A key pair whose secret half belongs to the uploader user, mode 0600."""
    directory = shared_root / "keys"
    directory.mkdir(mode=0o755)
    pair = make_keys(directory)
    os.chown(pair.secret_file, uploader_user.uid, uploader_user.gid)
    os.chmod(pair.secret_file, 0o600)
    return pair


@pytest.fixture
def separated(
    shared_root: Path,
    uploader_user: SystemUser,
    uploader_python: str,
    keys_for: KeyPair,
    nix_daemon: NixDaemon,
    seaweedfs: SeaweedFS,
    bucket: str,
) -> Iterator[UploaderRun]:
    """An uploader (not yet started) set up as the NixOS module does it."""
    run = UploaderRun(
        root=shared_root / "uploader",
        store_url=seaweedfs.store_url(bucket),
        secret_key_file=keys_for.secret_file,
        user=uploader_user.name,
        python=uploader_python,
    )
    run.root.chmod(0o755)
    os.chown(run.spool, 0, uploader_user.gid)
    run.spool.chmod(0o2770)
    for owned in (run.state_dir, run.gc_roots):
        os.chown(owned, uploader_user.uid, uploader_user.gid)
    yield run
    run.kill()


def _as_user(
    uid: int, gid: int, *cmd: str, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *cmd],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )  # fmt: skip


def _proc_ids(pid: int) -> dict[str, list[int]]:
    """Real, effective, saved and filesystem uids and gids of a process."""
    ids = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            ids[key] = [int(v) for v in value.split()]
    return ids


def _secrets(secret_file: str) -> list[bytes]:
    """Every spelling of the secret key that could leak: the file's base64 and
    the 32-byte seed in base64 and hex."""
    payload = Path(secret_file).read_text().strip().split(":", 1)[1]
    seed = base64.b64decode(payload)[:32]
    return [payload.encode(), base64.b64encode(seed).rstrip(b"="), seed.hex().encode()]


def test_the_daemon_runs_as_its_user_and_uploads_builds(
    separated: UploaderRun,
    uploader_user: SystemUser,
    keys_for: KeyPair,
    seaweedfs: SeaweedFS,
    bucket: str,
) -> None:
    separated.start()
    assert separated.process is not None
    ids = _proc_ids(separated.process.pid)
    assert ids["Uid"] == [uploader_user.uid] * 4, ids
    assert ids["Gid"] == [uploader_user.gid] * 4, ids

    expr = multi_output_expr()
    outputs = [*build(expr, hook=str(separated.hook)), *build(expr, attr="lib")]
    outputs += build(trivial_expr("unprivileged"), hook=str(separated.hook))
    separated.wait_drained(timeout=120)

    dest = str(separated.root / "fresh")
    copied = substitute(seaweedfs.http_url(bucket), outputs, keys_for.public, dest=dest)
    assert copied.returncode == 0, copied.stderr
    for path in nix_path_info(outputs, recursive=True):
        assert Path(dest + path).exists(), f"{path} was not substituted"
    assert "running as root" not in separated.log()
    assert separated.process.poll() is None, separated.log()


def test_other_users_can_neither_queue_entries_nor_read_the_key(
    separated: UploaderRun, uploader_user: SystemUser, keys_for: KeyPair
) -> None:
    planted = separated.spool / "planted.entry"
    # The uploader's own user may write there (it moves entries to quarantine/)...
    own = _as_user(uploader_user.uid, uploader_user.gid, "sh", "-c", f": > {planted}")
    assert own.returncode == 0, own.stderr
    planted.unlink()

    # ...nobody else may, and only the uploader can read its key.
    other = _as_user(NOBODY, NOBODY, "sh", "-c", f": > {planted}")
    assert other.returncode != 0
    assert "Permission denied" in other.stderr
    assert not planted.exists()
    key = _as_user(NOBODY, NOBODY, "cat", keys_for.secret_file)
    assert key.returncode != 0
    assert "Permission denied" in key.stderr
    assert key.stdout == ""
    # Not a path problem: the public key beside it is readable.
    public = _as_user(NOBODY, NOBODY, "cat", keys_for.public_file)
    assert public.returncode == 0, public.stderr


def test_a_ci_user_outside_the_spool_group_can_wait_and_see_status(
    separated: UploaderRun, uploader_python: str
) -> None:
    """The CI user cannot read the spool; `wait` and `status` answer it from
    the daemon's status file, also when the daemon has been idle a while."""
    separated.start()
    build(trivial_expr("ci-user"), hook=str(separated.hook))
    separated.wait_drained(timeout=120)
    time.sleep(2)  # idle: nothing left to change in the status

    def as_other(*cmd: str) -> subprocess.CompletedProcess[str]:
        return _as_user(NOBODY, NOBODY, *cmd, cwd=separated.root)

    def as_ci_user(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        cmd = [uploader_python, "-m", "uploader", *args, *separated.queue_args()]
        return _as_user(NOBODY, NOBODY, *cmd, cwd=separated.root, timeout=timeout + 10)

    waited = as_ci_user("wait", "--timeout", "10", timeout=10)
    assert waited.returncode == 0, waited.stderr
    assert "spool drained" in waited.stderr
    shown = as_ci_user("status", "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["daemon"] == "running"
    assert report["quarantined"] is None  # not this user's to see
    assert report["pending"] == 0
    # The daemon's database is not theirs to open: a lock on it would stall
    # every write (only status.json is for them).
    memory = sorted(separated.state_dir.glob("state.sqlite*"))
    assert {p.name for p in memory} >= {"state.sqlite", "state.sqlite-wal", "state.sqlite-shm"}
    for path in memory:
        opened = as_other("python3", "-c", f"open({str(path)!r}, 'rb')")
        assert opened.returncode != 0 and "PermissionError" in opened.stderr, path

    # An idle daemon writes its status every few seconds; a short wait still
    # knows at once that nothing is queued (the spool has not changed since).
    for _ in range(3):
        quick = as_ci_user("wait", "--timeout", "1", timeout=1)
        assert quick.returncode == 0, quick.stderr

    # A build queued while the daemon is stopped: not "0 pending" any more.
    assert separated.stop() == 0
    build(trivial_expr("ci-user-later"), hook=str(separated.hook))
    report = json.loads(as_ci_user("status", "--json").stdout)
    assert report["daemon"] == "stopped" and report["pending"] is None
    assert "?" in as_ci_user("status").stdout.splitlines()[2]
    late = as_ci_user("wait", "--timeout", "1", timeout=1)
    assert late.returncode == 3 and "queue state unknown" in late.stderr


def test_the_key_stays_out_of_argv_environment_and_log(
    separated: UploaderRun, keys_for: KeyPair
) -> None:
    separated.start(["-vv"])  # debug logging: the most it could leak
    assert separated.process is not None
    build(trivial_expr("signed"), hook=str(separated.hook))
    separated.wait_drained(timeout=120)
    assert "uploaded" in separated.log()  # it did sign and upload

    pid = separated.process.pid
    places = {
        "log": separated.log_path.read_bytes(),
        "cmdline": Path(f"/proc/{pid}/cmdline").read_bytes(),
        "environ": Path(f"/proc/{pid}/environ").read_bytes(),
    }
    for secret in _secrets(keys_for.secret_file):
        for where, data in places.items():
            assert secret not in data, f"secret key material in the daemon's {where}"


def test_a_group_readable_key_file_is_refused(separated: UploaderRun, keys_for: KeyPair) -> None:
    os.chmod(keys_for.secret_file, 0o640)
    proc = subprocess.run(
        separated.argv(), cwd=separated.cwd, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "chmod 600" in proc.stderr
    assert not (separated.state_dir / "status.json").exists()


def test_running_as_root_logs_a_warning(uploader: UploaderRun) -> None:
    uploader.start()
    assert uploader.stop() == 0
    assert "WARNING running as root" in uploader.log()
