"""Key privacy judged by mode bits and real POSIX ACLs (setfacl on tmpfs, as systemd does)."""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.requirements import require_binary
from uploader import signing
from uploader._exceptions import KeyFileError
from uploader.fileaccess import other_accessors

NIX_SECRET = (
    "test-1:vMCqoKal2x7X6MtoWVCQXuI6TNQDazPxGAbkTl6o"
    "mef9CYNTelmRELB1wsGTNmQXQfwecGeEoKEj8xQg4MEj1A=="
)
NOBODY = pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def credential() -> Iterator[Path]:
    """A key written the way systemd writes a credential: 0400 on tmpfs."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        path = Path(directory, "secret-key")
        path.write_text(NIX_SECRET)
        os.chmod(path, 0o400)
        yield path


def setfacl(path: Path, *spec: str) -> None:
    subprocess.run([require_binary("setfacl"), *spec, str(path)], check=True)


def accessors(path: Path, me: int) -> list[str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return other_accessors(fd, me=me)
    finally:
        os.close(fd)


def test_a_credential_granted_to_one_user_by_acl_is_private_to_that_user(
    credential: Path,
) -> None:
    setfacl(credential, "-m", "u:nobody:r")
    # What made the key look group-readable: the ACL mask shows as group bits.
    assert oct(credential.stat().st_mode & 0o777) == "0o440"
    assert accessors(credential, me=NOBODY) == []
    # For anyone else, that user is someone who can read the key.
    assert accessors(credential, me=0) == ["user nobody (ACL)"]


def test_the_user_an_acl_names_loads_the_key(credential: Path) -> None:
    """systemd's shape with the roles swapped so that this test (root) is the named user."""
    os.chown(credential, NOBODY, -1)
    setfacl(credential, "-m", "u:root:r")
    assert oct(credential.stat().st_mode & 0o777) == "0o440"
    assert signing.SecretKey.load(str(credential)).to_text() == NIX_SECRET


def test_a_key_another_user_may_read_is_refused_naming_them(credential: Path) -> None:
    setfacl(credential, "-m", "u:nobody:r")
    with pytest.raises(KeyFileError, match=r"user nobody \(ACL\); run setfacl -b"):
        signing.SecretKey.load(str(credential))


@pytest.mark.parametrize(
    ("spec", "who"),
    [
        (["-m", "g:nogroup:r"], "group nogroup (ACL)"),
        (["-m", "g::r"], "group root"),
        (["-m", "o::r"], "others"),
    ],
)
def test_groups_and_others_with_access_are_refused(
    credential: Path, spec: list[str], who: str
) -> None:
    setfacl(credential, *spec)
    assert who in accessors(credential, me=0)
    with pytest.raises(KeyFileError, match="is accessible by"):
        signing.SecretKey.load(str(credential))


@pytest.mark.parametrize("mode", [0o602, 0o601, 0o610, 0o604, 0o620])
def test_any_bit_for_group_or_others_refuses_the_key(credential: Path, mode: int) -> None:
    """Write or execute is access too: whoever may write the key may replace it."""
    os.chmod(credential, mode)
    with pytest.raises(KeyFileError, match="is accessible by"):
        signing.SecretKey.load(str(credential))


@pytest.mark.parametrize("spec", ["u:nobody:w", "g:nogroup:w", "u:nobody:x"])
def test_acl_entries_granting_only_write_or_execute_refuse_the_key(
    credential: Path, spec: str
) -> None:
    setfacl(credential, "-m", spec)
    with pytest.raises(KeyFileError, match="is accessible by"):
        signing.SecretKey.load(str(credential))


def test_the_mask_never_hides_others(credential: Path) -> None:
    """POSIX: the mask limits named entries and the owning group, not others."""
    setfacl(credential, "-m", "u:nobody:r,o::r")
    setfacl(credential, "-n", "-m", "m::---")
    assert accessors(credential, me=0) == ["others"]
    with pytest.raises(KeyFileError, match="others"):
        signing.SecretKey.load(str(credential))


def test_an_entry_the_mask_takes_away_grants_nothing(credential: Path) -> None:
    setfacl(credential, "-m", "g:nogroup:r,u:daemon:r")
    setfacl(credential, "-n", "-m", "m::---")
    assert accessors(credential, me=0) == []
    assert signing.SecretKey.load(str(credential)).to_text() == NIX_SECRET


def test_without_an_acl_the_mode_bits_decide(credential: Path) -> None:
    assert accessors(credential, me=0) == []
    os.chmod(credential, 0o640)
    assert accessors(credential, me=0) == ["group root"]
