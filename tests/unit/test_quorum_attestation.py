"""The attestation format and the bucket layout (docs/quorum-format.md)."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_narinfo import NIX_INFO, NIX_NARINFO, NIX_PUBLIC_KEY
from uploader._exceptions import ConfigError
from uploader.narinfo import NarInfo
from uploader.quorum.attestation import Attestation, StagedNar
from uploader.quorum.layout import (
    attestation_key,
    check_builder_name,
    parse_attestation_key,
    staging_key,
)
from uploader.signing import PublicKey, generate

STORE = "/nix/store"
PATH = f"{STORE}/gxs9hr309n6jrgv3dzmbklh6rcf9iw7v-x-12036"


def attestation(builder: str = "ci-a-1", **changes: object) -> Attestation:
    fields: dict[str, object] = {
        "builder": builder,
        "store_path": PATH,
        "nar_hash": NIX_INFO.nar_hash,
        "nar_size": NIX_INFO.nar_size,
        "references": tuple(f"{STORE}/{r}" for r in NIX_INFO.references),
        "deriver": f"{STORE}/00000000000000000000000000000000-x.drv",
        "nar": StagedNar(
            url=f"quorum/v1/staging/{builder}/x.nar.zst",
            compression="zstd",
            file_hash=NIX_INFO.file_hash or "",
            file_size=163,
        ),
        "attested_at": 1_700_000_000,
    }
    fields.update(changes)
    return Attestation(**fields)  # type: ignore[arg-type]


def test_a_signed_attestation_round_trips_and_verifies() -> None:
    key = generate("ci-a-1")
    signed = attestation().signed(key)
    parsed = Attestation.parse(signed.to_json())
    assert parsed == signed
    assert parsed.signature == signed.signature
    assert parsed.verify(key.public_key())
    assert json.loads(signed.to_json())["version"] == 1


def test_the_signature_is_nixs_narinfo_signature_over_the_same_claim() -> None:
    # Nix 2.8 signed this narinfo with key test-1: the same bytes, as an
    # attestation's signature, verify; another implementation signing Nix's
    # fingerprint therefore produces attestations this publisher counts.
    sig = NarInfo.parse(NIX_NARINFO).sigs[0]
    a = attestation("test-1", signature=sig)
    assert a.verify(PublicKey.parse(NIX_PUBLIC_KEY))
    other = attestation("test-1", signature=sig, nar_size=NIX_INFO.nar_size + 8)
    assert not other.verify(PublicKey.parse(NIX_PUBLIC_KEY))


def test_a_key_of_another_name_verifies_nothing() -> None:
    key = generate("ci-a-1")
    signed = attestation().signed(key)
    same_bytes = PublicKey.parse("ci-b-1:" + key.public_key().to_text().split(":", 1)[1])
    assert not signed.verify(same_bytes)
    with pytest.raises(ValueError, match="cannot sign for builder"):
        attestation("ci-b-1").signed(key)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(version=2), "version 2"),
        (lambda d: d.pop("narHash"), "no narHash"),
        (lambda d: d.update(narSize=0), "narSize"),
        (lambda d: d.update(narSize=True), "narSize"),
        (lambda d: d.update(storePath="/tmp/x"), "malformed"),
        (lambda d: d.update(references=["../etc"]), "malformed"),
        (lambda d: d.update(builder="a/b"), "cannot name a builder"),
        (lambda d: d["nar"].pop("fileHash"), "no fileHash"),
    ],
)
def test_malformed_attestations_are_refused_with_a_reason(change: object, message: str) -> None:
    doc = json.loads(attestation().signed(generate("ci-a-1")).to_json())
    change(doc)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        Attestation.parse(json.dumps(doc).encode())


def test_not_json_is_refused() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        Attestation.parse(b"\xff")
    with pytest.raises(ValueError, match="not a JSON object"):
        Attestation.parse(b"[]")


def test_layout_keys() -> None:
    key = attestation_key(PATH, "ci-a-1")
    assert key == "quorum/v1/attestations/gxs9hr309n6jrgv3dzmbklh6rcf9iw7v/ci-a-1.json"
    assert parse_attestation_key(key) == ("gxs9hr309n6jrgv3dzmbklh6rcf9iw7v", "ci-a-1")
    assert parse_attestation_key("quorum/v1/attestations/x/y/z.json") is None
    assert parse_attestation_key("x.narinfo") is None
    assert staging_key("ci-a-1", bytes(32), ".zst").startswith("quorum/v1/staging/ci-a-1/0000")
    with pytest.raises(ConfigError):
        check_builder_name("../up")
    with pytest.raises(ConfigError):
        staging_key("a b", bytes(32), "")
