"""Session fixtures: one real nix-daemon and one real SeaweedFS for the run.

They are started by the tests themselves (scripts/bootstrap installs them)
and stopped at the end; a nix-daemon that was already running is reused.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import KeyPair, make_keys
from tests.support.daemon import UploaderRun
from tests.support.requirements import require_binary
from tests.support.services import NixDaemon, SeaweedFS, start_nix_daemon, start_seaweedfs


@pytest.fixture(scope="session")
def nix_daemon() -> Iterator[NixDaemon]:
    require_binary("nix-daemon")
    require_binary("nix-build")
    daemon = start_nix_daemon()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    require_binary("weed")
    server = start_seaweedfs()
    yield server
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture
def bucket(seaweedfs: SeaweedFS) -> str:
    """A new, empty bucket for one test."""
    return seaweedfs.create_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def keys(tmp_path: Path) -> KeyPair:
    return make_keys(tmp_path)


@pytest.fixture
def uploader(
    tmp_path: Path, nix_daemon: NixDaemon, seaweedfs: SeaweedFS, bucket: str, keys: KeyPair
) -> Iterator[UploaderRun]:
    """An uploader daemon (not yet started) for this test's bucket, stopped afterwards."""
    run = UploaderRun(
        root=tmp_path / "uploader",
        store_url=seaweedfs.store_url(bucket),
        secret_key_file=keys.secret_file,
    )
    yield run
    run.kill()
