"""When a path is ready, waiting or disputed (uploader/quorum/tally.py)."""

from __future__ import annotations

from tests.unit.test_quorum_attestation import PATH, attestation
from tests.unit.test_quorum_ca import NIX_MADE
from uploader.quorum.attestation import Attestation
from uploader.quorum.layout import attestation_key
from uploader.quorum.tally import CONFLICT, READY, WAITING, judge
from uploader.signing import PublicKey, SecretKey, generate
from uploader.storepath import hash_part

HASH = hash_part(PATH)
KEYS = {name: generate(name) for name in ("ci-a-1", "ci-b-1", "ci-c-1")}
PUBLIC = {name: key.public_key() for name, key in KEYS.items()}


def stored(a: Attestation, key: SecretKey | None = None, *, as_builder: str | None = None):
    signed = a.signed(key or KEYS[a.builder])
    return attestation_key(PATH, as_builder or a.builder), signed.to_json()


def test_one_attestation_of_two_waits_and_two_agreeing_are_ready() -> None:
    one = [stored(attestation("ci-a-1"))]
    assert judge(HASH, one, PUBLIC, quorum=2).state == WAITING
    two = [*one, stored(attestation("ci-b-1"))]
    verdict = judge(HASH, two, PUBLIC, quorum=2)
    assert verdict.state == READY
    assert {a.builder for a in verdict.support} == {"ci-a-1", "ci-b-1"}
    assert verdict.store_path == PATH


def test_a_different_nar_hash_is_a_conflict_never_ready() -> None:
    other = attestation("ci-c-1", nar_hash="sha256:" + "1" * 52)
    found = [stored(attestation("ci-a-1")), stored(attestation("ci-b-1")), stored(other)]
    verdict = judge(HASH, found, PUBLIC, quorum=2)
    assert verdict.state == CONFLICT
    assert len(verdict.claims) == 2
    assert verdict.support == []


def test_different_references_are_a_conflict_too() -> None:
    found = [stored(attestation("ci-a-1")), stored(attestation("ci-b-1", references=()))]
    assert judge(HASH, found, PUBLIC, quorum=2).state == CONFLICT


def test_bad_signatures_unknown_keys_and_impostors_do_not_count() -> None:
    forged = stored(attestation("ci-b-1"), generate("ci-b-1"))  # same name, other key
    unknown_key = generate("ci-x-1")
    unknown = stored(attestation("ci-x-1"), unknown_key)
    impostor = stored(attestation("ci-a-1"), as_builder="ci-c-1")  # A's, stored as C's
    garbage = (attestation_key(PATH, "ci-c-1"), b"{")
    found = [stored(attestation("ci-a-1")), forged, unknown, impostor, garbage]
    verdict = judge(HASH, found, PUBLIC, quorum=2)
    assert verdict.state == WAITING
    reasons = {r.key: r.reason for r in verdict.rejected}
    assert "bad signature" in reasons[forged[0]]
    assert "not one of the --builder-key" in reasons[unknown[0]]
    assert len(verdict.rejected) == 4


def test_an_excluded_attestation_does_not_count() -> None:
    found = [stored(attestation("ci-a-1")), stored(attestation("ci-b-1"))]
    excluded = {found[1][0]: "staged NAR differs"}
    verdict = judge(HASH, found, PUBLIC, quorum=2, excluded=excluded)
    assert verdict.state == WAITING
    assert verdict.rejected[0].reason == "staged NAR differs"


def test_a_trusted_builder_alone_suffices() -> None:
    found = [stored(attestation("ci-a-1"))]
    assert judge(HASH, found, PUBLIC, quorum=3, trusted=["ci-a-1"]).state == READY
    assert judge(HASH, found, PUBLIC, quorum=3, trusted=["ci-b-1"]).state == WAITING


# A content-addressed path Nix 2.8 made (builtins.toFile "qtext" "hello quorum").
CA_PATH = "/nix/store/6szd5cb0dr6hpgj71b63gph9wdscgw60-qtext"
CA = "text:sha256:1ricphqs68yf4qb5wbawdjysh6l64mfmbxgbrk1vc3zbijx7js9j"


def test_a_content_address_that_gives_the_path_needs_no_quorum() -> None:
    a = attestation("ci-a-1", store_path=CA_PATH, references=(), ca=CA)
    found = [(attestation_key(CA_PATH, "ci-a-1"), a.signed(KEYS["ci-a-1"]).to_json())]
    verdict = judge(hash_part(CA_PATH), found, PUBLIC, quorum=3)
    assert verdict.state == READY
    assert verdict.ca == CA


def test_a_false_content_address_needs_the_quorum() -> None:
    # The claim of one builder that an input-addressed path is content-addressed.
    found = [stored(attestation("ci-a-1", ca=CA))]
    verdict = judge(HASH, found, PUBLIC, quorum=2)
    assert verdict.state == WAITING
    assert verdict.ca is None


def test_public_keys_compare_by_value() -> None:
    assert PublicKey.parse(PUBLIC["ci-a-1"].to_text()) == PUBLIC["ci-a-1"]


def test_a_recursive_ca_whose_nar_hash_differs_needs_the_quorum() -> None:
    """The content-address shortcut (one attestation is enough) holds only
    when a `fixed:r:sha256` CA equals the NarHash attested.  Broken, a
    single builder gets a CA path published whose contents do not match
    its CA, without the quorum."""
    path, ca, refs = NIX_MADE[3]  # fixed:r:sha256
    a = attestation("ci-a-1", store_path=path, references=refs, ca=ca,
                    nar_hash="sha256:" + "1" * 52)  # fmt: skip
    found = [(attestation_key(path, "ci-a-1"), a.signed(KEYS["ci-a-1"]).to_json())]
    verdict = judge(hash_part(path), found, PUBLIC, quorum=2)
    assert verdict.state == WAITING and verdict.ca is None
