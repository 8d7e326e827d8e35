"""Session fixtures: one real nix-daemon, one real SeaweedFS and one moto for the run.

They are started by the tests themselves (scripts/bootstrap installs them)
and stopped at the end; a nix-daemon that was already running is reused.

A test that asks for ``s3`` (directly, or through ``bucket`` or
``uploader``) runs once against each S3 implementation, unless it is marked
``seaweedfs_only`` (it restarts the server, or is about something other than
S3 and would only cost time twice).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import KeyPair, make_keys
from tests.support.daemon import UploaderRun
from tests.support.faults import FaultProxy
from tests.support.moto_server import MotoServer, start_moto
from tests.support.requirements import require_binary, require_module
from tests.support.services import (
    NixDaemon,
    S3Server,
    SeaweedFS,
    start_nix_daemon,
    start_seaweedfs,
)

S3_SERVERS = ["seaweedfs", "moto"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "s3" not in metafunc.fixturenames:
        return
    only = metafunc.definition.get_closest_marker("seaweedfs_only")
    metafunc.parametrize("s3", ["seaweedfs"] if only else S3_SERVERS, indirect=True)


@pytest.fixture(scope="session")
def nix_daemon() -> Iterator[NixDaemon]:
    require_binary("nix-daemon")
    require_binary("nix-build")
    daemon = start_nix_daemon()
    yield daemon
    daemon.stop()


@pytest.fixture
def faults(seaweedfs: SeaweedFS, nix_daemon: NixDaemon) -> Iterator[FaultProxy]:
    """A fault-injecting front for SeaweedFS (the tests using it build paths)."""
    proxy = FaultProxy(seaweedfs)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    require_binary("weed")
    server = start_seaweedfs()
    yield server
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    require_module("moto.server")
    server = start_moto()
    yield server
    server.stop()
    shutil.rmtree(Path(server.log_path).parent, ignore_errors=True)


@pytest.fixture
def s3(request: pytest.FixtureRequest) -> S3Server:
    """The S3 server of this run of the test (see pytest_generate_tests)."""
    server: S3Server = request.getfixturevalue(request.param)
    return server


@pytest.fixture
def bucket(s3: S3Server) -> str:
    """A new, empty bucket for one test."""
    return s3.create_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def keys(tmp_path: Path) -> KeyPair:
    return make_keys(tmp_path)


@pytest.fixture
def uploader(
    tmp_path: Path, nix_daemon: NixDaemon, s3: S3Server, bucket: str, keys: KeyPair
) -> Iterator[UploaderRun]:
    """An uploader daemon (not yet started) for this test's bucket, stopped afterwards."""
    run = UploaderRun(
        root=tmp_path / "uploader",
        store_url=s3.store_url(bucket),
        secret_key_file=keys.secret_file,
    )
    yield run
    run.kill()
