"""The builder's attester and the publisher's passes over a real file:// bucket
(uploader/quorum/attest.py, publish.py, status.py, metrics.py)."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.unit.test_quorum_attestation import PATH, attestation
from tests.unit.test_quorum_ca import NIX_MADE
from uploader import nar
from uploader._exceptions import TargetError
from uploader.engine import StoredNar
from uploader.nixbase32 import format_hash
from uploader.quorum import Attestation, Attester, Bucket, Publisher, open_bucket, quorum_status
from uploader.quorum.attestation import StagedNar
from uploader.quorum.layout import attestation_key
from uploader.quorum.metrics import PublisherMetrics
from uploader.quorum.publish import ROOT_REFRESH, PassResult
from uploader.quorum.reports import describe_claims
from uploader.signing import generate
from uploader.store import PathInfo

KEYS = {name: generate(name) for name in ("ci-a-1", "ci-b-1", "ci-x-1")}
PUBLIC = {name: KEYS[name].public_key() for name in ("ci-a-1", "ci-b-1")}
CACHE = generate("cache-1")
ROOTS = "lifecycle/v1/roots/quorum-publisher/"
OTHER = "/nix/store/" + "1" * 32 + "-other"


def sha(data: bytes) -> str:
    return format_hash(hashlib.sha256(data).digest())


@pytest.fixture
def bucket(tmp_path: Path) -> Bucket:
    return open_bucket(f"file://{tmp_path / 'bucket'}")


def put(bucket: Bucket, a: Attestation) -> str:
    key = attestation_key(a.store_path, a.builder)
    bucket.put_bytes(key, a.signed(KEYS[a.builder]).to_json(), "application/json")
    return key


def publisher(
    bucket: Bucket, clock: list[float] | None = None, expire_after: float | None = None
) -> Publisher:
    now = clock or [1_700_000_000.0]
    return Publisher(
        bucket, CACHE, PUBLIC, quorum=2, clock=lambda: now[0], expire_after=expire_after
    )


def info(
    path: str, *, ultimate: bool, ca: str | None = None, refs: tuple[str, ...] = ()
) -> PathInfo:
    return PathInfo(path, sha(b"nar"), 100, refs, ca=ca, ultimate=ultimate)


# --- the builder ---------------------------------------------------------------


def test_a_builder_attests_content_addressed_paths_it_did_not_build(bucket: Bucket) -> None:
    attester = Attester(bucket, KEYS["ci-a-1"])
    ca_path, ca, refs = NIX_MADE[3]  # fixed:r:sha256, as `nix-store --add` makes
    text_path, text_ca, text_refs = NIX_MADE[1]
    substituted = "/nix/store/" + "2" * 32 + "-substituted"
    infos = [
        info(ca_path, ultimate=False, ca=ca, refs=refs),
        info(text_path, ultimate=False, ca=text_ca, refs=text_refs),
        info(substituted, ultimate=False),
        # A content address that does not give the path proves nothing.
        info(ca_path.replace("-q", "-z"), ultimate=False, ca=ca, refs=refs),
        info(PATH, ultimate=True),
    ]
    skipped = attester.skip(infos)
    assert skipped == {substituted, ca_path.replace("-q", "-z")}
    assert attester.not_built_here == skipped


class ForbiddenReads:
    """A bucket whose credentials may write attestations but not read them:
    S3 answers such a GET 403, which the target reports as missing."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.url = bucket.url

    def get(self, key: str) -> bytes | None:
        return None if key.startswith("quorum/v1/attestations/") else self.bucket.get(key)

    def exists(self, key: str) -> bool:
        return False if key.startswith("quorum/v1/attestations/") else self.bucket.exists(key)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self.bucket.put_bytes(key, data, content_type)


def stored_nar(builder: str, file_hash: str) -> StoredNar:
    return StoredNar(f"quorum/v1/staging/{builder}/x.nar.zst", "zstd", file_hash, 99)


def test_a_builder_that_cannot_read_its_attestations_fails_and_keeps_the_first(
    bucket: Bucket,
) -> None:
    first = Attester(bucket, KEYS["ci-a-1"])
    first.record(info(PATH, ultimate=True), stored_nar("ci-a-1", sha(b"first")))
    key = attestation_key(PATH, "ci-a-1")
    kept = bucket.get(key)

    blind = Attester(ForbiddenReads(bucket), KEYS["ci-a-1"])  # type: ignore[arg-type]
    rebuilt = PathInfo(PATH, sha(b"rebuilt"), 100, (), ultimate=True)
    with pytest.raises(TargetError, match=r"cannot read back .*s3:GetObject"):
        blind.skip([rebuilt])
    with pytest.raises(TargetError, match="cannot read back"):
        blind.record(rebuilt, stored_nar("ci-a-1", sha(b"second")))
    assert bucket.get(key) == kept


def test_a_builder_that_can_read_keeps_its_first_attestation(bucket: Bucket) -> None:
    attester = Attester(bucket, KEYS["ci-a-1"])
    attester.record(info(PATH, ultimate=True), stored_nar("ci-a-1", sha(b"first")))
    key = attestation_key(PATH, "ci-a-1")
    kept = bucket.get(key)
    rebuilt = PathInfo(PATH, sha(b"rebuilt"), 100, (), ultimate=True)
    Attester(bucket, KEYS["ci-a-1"]).record(rebuilt, stored_nar("ci-a-1", sha(b"second")))
    assert bucket.get(key) == kept


# --- the publisher -------------------------------------------------------------


def test_status_counts_only_what_the_publisher_counts(bucket: Bucket) -> None:
    put(bucket, attestation("ci-a-1"))
    put(bucket, attestation("ci-x-1"))  # not one of the --builder-key keys
    publisher(bucket).run_pass()
    (waiting,) = quorum_status(bucket, None)["waiting"]
    assert (waiting["attestations"], waiting["needed"]) == (1, 2)
    assert waiting["builders"] == ["ci-a-1"]


def test_status_counts_nothing_before_the_first_pass(bucket: Bucket) -> None:
    """No publisher status yet: no keys to check against, so a stranger's
    attestation (or any object of that name) is listed, not counted."""
    put(bucket, attestation("ci-x-1"))
    bucket.put_bytes(attestation_key(PATH, "ci-y-1"), b"null", "application/json")
    (waiting,) = quorum_status(bucket, 2)["waiting"]
    assert (waiting["attestations"], waiting["builders"]) == (0, [])
    assert waiting["why"] == (
        "no publisher pass yet: 2 attestations listed (ci-x-1, ci-y-1), none checked"
    )


def test_status_does_not_count_unknown_builders_the_publisher_has_not_seen(
    bucket: Bucket,
) -> None:
    publisher(bucket).run_pass()  # its status names its builders
    put(bucket, attestation("ci-a-1"))
    put(bucket, attestation("ci-x-1"))
    (waiting,) = quorum_status(bucket, None)["waiting"]
    assert waiting["attestations"] == 1
    assert waiting["why"] == "not yet checked by the publisher"


def test_a_conflict_a_dropped_builder_key_ends_leaves_the_status_too(bucket: Bucket) -> None:
    """Dropping a builder's key settles the paths it alone disputed: the
    next pass removes their conflict reports, which `quorum status` reads."""
    put(bucket, attestation("ci-a-1"))
    put(bucket, attestation("ci-b-1", nar_hash=sha(b"another build")))
    assert publisher(bucket).run_pass().conflicts == [PATH]
    (conflict,) = quorum_status(bucket, None)["conflicts"]
    assert conflict["storePath"] == PATH
    assert bucket.list_prefix("quorum/v1/conflicts/")

    without_b = Publisher(bucket, CACHE, {"ci-a-1": PUBLIC["ci-a-1"]}, quorum=2)
    result = without_b.run_pass()
    assert result.conflicts == [] and list(result.waiting) != []
    status = quorum_status(bucket, None)
    assert status["conflicts"] == []
    assert [(w["storePath"], w["attestations"]) for w in status["waiting"]] == [(PATH, 1)]
    assert status["waiting"][0]["why"] == "needs 1 more builder to build and attest it"
    assert bucket.list_prefix("quorum/v1/conflicts/") == []

    # The key back: disputed again, and reported again.
    assert publisher(bucket).run_pass().conflicts == [PATH]
    assert len(quorum_status(bucket, None)["conflicts"]) == 1


def test_attestations_a_pass_deleted_are_not_listed_as_not_counted(bucket: Bucket) -> None:
    put(bucket, attestation("ci-a-1"))
    stranger = put(bucket, attestation("ci-x-1"))
    result = publisher(bucket, [time.time() + 10], expire_after=0.0).run_pass()
    assert result.expired == [PATH]
    assert stranger in {r["key"] for r in result.rejected}  # this pass did not count it
    assert bucket.get(stranger) is None
    assert quorum_status(bucket, None)["rejected"] == []


def test_the_rejected_counter_counts_each_attestation_once(bucket: Bucket) -> None:
    put(bucket, attestation("ci-a-1"))
    put(bucket, attestation("ci-x-1"))
    p, metrics = publisher(bucket), PublisherMetrics()
    for _ in range(3):
        metrics.record(p.run_pass(), 0.1)
    total = "nix_cache_uploader_quorum_rejected_total"
    assert metrics.registry.get_sample_value(total) == 1
    put(bucket, attestation("ci-x-1", store_path=OTHER))
    metrics.record(p.run_pass(), 0.1)
    assert metrics.registry.get_sample_value(total) == 2


def roots(bucket: Bucket) -> list[str]:
    return [k for k, _ in bucket.list_prefix(ROOTS)]


def test_an_idle_publisher_writes_no_new_root_each_pass(bucket: Bucket) -> None:
    # Ready (two builders agree) but waiting for its reference: the root
    # lists it on every pass.
    for builder in ("ci-a-1", "ci-b-1"):
        put(bucket, attestation(builder, references=(OTHER,)))
    clock = [1_700_000_000.0]
    p = publisher(bucket, clock)
    for _ in range(3):
        result = p.run_pass()
        assert "waiting for its reference" in result.waiting[PATH[11:43]]["why"]
        clock[0] += 30
    assert len(roots(bucket)) == 1
    # A new path to protect: a new root.
    for builder in ("ci-a-1", "ci-b-1"):
        put(bucket, attestation(builder, store_path=OTHER.replace("-other", "-b"), references=()))
    p.run_pass()
    assert len(roots(bucket)) == 2
    clock[0] += 30
    p.run_pass()
    assert len(roots(bucket)) == 2
    # The same paths an hour later: a new root, so --keep-days alone keeps one.
    clock[0] += ROOT_REFRESH
    p.run_pass()
    assert len(roots(bucket)) == 3


def test_the_publisher_writes_nix_cache_info(bucket: Bucket) -> None:
    publisher(bucket).run_pass()
    assert (bucket.get("nix-cache-info") or b"").startswith(b"StoreDir: /nix/store")


def test_a_path_no_attestation_of_counts_is_named_and_says_why(bucket: Bucket) -> None:
    put(bucket, attestation("ci-x-1"))  # not one of the --builder-key keys
    (waiting,) = publisher(bucket).run_pass().waiting.values()
    assert waiting["storePath"] == PATH, "named by its claim, not its bare hash"
    assert waiting["why"] == "no attestation counts (see the ones not counted)"


def test_a_conflict_on_references_alone_says_so(
    bucket: Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    """Two builders with the same NAR but different references: the NARs
    compare equal, so the message must show where the sides differ."""
    put(bucket, attestation("ci-a-1"))
    put(bucket, attestation("ci-b-1", references=(OTHER,)))
    with caplog.at_level("WARNING"):
        assert publisher(bucket).run_pass().conflicts == [PATH]
    (line,) = [r.getMessage() for r in caplog.records if "CONFLICT" in r.getMessage()]
    assert f"with references [{OTHER.rsplit('/', 1)[1]}]" in line
    (conflict,) = quorum_status(bucket, None)["conflicts"]
    assert sorted(describe_claims(conflict))[1].startswith("ci-b-1: ")
    assert sorted(describe_claims(conflict))[1].endswith(f"[{OTHER.rsplit('/', 1)[1]}]")


def test_an_oversized_attestation_is_refused_without_reading_it_whole(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A builder may write anything below its name: the publisher, the one
    machine with the cache key, reads no more of it than an attestation may be."""
    from uploader.quorum.attestation import MAX_SIZE

    key = put(bucket, attestation("ci-a-1"))
    huge = key.replace("ci-a-1", "ci-b-1")
    bucket.put_bytes(huge, b"{" + b" " * (3 * MAX_SIZE), "application/json")
    read: list[int] = []
    real_open = bucket.open_object

    def counted(k: str):  # type: ignore[no-untyped-def]
        stream = real_open(k)
        if stream is not None and k == huge:
            real_read = stream.read
            stream.read = lambda n=-1: (d := real_read(n), read.append(len(d)))[0]  # type: ignore
        return stream

    monkeypatch.setattr(bucket, "open_object", counted)
    real_get = bucket.get
    monkeypatch.setattr(
        bucket, "get", lambda k: pytest.fail(f"{k} read whole") if k == huge else real_get(k)
    )
    result = publisher(bucket).run_pass()
    assert sum(read) == MAX_SIZE + 1
    reasons = {r["key"]: r["reason"] for r in result.rejected}
    assert reasons[huge] == f"attestation is too large (over {MAX_SIZE} bytes)"


def stage_agreeing(bucket: Bucket, tmp_path: Path) -> None:
    """Builders ci-a-1 and ci-b-1 attest the same real NAR of PATH, each
    with the NAR staged under its name: ready at a quorum of two."""
    (tmp_path / "out").write_bytes(b"built the same on both\n")
    data = b"".join(nar.dump(str(tmp_path / "out")))
    packed = zstandard.ZstdCompressor().compress(data)
    for builder in ("ci-a-1", "ci-b-1"):
        url = f"quorum/v1/staging/{builder}/x.nar.zst"
        bucket.put_bytes(url, packed, "application/x-nix-nar")
        staged = StagedNar(url, "zstd", sha(packed), len(packed))
        put(bucket, attestation(builder, nar_hash=sha(data), nar_size=len(data), nar=staged,
                                references=()))  # fmt: skip


def test_a_second_publisher_finding_a_path_published_under_it_rejects_nothing(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two publishers at once (a restart overlapping, a second by mistake):
    the one that finds the staged NARs gone because the other published the
    path meanwhile counts it as published, not as attestations to reject."""
    stage_agreeing(bucket, tmp_path)
    first, second = publisher(bucket), publisher(bucket)
    real_open = bucket.open_object
    overtaken: list[PassResult] = []

    def overtaking(key: str):  # type: ignore[no-untyped-def]
        if key.startswith("quorum/v1/staging/") and not overtaken:
            monkeypatch.setattr(bucket, "open_object", real_open)
            overtaken.append(first.run_pass())  # publishes it, removing the staged NARs
        return real_open(key)

    monkeypatch.setattr(bucket, "open_object", overtaking)
    result = second.run_pass()
    assert [r.published for r in overtaken] == [[PATH]]
    assert result.rejected == [] and result.waiting == {} and result.published == []
    assert result.already == [PATH]
    assert quorum_status(bucket, None)["rejected"] == []
    assert bucket.get(f"{PATH[11:43]}.narinfo") is not None


def test_a_staged_nar_that_cannot_be_read_fails_the_pass_not_the_builder(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of a staged NAR that breaks off (the network, the server) is
    the pass's failure: the attestation is not excluded for the rest of the
    publisher's life, and the next pass publishes the path."""
    stage_agreeing(bucket, tmp_path)

    class BreaksOff(io.RawIOBase):
        def readinto(self, buffer: Any) -> int:
            raise ConnectionResetError("reset by peer")

    real_open = bucket.open_object
    monkeypatch.setattr(
        bucket, "open_object", lambda k: BreaksOff() if "staging" in k else real_open(k)
    )
    p = publisher(bucket)
    with pytest.raises(TargetError, match="ConnectionResetError: reset by peer"):
        p.run_pass()
    assert p.excluded == {}
    monkeypatch.setattr(bucket, "open_object", real_open)
    assert p.run_pass().published == [PATH]


def test_a_publisher_stopped_before_the_nar_leaves_no_narinfo(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The NAR is written before the narinfo.  Broken, a publisher killed
    between the two leaves a signed narinfo without its NAR, and the next
    pass takes the path for published and never writes the NAR."""
    stage_agreeing(bucket, tmp_path)

    def killed(*args: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(bucket, "put_file", killed)
    with pytest.raises(RuntimeError, match="killed"):
        publisher(bucket).run_pass()
    assert bucket.get(f"{PATH[11:43]}.narinfo") is None


def test_an_attestation_never_makes_the_publisher_delete_outside_staging(
    bucket: Bucket, tmp_path: Path
) -> None:
    """Once a path is published, the staged NARs of its attestations go,
    but only those in each builder's own staging area.  Broken, anyone who
    may write one attestation can have the publisher delete any object of
    the cache."""
    stage_agreeing(bucket, tmp_path)
    bucket.put_bytes("nar/victim.nar.zst", b"someone's NAR", "application/x-nix-nar")
    stranger = StagedNar("nar/victim.nar.zst", "zstd", "sha256:" + "1" * 52, 13)
    put(bucket, attestation("ci-x-1", nar=stranger))
    assert publisher(bucket).run_pass().published == [PATH]
    assert bucket.get("nar/victim.nar.zst") == b"someone's NAR"
