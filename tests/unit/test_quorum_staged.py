"""A staged NAR is checked against its attestation before it is published,
and against its content address when that address is what lets one
attestation be enough (flat and text addresses name the file inside)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.tmpfs import small_tmpfs
from tests.unit.test_quorum_attestation import attestation
from uploader import nar
from uploader._exceptions import TargetError, UploaderError
from uploader.nixbase32 import format_hash
from uploader.quorum import Bucket, open_bucket
from uploader.quorum.attestation import Attestation, StagedNar
from uploader.quorum.staged import StagedMismatch, _FlatContent, fetch_verified


def sha(data: bytes) -> str:
    return format_hash(hashlib.sha256(data).digest())


def nar_of(path: Path) -> bytes:
    return b"".join(nar.dump(str(path)))


@pytest.fixture
def bucket(tmp_path: Path) -> Bucket:
    return open_bucket(f"file://{tmp_path / 'bucket'}")


@given(content=st.binary(max_size=3000), executable=st.booleans(), cut=st.integers(1, 97))
@settings(max_examples=60, deadline=None)
def test_the_file_inside_a_nar_is_hashed_whatever_the_pieces(
    tmp_path_factory: pytest.TempPathFactory, content: bytes, executable: bool, cut: int
) -> None:
    path = tmp_path_factory.mktemp("flat") / "f"
    path.write_bytes(content)
    path.chmod(0o755 if executable else 0o644)
    data = nar_of(path)
    flat = _FlatContent()
    for i in range(0, len(data), cut):
        flat.update(data[i : i + cut])
    assert flat.digest() == hashlib.sha256(content).digest()


def test_a_nar_that_is_not_one_regular_file_has_no_flat_content(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    os.symlink("/etc/shadow", tmp_path / "link")
    (tmp_path / "f").write_bytes(b"abc")
    for data in (nar_of(tmp_path / "d"), nar_of(tmp_path / "link"), nar_of(tmp_path / "f")[:-8],
                 nar_of(tmp_path / "f") + b"\0" * 8):  # fmt: skip
        flat = _FlatContent()
        flat.update(data)
        assert flat.digest() is None


def stage(bucket: Bucket, tmp_path: Path, content: bytes, ca: str) -> object:
    """A builder's staged NAR of a file holding ``content``, attested as ``ca``."""
    (tmp_path / "out").write_bytes(content)
    data = nar_of(tmp_path / "out")
    packed = zstandard.ZstdCompressor().compress(data)
    url = "quorum/v1/staging/ci-a-1/x.nar.zst"
    bucket.put_bytes(url, packed, "application/x-nix-nar")
    staged = StagedNar(url, "zstd", sha(packed), len(packed))
    return attestation("ci-a-1", nar_hash=sha(data), nar_size=len(data), nar=staged, ca=ca,
                       references=())  # fmt: skip


@pytest.mark.parametrize("kind", ["fixed", "text"])
def test_a_flat_content_address_must_name_the_file_staged(
    bucket: Bucket, tmp_path: Path, kind: str
) -> None:
    """One builder cannot get other bytes published under a true content
    address: the one attestation it takes must hold those very bytes."""
    genuine = b"the release tarball\n"
    claim = f"{kind}:{sha(genuine)}"
    poisoned = stage(bucket, tmp_path, b"a backdoored tarball\n", claim)
    with pytest.raises(StagedMismatch, match=f"does not hold what its content address {claim}"):
        fetch_verified(bucket, poisoned, str(tmp_path))  # type: ignore[arg-type]
    honest = stage(bucket, tmp_path, genuine, claim)
    fetch_verified(bucket, honest, str(tmp_path)).file.close()  # type: ignore[arg-type]


def test_a_staged_nar_must_have_the_attested_file_hash(bucket: Bucket, tmp_path: Path) -> None:
    """Of the same size and holding the attested NAR, it still does not count
    when its bytes are not the attested ones (quorum-format.md): the
    attestation is what the builder answers for."""
    honest = stage(bucket, tmp_path, b"the release tarball\n", "")
    assert isinstance(honest, Attestation)
    wrong = dataclasses.replace(honest.nar, file_hash=sha(b"other bytes"))
    with pytest.raises(StagedMismatch, match=r"has FileHash .* not the attested"):
        fetch_verified(bucket, dataclasses.replace(honest, nar=wrong), str(tmp_path))
    fetch_verified(bucket, honest, str(tmp_path)).file.close()


def test_a_full_disk_or_a_failed_read_is_the_publishers_not_the_builders(
    bucket: Bucket, tmp_path: Path
) -> None:
    """Only what the NAR is can make it not count: the publisher's own disk
    filling up, or the bucket failing mid-read, is an error to retry."""
    honest = stage(bucket, tmp_path, os.urandom(64 << 10), "fixed:sha256:unused")
    with small_tmpfs(tmp_path / "small", "16k") as small:
        with pytest.raises(UploaderError) as full:
            fetch_verified(bucket, honest, str(small))  # type: ignore[arg-type]
        assert not isinstance(full.value, StagedMismatch)
        assert str(full.value).startswith(f"no space left in {small} for a copy of ")
        assert list(small.iterdir()) == [], "the partial copy is deleted"

    class Failing(io.RawIOBase):
        def readinto(self, buffer: Any) -> int:
            raise ConnectionResetError("reset by peer")

    real_open = bucket.open_object
    bucket.open_object = (  # type: ignore[method-assign]
        lambda key: Failing() if "staging" in key else real_open(key)
    )
    with pytest.raises(TargetError) as failed:
        fetch_verified(bucket, honest, str(tmp_path))  # type: ignore[arg-type]
    assert str(failed.value) == (
        "reading quorum/v1/staging/ci-a-1/x.nar.zst: ConnectionResetError: reset by peer"
    )
