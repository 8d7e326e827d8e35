"""`install` and `uninstall` for real on this machine, as root: a real user,
the real /etc/nix/nix.conf (saved first and restored whatever happens), and
the `nix-cache-uploader` of a virtualenv installed with `pip install`, not
this checkout.  The other paths go to a temporary directory; systemd is not
PID 1 here, so the unit is checked with `systemd-analyze verify`.

The suite's own nix-daemon reads a copy of nix.conf (NIX_CONF_DIR), so the
edit does not reach its builds.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import users
from tests.support.requirements import require_binary
from uploader.host import LocalHost
from uploader.nixconf import MARK

pytestmark = pytest.mark.integration

uploader_python = users.uploader_python

USER = "ncu-inst-test"
NIX_CONF = Path("/etc/nix/nix.conf")
STORE_URL = "s3://ncu-install-test?endpoint=http://127.0.0.1:9&region=us-east-1"
# Serialises the tests that edit /etc/nix/nix.conf across concurrent sessions.
LOCK = Path("/var/tmp/ncu-test-nix-conf.lock")
DRV = "/nix/store/gxs9hr309n6jrgv3dzmbklh6rcf9iw7v-hello-2.12.1.drv"


@pytest.fixture
def command(uploader_python: str) -> str:
    """The nix-cache-uploader of a `pip install`ed copy (the hook comes from
    its package data, as for a user)."""
    if os.geteuid() != 0:
        pytest.skip("install needs root")
    for tool in ("useradd", "userdel", "groupdel", "usermod"):
        require_binary(tool)
    return str(Path(uploader_python).parent / "nix-cache-uploader")


@pytest.fixture
def system_nix_conf() -> Iterator[bytes]:
    """The bytes of /etc/nix/nix.conf, put back afterwards whatever happened."""
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = NIX_CONF.read_bytes()
        try:
            yield saved
        finally:
            if NIX_CONF.read_bytes() != saved:
                NIX_CONF.write_bytes(saved)
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture
def root() -> Iterator[Path]:
    """Paths install writes to, other than nix.conf; traversable by the user."""
    directory = Path(tempfile.mkdtemp(prefix="ncu-install-", dir="/var/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def clean_user() -> Iterator[None]:
    """No ncu-inst-test before the test (a crashed run's) or after it."""

    def remove() -> None:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(USER)
            subprocess.run(["userdel", USER], check=True)
        with contextlib.suppress(KeyError):
            grp.getgrnam(USER)
            subprocess.run(["groupdel", USER], check=True)

    remove()
    yield
    remove()


def path_args(root: Path) -> list[str]:
    return [
        "--user", USER, "--config", str(root / "etc" / "config.toml"),
        "--unit-dir", str(root / "systemd"), "--hook-path", str(root / "libexec" / "hook"),
        "--nix-conf", str(NIX_CONF),
    ]  # fmt: skip


def install_args(root: Path) -> list[str]:
    return [
        "install", *path_args(root), "--to", STORE_URL, "--generate-key", "ncu-install-test-1",
        "--spool", str(root / "spool"), "--state-dir", str(root / "state"),
        "--gc-roots-dir", str(root / "gcroots"),
    ]  # fmt: skip


def cli(command: str, *args: str) -> subprocess.CompletedProcess[str]:
    # From / so that `uploader` is imported from the virtualenv, not the checkout.
    return subprocess.run([command, *args], capture_output=True, text=True, cwd="/")


def snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes | None]]:
    found = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        found[str(p)] = (st.st_mode, st.st_uid, st.st_gid, p.read_bytes() if p.is_file() else None)
    return found


def test_dry_run_lists_every_action_and_changes_nothing(
    command: str, system_nix_conf: bytes
) -> None:
    """With the default paths: what a user would see before the real thing."""
    defaults = {
        "/var/spool/nix-cache-uploader": "create directory /var/spool/nix-cache-uploader "
        "(root:nix-cache-uploader, mode 2770)",
        "/var/lib/nix-cache-uploader": "create directory /var/lib/nix-cache-uploader "
        "(nix-cache-uploader:nix-cache-uploader, mode 0755)",
        "/nix/var/nix/gcroots/nix-cache-uploader": "create directory "
        "/nix/var/nix/gcroots/nix-cache-uploader (nix-cache-uploader:nix-cache-uploader, "
        "mode 0755)",
        "/usr/local/libexec/nix-cache-uploader/post-build-hook": "write "
        "/usr/local/libexec/nix-cache-uploader/post-build-hook (post-build hook)",
        "/etc/nix-cache-uploader/config.toml": "write /etc/nix-cache-uploader/config.toml "
        "(to, secret-key-file, spool, upstream-keys)",
        "/etc/systemd/system/nix-cache-uploader.service": "write "
        "/etc/systemd/system/nix-cache-uploader.service (systemd unit)",
    }
    absent = {path: line for path, line in defaults.items() if not os.path.lexists(path)}
    out = cli(command, "install", "--dry-run", "--to", STORE_URL)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for line in absent.values():
        assert line in lines
    try:
        pwd.getpwnam("nix-cache-uploader")
    except KeyError:
        assert (
            "create user nix-cache-uploader (system user in group nix-cache-uploader, "
            "no login shell)"
        ) in lines
    if b"post-build-hook" not in system_nix_conf:
        assert (
            "add post-build-hook = /usr/local/libexec/nix-cache-uploader/post-build-hook "
            "to /etc/nix/nix.conf"
        ) in lines
    assert lines[-1] != "nothing to do: nix-cache-uploader is installed as asked"
    assert any(
        line.startswith("dry run: ") and line.endswith(" actions, nothing changed")
        for line in lines
    )
    assert NIX_CONF.read_bytes() == system_nix_conf
    assert not [path for path in absent if os.path.lexists(path)]


def test_install_twice_then_uninstall_leaves_the_machine_as_it_was(
    command: str, system_nix_conf: bytes, root: Path, clean_user: None
) -> None:
    out = cli(command, *install_args(root))
    assert out.returncode == 0, out.stderr
    wrapper = root / "libexec" / "hook-wrapper"
    assert f"create user {USER} (system user in group {USER}, no login shell)" in out.stdout
    assert f"add post-build-hook = {wrapper} to {NIX_CONF}" in out.stdout

    # The user, in nix-users (Debian's nix-daemon socket), owning its directories.
    account = pwd.getpwnam(USER)
    assert USER in grp.getgrnam("nix-users").gr_mem
    spool = root / "spool"
    assert stat.S_IMODE(spool.stat().st_mode) == 0o2770
    assert (spool.stat().st_uid, spool.stat().st_gid) == (0, account.pw_gid)
    assert (root / "gcroots").stat().st_uid == account.pw_uid
    key = root / "etc" / "secret-key"
    assert key.stat().st_uid == 0, "the original stays root's: systemd hands the service a copy"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # nix.conf: the old bytes, then install's two lines.
    assert (
        NIX_CONF.read_bytes() == system_nix_conf + f"{MARK}\npost-build-hook = {wrapper}\n".encode()
    )

    # The hook, through the wrapper, as the nix-daemon runs it: an entry in the spool.
    env = {"DRV_PATH": DRV, "OUT_PATHS": ""}
    hook = subprocess.run([str(wrapper)], env=env, capture_output=True, text=True)
    assert hook.returncode == 0 and hook.stderr == ""
    (entry,) = spool.iterdir()
    assert entry.read_text() == f"nix-cache-uploader-spool 2\ndrv {DRV}\nend\n"
    entry.unlink()

    # The unit as systemd reads it (its ExecStart= must exist: it is the venv's).
    unit = root / "systemd" / "nix-cache-uploader.service"
    assert f"ExecStart={command} run --config {root / 'etc' / 'config.toml'} " in unit.read_text()
    verify = subprocess.run(
        [require_binary("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr
    assert unit.name not in verify.stderr, verify.stderr
    check = cli(command, "check-config", "--config", str(root / "etc" / "config.toml"))
    assert check.returncode == 0, check.stderr

    # A second install has nothing to do.
    before = snapshot(root)
    again = cli(command, *install_args(root))
    assert again.returncode == 0, again.stderr
    assert "nothing to do: nix-cache-uploader is installed as asked" in again.stdout
    assert snapshot(root) == before
    assert NIX_CONF.read_bytes().count(MARK.encode()) == 1

    out = cli(command, "uninstall", "--purge", *path_args(root))
    assert out.returncode == 0, out.stderr
    assert NIX_CONF.read_bytes() == system_nix_conf
    assert not unit.exists()
    for gone in ("spool", "state", "gcroots", "etc/config.toml"):
        assert not (root / gone).exists()
    with pytest.raises(KeyError):
        pwd.getpwnam(USER)
    with pytest.raises(KeyError):
        grp.getgrnam(USER)
    assert USER not in grp.getgrnam("nix-users").gr_mem
    # The hook goes once no nix-daemon that read nix.conf before can run it.
    if LocalHost().nix_daemons(str(NIX_CONF), None):
        assert f"note: kept {wrapper}: the nix-daemon" in out.stdout
        out = cli(command, "uninstall", "--force", *path_args(root))
        assert out.returncode == 0, out.stderr
    assert not wrapper.exists() and not (root / "libexec").exists()
    assert key.exists()  # the key is the user's to delete
    assert "nothing to do" in cli(command, "uninstall", *path_args(root)).stdout
