"""A real unprivileged uploader user for tests, and a Python it can run.

The session fixtures create the system user ``ncu-test`` (in ``nix-users``, so
it can reach the nix-daemon socket) and a virtualenv with this checkout
installed, outside /root, that the user can read.  Both are reused: the user
across runs, the virtualenv as long as the package sources are unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.requirements import require_binary

__all__ = ["UPLOADER_USER", "SystemUser", "uploader_python", "uploader_user"]

UPLOADER_USER = "ncu-test"
NIX_GROUP = "nix-users"  # owns the daemon socket's directory (mode 770)
SYSTEM_PYTHON = "/usr/bin/python3.11"
VENV_PARENT = Path("/var/tmp")
VENV_PREFIX = "ncu-test-venv-"
_LOCK = VENV_PARENT / "ncu-test-setup.lock"
_COMPLETE = ".complete"
# Virtualenvs of other source versions (~100 MB each) are removed once
# unused this long; a session touches its own when it starts.
_STALE_VENV_AGE = 3600.0

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SystemUser:
    name: str
    uid: int
    gid: int


def _missing(message: str) -> None:
    """Skip locally, fail in CI (a skipped separation test proves nothing)."""
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@contextlib.contextmanager
def _setup_lock() -> Iterator[None]:
    """Serialises user and venv creation between concurrent test sessions."""
    with open(_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}", pytrace=False)


def ensure_system_user(name: str, groups: tuple[str, ...] = ()) -> SystemUser:
    """The system user ``name`` (own group, no home, no shell), created if
    missing and added to ``groups``."""
    if os.geteuid() != 0:
        _missing(f"creating the test user {name} needs root")
    useradd = require_binary("useradd")
    usermod = require_binary("usermod")
    for group in groups:
        try:
            grp.getgrnam(group)
        except KeyError:
            _missing(
                f"group {group} does not exist; run scripts/bootstrap (apt-get install nix-bin)"
            )
    with _setup_lock():
        try:
            pwd.getpwnam(name)
        except KeyError:
            _run(useradd, "--system", "--user-group", "--no-create-home",
                 "--shell", "/usr/sbin/nologin", name)  # fmt: skip
        for group in groups:
            if name not in grp.getgrnam(group).gr_mem:
                _run(usermod, "--append", "--groups", group, name)
    entry = pwd.getpwnam(name)
    return SystemUser(name, entry.pw_uid, entry.pw_gid)


def _sources() -> list[Path]:
    """The files that make up the installed package."""
    files = [REPO / "pyproject.toml", REPO / "README.md"]
    files += sorted(p for p in (REPO / "uploader").rglob("*") if p.is_file() and
                    "__pycache__" not in p.parts)  # fmt: skip
    return files


def _source_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _check_system_python() -> None:
    hint = "install it with `apt-get install python3-venv` (or run scripts/bootstrap)"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        _missing(f"{SYSTEM_PYTHON} is missing; {hint}")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import venv, ensurepip"], capture_output=True)
    if probe.returncode != 0:
        _missing(f"{SYSTEM_PYTHON} has no venv/ensurepip module; {hint}")


def _remove_stale_venvs(keep: Path) -> None:
    cutoff = time.time() - _STALE_VENV_AGE
    for venv in VENV_PARENT.glob(VENV_PREFIX + "*"):
        marker = venv / _COMPLETE
        with contextlib.suppress(OSError):
            if venv != keep and marker.stat().st_mtime < cutoff:
                shutil.rmtree(venv, ignore_errors=True)


def build_venv() -> Path:
    """A virtualenv (world-readable, under /var/tmp) with a copy of this
    checkout installed; its python.  Reused while the sources are unchanged."""
    files = _sources()
    venv = VENV_PARENT / f"{VENV_PREFIX}{_source_hash(files)}"
    python = venv / "bin" / "python"
    with _setup_lock():
        if (venv / _COMPLETE).exists():
            (venv / _COMPLETE).touch()
            return python
        _check_system_python()
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one from a crash
        _run(SYSTEM_PYTHON, "-m", "venv", str(venv))
        # Install from a copy: a build in the checkout would leave build/ and
        # *.egg-info behind, and the user must not depend on the checkout.
        with tempfile.TemporaryDirectory(prefix="ncu-src-") as src:
            for path in files:
                target = Path(src) / path.relative_to(REPO)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
            _run(str(python), "-m", "pip", "install", "--quiet",
                 "--disable-pip-version-check", src)  # fmt: skip
        _run("chmod", "-R", "a+rX", str(venv))
        (venv / _COMPLETE).touch()
        _remove_stale_venvs(keep=venv)
    return python


@pytest.fixture(scope="session")
def uploader_user() -> SystemUser:
    """The unprivileged user the uploader runs as: ``ncu-test``, in nix-users."""
    require_binary("setpriv")
    return ensure_system_user(UPLOADER_USER, groups=(NIX_GROUP,))


@pytest.fixture(scope="session")
def uploader_python() -> str:
    """A Python with this package installed that any user can execute."""
    return str(build_venv())
