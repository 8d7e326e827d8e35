from __future__ import annotations

import base64
import json
import os
import re
import stat
import traceback
from pathlib import Path

import pytest

from tests.support.requirements import add_path_with_references, run_nix
from uploader import signing
from uploader._exceptions import KeyFileError
from uploader.narinfo import fingerprint

FINGERPRINT = (
    b"1;/nix/store/gxs9hr309n6jrgv3dzmbklh6rcf9iw7v-x;"
    b"sha256:1nmyb06kh13gzyhnnibqlia68na1hr5b562ckg5xwfvvr8mz45gj;216;"
)
# A throwaway test key pair made by `nix-store --generate-binary-cache-key test-1 sk pk`
# (Nix 2.8.0); it signs nothing but these tests.
NIX_SECRET = (
    "test-1:vMCqoKal2x7X6MtoWVCQXuI6TNQDazPxGAbkTl6o"
    "mef9CYNTelmRELB1wsGTNmQXQfwecGeEoKEj8xQg4MEj1A=="
)
NIX_PUBLIC = "test-1:/QmDU3pZkRCwdcLBkzZkF0H8HnBnhKChI/MUIODBI9Q="


def write(path: Path, text: str, mode: int) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_sign_verify_round_trip() -> None:
    key = signing.generate("cache.example.org-1")
    sig = key.sign(FINGERPRINT)
    name, _, payload = sig.partition(":")
    assert name == "cache.example.org-1"
    assert len(base64.b64decode(payload)) == 64
    assert key.public_key().verify(FINGERPRINT, sig)


def test_verification_fails_for_another_key_message_or_name() -> None:
    key = signing.generate("cache-1")
    sig = key.sign(FINGERPRINT)
    other = signing.generate("cache-1").public_key()
    assert not other.verify(FINGERPRINT, sig)
    assert not key.public_key().verify(FINGERPRINT + b"x", sig)
    # Same key bytes under another name: Nix matches signatures to keys by name.
    renamed = signing.PublicKey.parse("cache-2:" + key.public_key().to_text().split(":")[1])
    assert not renamed.verify(FINGERPRINT, sig)
    assert not key.public_key().verify(FINGERPRINT, sig.replace("cache-1:", "cache-2:"))
    assert not key.public_key().verify(FINGERPRINT, "cache-1:not base64!")
    assert not key.public_key().verify(
        FINGERPRINT, "cache-1:" + base64.b64encode(b"short").decode()
    )


def test_nix_key_pair_matches_ours() -> None:
    secret = signing.SecretKey.parse(NIX_SECRET)
    assert secret.name == "test-1"
    assert secret.public_key().to_text() == NIX_PUBLIC
    assert secret.to_text() == NIX_SECRET
    public = signing.PublicKey.parse(NIX_PUBLIC)
    assert public == secret.public_key()
    assert public.verify(FINGERPRINT, secret.sign(FINGERPRINT))


@pytest.mark.parametrize(
    "suffix", ["\n", "\n\n", "\r\n", " \t\n"], ids=["newline", "blank-line", "crlf", "spaces"]
)
def test_key_files_nix_accepts_are_accepted(tmp_path: Path, suffix: str) -> None:
    """Nix reads these key files (checked by signing with it); so do we."""
    path = tmp_path / "sk"
    path.write_bytes((NIX_SECRET + suffix).encode())
    os.chmod(path, 0o600)
    store_path = add_path_with_references()
    run_nix("nix", "store", "sign", "--key-file", str(path), store_path)
    assert signing.SecretKey.load(str(path)).to_text() == NIX_SECRET
    assert signing.PublicKey.parse(NIX_PUBLIC + suffix).to_text() == NIX_PUBLIC


def test_a_carriage_return_inside_a_key_is_named() -> None:
    name, payload = NIX_SECRET.split(":")
    with pytest.raises(KeyFileError, match="carriage return"):
        signing.SecretKey.parse(f"{name}:{payload[:20]}\r{payload[20:]}")


PAYLOAD = NIX_SECRET.split(":", 1)[1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "<name>:<base64>"),
        (PAYLOAD, "<name>:<base64>"),
        (":" + PAYLOAD, "<name>:<base64>"),
        ("test-1:", "<name>:<base64>"),
        ("test-1:" + PAYLOAD[:-3] + "!==", "not valid base64"),
        ("test-1:" + PAYLOAD[:-1], "not valid base64"),
        ("test-1:" + base64.b64encode(base64.b64decode(PAYLOAD)[:48]).decode(), "48 bytes"),
        (NIX_PUBLIC, "32 bytes, expected 64"),
        # The public half is not the one derived from the seed.
        ("test-1:" + base64.b64encode(base64.b64decode(PAYLOAD)[:63] + b"\0").decode(), "corrupt"),
        ("bad name:" + PAYLOAD, "invalid key name"),
        # Written the wrong way round: the "name" is the secret itself.
        (PAYLOAD + ":test-1", "the name comes first"),
        (PAYLOAD + " x:test-1", "invalid key name:"),
    ],
    ids=[
        "empty",
        "no-name",
        "empty-name",
        "no-payload",
        "bad-char",
        "bad-padding",
        "short",
        "public-key",
        "mismatched-halves",
        "bad-name",
        "swapped",
        "swapped-with-space",
    ],
)
def test_malformed_secret_keys_never_echo_the_key(text: str, message: str) -> None:
    with pytest.raises(KeyFileError, match=message) as info:
        signing.SecretKey.parse(text)
    # What a user sees, including any chained exception.
    shown = "".join(traceback.format_exception(info.value)) + repr(info.value)
    assert PAYLOAD[:16] not in shown


def test_a_secret_key_handed_as_public_key_is_named_as_such() -> None:
    with pytest.raises(KeyFileError, match="looks like a secret key"):
        signing.PublicKey.parse(NIX_SECRET)


def test_repr_does_not_leak_the_secret() -> None:
    key = signing.SecretKey.parse(NIX_SECRET)
    assert repr(key) == "SecretKey(name='test-1')"
    assert PAYLOAD[:16] not in str(key)


@pytest.mark.parametrize("name", ["", "a:b", "two words", "line\nbreak"])
def test_generate_refuses_bad_names(name: str) -> None:
    with pytest.raises(KeyFileError, match="invalid key name"):
        signing.generate(name)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_owner_only_key_files(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "sk", NIX_SECRET, mode)
    assert signing.SecretKey.load(path).to_text() == NIX_SECRET


@pytest.mark.parametrize(
    ("mode", "who"),
    [
        (0o644, "(mode 0644) is accessible by group root and others"),
        (0o640, "(mode 0640) is accessible by group root"),
        (0o620, "(mode 0620) is accessible by group root"),
    ],
)
def test_load_refuses_key_files_open_to_group_or_others(
    tmp_path: Path, mode: int, who: str
) -> None:
    path = write(tmp_path / "sk", NIX_SECRET, mode)
    with pytest.raises(KeyFileError, match=re.escape(who)) as info:
        signing.SecretKey.load(path)
    assert f"chmod 600 {path}" in str(info.value)


def test_load_refuses_non_regular_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        signing.SecretKey.load(str(tmp_path / "fifo"))
    with pytest.raises(KeyFileError, match="not a regular file"):
        signing.SecretKey.load(str(tmp_path))


def test_load_names_the_file_and_hides_the_key(tmp_path: Path) -> None:
    path = write(tmp_path / "sk", NIX_SECRET[:-6], 0o600)
    with pytest.raises(KeyFileError, match=f"^{path}: ") as info:
        signing.SecretKey.load(path)
    assert PAYLOAD[:16] not in str(info.value)
    with pytest.raises(KeyFileError, match="cannot open"):
        signing.SecretKey.load(str(tmp_path / "missing"))


def test_public_keys_load_without_a_permission_check(tmp_path: Path) -> None:
    path = write(tmp_path / "pk", NIX_PUBLIC + "\n", 0o644)
    assert signing.PublicKey.load(path).to_text() == NIX_PUBLIC


def test_written_keys_have_safe_modes_and_read_back(tmp_path: Path) -> None:
    old = os.umask(0o077)  # the public key must still come out world-readable
    try:
        key = signing.generate("cache-1")
        signing.write_secret_key(str(tmp_path / "sk"), key)
        signing.write_public_key(str(tmp_path / "pk"), key.public_key())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "sk").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "pk").st_mode) == 0o644
    assert (tmp_path / "sk").read_text() == key.to_text()
    assert signing.SecretKey.load(str(tmp_path / "sk")).to_text() == key.to_text()
    assert signing.PublicKey.load(str(tmp_path / "pk")) == key.public_key()
    assert sorted(os.listdir(tmp_path)) == ["pk", "sk"]  # no temporary files left


def test_writing_never_overwrites_a_key(tmp_path: Path) -> None:
    path = write(tmp_path / "sk", NIX_SECRET, 0o600)
    with pytest.raises(KeyFileError, match="already exists"):
        signing.write_secret_key(path, signing.generate("cache-1"))
    assert (tmp_path / "sk").read_text() == NIX_SECRET
    assert os.listdir(tmp_path) == ["sk"]


@pytest.mark.integration
def test_keys_generated_by_nix_work_with_ours(tmp_path: Path) -> None:
    run_nix(
        "nix-store",
        "--generate-binary-cache-key",
        "nix-made-1",
        str(tmp_path / "sk"),
        str(tmp_path / "pk"),
    )
    secret = signing.SecretKey.load(str(tmp_path / "sk"))
    public = signing.PublicKey.load(str(tmp_path / "pk"))
    assert secret.public_key() == public
    assert public.verify(FINGERPRINT, secret.sign(FINGERPRINT))


@pytest.mark.integration
def test_nix_signs_exactly_what_we_sign(tmp_path: Path) -> None:
    # Ed25519 is deterministic: if Nix, using a key file we wrote, produces the
    # same signature as we do for a real path, then Nix reads our key files and
    # its fingerprint is byte for byte ours.
    key = signing.generate(f"ours-{os.getpid()}-1")
    signing.write_secret_key(str(tmp_path / "sk"), key)
    path = add_path_with_references()
    info = json.loads(run_nix("nix", "path-info", "--json", path))[0]
    assert len(info["references"]) == 2
    ours = key.sign(
        # Reversed and in SRI notation as path-info prints it: fingerprint() must normalise both.
        fingerprint(path, info["narHash"], info["narSize"], reversed(info["references"]))
    )

    run_nix("nix", "store", "sign", "--key-file", str(tmp_path / "sk"), path)
    signed = json.loads(run_nix("nix", "path-info", "--json", "--sigs", path))[0]
    assert [s for s in signed["signatures"] if s.startswith(key.name + ":")] == [ours]
    wrong = signing.generate(key.name).public_key()
    assert not wrong.verify(
        fingerprint(path, info["narHash"], info["narSize"], info["references"]), ours
    )
