"""An S3 endpoint behind HTTPS with a certificate of a private CA (or a
self-signed one), as self-hosted Ceph RGW, MinIO or Garage often have: the
error says how to trust it, and both documented ways work, for the small
requests (aiohttp) and the parts of a streamed NAR (boto3) alike."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import KeyPair, run_cli
from tests.support.nix import build, random_blob_expr, substitute
from tests.support.services import NixDaemon, SeaweedFS
from tests.support.tls import TlsFront
from uploader.storepath import hash_part

pytestmark = pytest.mark.integration


@pytest.fixture
def https(seaweedfs: SeaweedFS, nix_daemon: NixDaemon, tmp_path: Path) -> Iterator[TlsFront]:
    (tmp_path / "tls").mkdir()
    front = TlsFront(seaweedfs, tmp_path / "tls")
    yield front
    front.stop()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_CA_BUNDLE", "AWS_CONFIG_FILE")}
    return {**env, **extra}


def test_a_private_ca_is_trusted_the_documented_ways(
    https: TlsFront, keys: KeyPair, tmp_path: Path
) -> None:
    salt = tmp_path.name
    # Over 16 MiB: streamed in parts, which boto3 sends, not aiohttp.
    (path,) = build(random_blob_expr("tls", 20_000_000))
    assert https.endpoint.startswith("https://")

    bucket = https.create_bucket(f"tls-{salt[-12:].lower().replace('_', '-')}")
    push = ["push", "--to", https.store_url(bucket), "--secret-key-file", keys.secret_file, path]
    refused = run_cli(*push, check=False, env=_env(), timeout=300)
    assert refused.returncode == 1, refused.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    assert "AWS_CA_BUNDLE=/path/to/ca.pem" in refused.stderr and "ca_bundle" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert https.get(bucket, f"{hash_part(path)}.narinfo") is None

    pushed = run_cli(*push, env=_env(AWS_CA_BUNDLE=str(https.cert_file)), timeout=300)
    assert "uploaded 1 path" in pushed.stderr, pushed.stderr

    # The profile's ca_bundle, as the AWS CLI reads it, for another bucket.
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\nca_bundle = {https.cert_file}\n")
    other = https.create_bucket(f"{bucket}-p")
    push[2] = https.store_url(other)
    run_cli(*push, env=_env(AWS_CONFIG_FILE=str(config)), timeout=300)
    verified = run_cli("verify", "--to", https.store_url(other), "--deep",
                       env=_env(AWS_CONFIG_FILE=str(config)), timeout=300)  # fmt: skip
    assert verified.returncode == 0, verified.stderr

    for name in (bucket, other):
        fresh = substitute(https.upstream.http_url(name), [path], keys.public,
                           dest=str(tmp_path / f"fresh-{name}"))  # fmt: skip
        assert fresh.returncode == 0, fresh.stderr
