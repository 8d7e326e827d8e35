"""A large NAR goes to real S3 servers (SeaweedFS, moto) in parts while it is
compressed: it substitutes into a fresh store, and a NAR that differs from
the Nix database leaves nothing behind, not even an incomplete upload."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.cli import KeyPair, run_cli
from tests.support.nix import build, nix_path_info, substitute
from tests.support.services import NixDaemon, S3Server
from uploader.narinfo import NarInfo
from uploader.narstream import PART_SIZE, STREAM_ABOVE
from uploader.storepath import hash_part

pytestmark = pytest.mark.integration

_BYTES = STREAM_ABOVE + 4 * PART_SIZE  # random: about six parts compressed


@pytest.fixture(scope="module")
def large(nix_daemon: NixDaemon) -> str:
    """A fresh path whose NAR is larger than S3's multipart threshold."""
    (out,) = build(
        f"""derivation {{
  name = "large"; system = builtins.currentSystem; builder = "/bin/sh";
  PATH = "/usr/bin:/bin"; salt = "{Path(__file__).stat().st_mtime_ns}-{id(nix_daemon)}";
  args = ["-c" "mkdir $out; head -c {_BYTES} /dev/urandom > $out/blob; echo $salt > $out/salt"];
}}"""
    )
    return out


def _keys(s3: S3Server, bucket: str) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listed.get("Contents", [])]


def _incomplete(s3: S3Server, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def test_a_large_nar_is_uploaded_in_parts_and_substitutes(
    s3: S3Server, bucket: str, keys: KeyPair, large: str, tmp_path: Path
) -> None:
    run_cli("push", "--to", s3.store_url(bucket), "--secret-key-file", keys.secret_file, large)

    text = s3.get(bucket, f"{hash_part(large)}.narinfo")
    assert text is not None
    info = NarInfo.parse(text.decode())
    registered = nix_path_info([large])[large]
    assert info.nar_size == registered["narSize"] > STREAM_ABOVE
    nar_hash = info.nar_hash.split(":")[1]
    assert re.fullmatch(rf"nar/{nar_hash}-[0-9a-f]{{16}}\.nar\.zst", info.url)
    head = s3.client().head_object(Bucket=bucket, Key=info.url)
    assert head["ContentLength"] == info.file_size
    assert re.search(r"-\d+\"$", head["ETag"]), "not a multipart upload"
    assert _incomplete(s3, bucket) == []
    copied = substitute(s3.http_url(bucket), [large], keys.public, dest=str(tmp_path / "fresh"))
    assert copied.returncode == 0, copied.stderr


def test_a_large_nar_the_cache_has_is_compressed_ahead_but_never_sent(
    s3: S3Server, bucket: str, keys: KeyPair, large: str
) -> None:
    push = ["push", "--to", s3.store_url(bucket), "--secret-key-file", keys.secret_file, "-vv"]
    first = run_cli(*push, large)
    assert "compressing its NAR while the cache is asked" in first.stderr
    before = {k: s3.client().head_object(Bucket=bucket, Key=k)["ETag"] for k in _keys(s3, bucket)}

    again = run_cli(*push, large)

    assert "compressed ahead is dropped" in again.stderr
    assert "uploaded 0 paths" in again.stdout + again.stderr
    after = {k: s3.client().head_object(Bucket=bucket, Key=k)["ETag"] for k in _keys(s3, bucket)}
    # Nothing new but the push's root for gc; no NAR begun, none left incomplete.
    assert {k: v for k, v in after.items() if not k.startswith("lifecycle/")} == {
        k: v for k, v in before.items() if not k.startswith("lifecycle/")
    }
    assert _incomplete(s3, bucket) == []


def test_a_nar_that_differs_from_the_database_leaves_nothing(
    s3: S3Server, bucket: str, keys: KeyPair, large: str
) -> None:
    blob = Path(large) / "blob"
    with open(blob, "r+b") as f:
        original = f.read(1)
        f.seek(0)
        f.write(bytes([original[0] ^ 1]))  # same size: only the hash tells
    try:
        result = run_cli(
            "push", "--to", s3.store_url(bucket), "--secret-key-file", keys.secret_file,
            large, check=False,
        )  # fmt: skip
    finally:
        with open(blob, "r+b") as f:
            f.write(original)
    assert result.returncode == 1
    assert "differs from what the Nix database registered" in result.stderr
    # Nothing of the path: only the cache's own files and the push's root for gc.
    left = [
        k for k in _keys(s3, bucket) if k != "nix-cache-info" and not k.startswith("lifecycle/")
    ]
    assert left == []
    assert _incomplete(s3, bucket) == []
