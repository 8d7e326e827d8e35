"""A fleet of three builders sharing one bucket, and a publisher with a quorum.

On one machine the builders take turns on one Nix store: build, attest as
builder A, delete the outputs, rebuild, attest as builder B.  The judge is a
fresh Nix store that trusts only the cache's public key.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import zstandard

from tests.integration.test_metrics import scrape
from tests.support.cli import KeyPair, make_keys, run_cli
from tests.support.daemon import UploaderRun
from tests.support.nix import build, nix_path_info, random_blob_expr, substitute
from tests.support.services import NixDaemon, S3Server, free_ports, nix_client_env
from tests.support.tmpfs import small_tmpfs
from uploader.narinfo import NarInfo
from uploader.nixbase32 import encode as nix32
from uploader.nixbase32 import format_hash, parse_hash
from uploader.quorum import Attestation, StagedNar
from uploader.signing import SecretKey
from uploader.storepath import basename, hash_part

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, KeyPair]:
    """Builder keys ci-a-1, ci-b-1, ci-c-1 and the cache key."""
    keys = {name: make_keys(tmp_path, f"ci-{name}-1") for name in "abc"}
    keys["cache"] = make_keys(tmp_path, "cache-1")
    return keys


def chain_expr(salt: str, length: int = 2, *, random_bottom: bool = False) -> str:
    """Derivations p0 ← p1 ← … (each references the one before); the last is
    the result.  With ``random_bottom``, p0 holds random bytes: every build
    of it differs, while the others only hold the path of the one before."""
    lines = []
    for i in range(length):
        body = (
            "head -c 32 /dev/urandom | od -x > $out"
            if i == 0 and random_bottom
            else f"echo {salt}-{i} ${{p{i - 1}}} > $out"
            if i
            else f"echo {salt} > $out"
        )
        lines.append(
            f'  p{i} = derivation {{ name = "q{i}-{salt}"; system = builtins.currentSystem; '
            f'builder = "/bin/sh"; PATH = "/usr/bin:/bin"; args = ["-c" "{body}"]; }};'
        )
    return "let\n" + "\n".join(lines) + f"\nin p{length - 1}\n"


def closure(path: str) -> list[str]:
    return sorted(nix_path_info([path], recursive=True))


def rebuild(expr: str, paths: list[str]) -> str:
    """Delete ``paths`` from the store and build ``expr`` again (the next builder's turn)."""
    subprocess.run(["nix-store", "--delete", *paths], env=nix_client_env(),
                   check=True, capture_output=True)  # fmt: skip
    return build(expr)[0]


def attest(url: str, builder: KeyPair, path: str) -> subprocess.CompletedProcess[str]:
    return run_cli("push", "--to", url, "--attest-key-file", builder.secret_file, path)


def publish_args(url: str, fleet: dict[str, KeyPair], quorum: int = 2) -> list[str]:
    args = ["publish", "--to", url, "--secret-key-file", fleet["cache"].secret_file]
    args += ["--quorum", str(quorum), "--once"]
    for name in "abc":
        args += ["--builder-key", fleet[name].public]
    return args


def format_hash_any(nix_hash: object) -> str:
    """``sha256-<base64>`` (as `nix path-info` prints it) as ``sha256:<nix32>``."""
    return format_hash(parse_hash(str(nix_hash)))


def narinfo(weed: S3Server, bucket: str, path: str) -> bytes | None:
    return weed.get(bucket, f"{hash_part(path)}.narinfo")


def keys_in(weed: S3Server, bucket: str, prefix: str = "") -> list[str]:
    client = weed.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def attestations_in(weed: S3Server, bucket: str) -> list[str]:
    """The attestations, without the builders' read-check objects."""
    keys = keys_in(weed, bucket, "quorum/v1/attestations/")
    return [k for k in keys if not k.startswith("quorum/v1/attestations/read-check/")]


def test_two_of_three_builders_agree_and_a_fresh_store_substitutes_the_closure(
    nix_daemon: NixDaemon,
    s3: S3Server,
    bucket: str,
    fleet: dict[str, KeyPair],
    tmp_path: Path,
) -> None:
    url = s3.store_url(bucket)
    expr = chain_expr(uuid.uuid4().hex[:10], 3)
    top = build(expr)[0]
    paths = closure(top)
    assert len(paths) == 3
    assert "attested 3 paths" in attest(url, fleet["a"], top).stderr

    # One attestation of two: nothing is signed.
    one = run_cli(*publish_args(url, fleet))
    assert "published 0 paths, 3 waiting" in one.stderr
    assert all(narinfo(s3, bucket, p) is None for p in paths)
    assert keys_in(s3, bucket, "nar/") == []
    status = json.loads(run_cli("quorum", "status", "--to", url, "--json").stdout)
    assert {(w["storePath"], w["attestations"], w["needed"]) for w in status["waiting"]} == {
        (p, 1, 2) for p in paths
    }

    # Builder B rebuilds the same closure: now it is published, references first.
    top = rebuild(expr, paths)
    assert "attested 3 paths" in attest(url, fleet["b"], top).stderr
    two = run_cli(*publish_args(url, fleet), "-v")  # -v: a line per path published
    assert "published 3 paths, 0 waiting, 0 conflicts" in two.stderr
    order = [line.split()[2] for line in two.stderr.splitlines() if "INFO published" in line]
    assert order == sorted(paths, key=lambda p: len(closure(p)))  # references first

    copied = substitute(s3.http_url(bucket), [top], fleet["cache"].public,
                        dest=str(tmp_path / "fresh"))  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    for p in paths:
        assert Path(str(tmp_path / "fresh") + p).exists()
        info = NarInfo.parse((narinfo(s3, bucket, p) or b"").decode())
        assert [s.split(":")[0] for s in info.sigs] == ["cache-1"]
    # A builder key alone is not enough for a client.
    refused = substitute(s3.http_url(bucket), [top], fleet["a"].public,
                         dest=str(tmp_path / "builder-key"))  # fmt: skip
    assert refused.returncode != 0
    # Published paths' staging and attestations are gone; the records stay.
    assert keys_in(s3, bucket, "quorum/v1/staging/") == []
    assert attestations_in(s3, bucket) == []
    assert len(keys_in(s3, bucket, "quorum/v1/published/")) == 3

    # Attesting again writes nothing; publishing again changes nothing.
    before = {k: s3.get(bucket, k) for k in keys_in(s3, bucket)}
    assert "0 paths" in attest(url, fleet["c"], top).stderr
    run_cli(*publish_args(url, fleet))
    after = {k: s3.get(bucket, k) for k in keys_in(s3, bucket)}
    after.pop("quorum/v1/publisher-status.json")
    before.pop("quorum/v1/publisher-status.json")
    assert after == before


def test_an_unreproducible_path_is_reported_and_nothing_above_it_published(
    nix_daemon: NixDaemon, s3: S3Server, bucket: str, fleet: dict[str, KeyPair]
) -> None:
    url = s3.store_url(bucket)
    expr = chain_expr(uuid.uuid4().hex[:10], 2, random_bottom=True)
    top = build(expr)[0]
    paths = closure(top)
    bottom = next(p for p in paths if p != top)
    first = nix_path_info([bottom])[bottom]["narHash"]
    attest(url, fleet["a"], top)
    top = rebuild(expr, paths)
    second = nix_path_info([bottom])[bottom]["narHash"]
    assert first != second
    attest(url, fleet["b"], top)

    result = run_cli(*publish_args(url, fleet))
    assert "published 0 paths" in result.stderr
    assert f"CONFLICT {bottom}" in result.stderr
    assert narinfo(s3, bucket, bottom) is None
    assert narinfo(s3, bucket, top) is None  # its referrer agrees, but waits
    report = json.loads(s3.get(bucket, f"quorum/v1/conflicts/{hash_part(bottom)}.json")
                        or b"{}")  # fmt: skip
    assert report["storePath"] == bottom
    hashes = {c["narHash"]: [b["builder"] for b in c["builders"]] for c in report["claims"]}
    registered = {format_hash_any(first): ["ci-a-1"], format_hash_any(second): ["ci-b-1"]}
    assert hashes == registered
    for claim in report["claims"]:  # both NARs are kept, for diffoscope
        assert s3.get(bucket, claim["builders"][0]["nar"]) is not None

    status = run_cli("quorum", "status", "--to", url).stdout
    assert f"{bottom}: ci-a-1:" in status or f"{bottom}: ci-b-1:" in status
    assert f"{top}: 2 of 2 (waiting for its reference {bottom}" in status


def test_attestations_that_cannot_be_trusted_are_not_counted_and_are_reported(
    nix_daemon: NixDaemon,
    s3: S3Server,
    bucket: str,
    fleet: dict[str, KeyPair],
    tmp_path: Path,
) -> None:
    url = s3.store_url(bucket)
    path = build(chain_expr(uuid.uuid4().hex[:10], 1))[0]
    attest(url, fleet["a"], path)
    client = s3.client()
    a_key = f"quorum/v1/attestations/{hash_part(path)}/ci-a-1.json"
    genuine = Attestation.parse(client.get_object(Bucket=bucket, Key=a_key)["Body"].read())

    # B's name on A's signature: a bad signature.
    forged = Attestation(**{**genuine.__dict__, "builder": "ci-b-1"})
    b_key = a_key.replace("ci-a-1", "ci-b-1")
    client.put_object(Bucket=bucket, Key=b_key, Body=forged.to_json())
    # C signs the right claim but staged other bytes.
    other = zstandard.ZstdCompressor().compress(b"not the NAR")
    file_hash = hashlib.sha256(other).digest()
    staged = f"quorum/v1/staging/ci-c-1/{nix32(file_hash)}.nar.zst"
    client.put_object(Bucket=bucket, Key=staged, Body=other)
    lying = Attestation(
        **{
            **genuine.__dict__,
            "builder": "ci-c-1",
            "nar": StagedNar(staged, "zstd", format_hash(file_hash), len(other)),
        }
    ).signed(SecretKey.load(fleet["c"].secret_file))
    c_key = a_key.replace("ci-a-1", "ci-c-1")
    client.put_object(Bucket=bucket, Key=c_key, Body=lying.to_json())
    # D is no builder of this fleet.
    stranger = make_keys(tmp_path, "ci-d-1")
    attest(url, stranger, path)

    result = run_cli(*publish_args(url, fleet))
    assert narinfo(s3, bucket, path) is None
    assert "published 0 paths" in result.stderr
    assert "3 attestations not counted" in result.stderr
    status = json.loads(run_cli("quorum", "status", "--to", url, "--json").stdout)
    reasons = {r["key"]: r["reason"] for r in status["rejected"]}
    assert "bad signature" in reasons[b_key]
    assert "has NarHash" in reasons[c_key] and "not the attested" in reasons[c_key]
    assert "not one of the --builder-key" in reasons[a_key.replace("ci-a-1", "ci-d-1")]
    assert a_key not in reasons


def test_a_narinfo_the_cache_key_did_not_sign_is_neither_published_over_nor_recorded(
    nix_daemon: NixDaemon, s3: S3Server, bucket: str, fleet: dict[str, KeyPair], tmp_path: Path
) -> None:
    """A builder with write access to the narinfos (shared credentials) puts
    one there, signed with its own key: clients refuse it, so the path is not
    taken for published, nor its attestations dropped; it is reported."""
    url = s3.store_url(bucket)
    expr = chain_expr(uuid.uuid4().hex[:10], 1)
    path = build(expr)[0]
    attest(url, fleet["a"], path)
    path = rebuild(expr, [path])
    attest(url, fleet["b"], path)
    # Builder C signs one with its own key, as a cache of its own would.
    run_cli("push", "--to", f"file://{tmp_path / 'own'}", "--secret-key-file",
            fleet["c"].secret_file, path)  # fmt: skip
    key = f"{hash_part(path)}.narinfo"
    foreign = (tmp_path / "own" / key).read_bytes()
    s3.client().put_object(Bucket=bucket, Key=key, Body=foreign)

    result = run_cli(*publish_args(url, fleet))
    assert "is not signed by the cache key cache-1" in result.stderr, result.stderr
    assert "published 0 paths, 1 waiting" in result.stderr
    assert keys_in(s3, bucket, "quorum/v1/published/") == []
    assert len(attestations_in(s3, bucket)) == 2
    status = json.loads(run_cli("quorum", "status", "--to", url, "--json").stdout)
    (waiting,) = status["waiting"]
    assert "a narinfo the cache key did not sign is in the way" in waiting["why"]
    assert s3.get(bucket, key) == foreign, "never overwritten"

    s3.client().delete_object(Bucket=bucket, Key=key)
    assert "published 1 path" in run_cli(*publish_args(url, fleet)).stderr
    published = NarInfo.parse((narinfo(s3, bucket, path) or b"").decode())
    assert [sig.split(":")[0] for sig in published.sigs] == ["cache-1"]


def test_a_builder_refuses_the_cache_key_without_opening_it(
    s3: S3Server, bucket: str, fleet: dict[str, KeyPair], tmp_path: Path
) -> None:
    url = s3.store_url(bucket)
    # A key file that does not exist: the refusal comes before any attempt to open it.
    absent = str(tmp_path / "no-such-cache-key")
    attempts = [
        ["push", "--to", url, "--attest-key-file", fleet["a"].secret_file,
         "--secret-key-file", absent, "/nix/store/" + "0" * 32 + "-x"],
        ["push", "--to", f"{url}&secret-key={absent}", "--attest-key-file",
         fleet["a"].secret_file, "/nix/store/" + "0" * 32 + "-x"],
        ["run", "--to", url, "--attest-key-file", fleet["a"].secret_file,
         "--secret-key-file", absent, "--spool", str(tmp_path)],
    ]  # fmt: skip
    for args in attempts:
        refused = run_cli(*args, check=False)
        # push: the command line cannot work (2); run: its settings (1).
        assert refused.returncode == (2 if args[0] == "push" else 1), refused.stderr
        assert "attest mode holds no cache key" in refused.stderr
        assert "cannot open" not in refused.stderr
    config = tmp_path / "config.toml"
    config.write_text(
        f'to = "{url}"\nattest-key-file = "{fleet["a"].secret_file}"\n'
        f'secret-key-file = "{absent}"\n'
    )
    checked = run_cli("check-config", "--config", str(config), check=False)
    assert checked.returncode == 1 and "attest mode holds no cache key" in checked.stderr
    assert keys_in(s3, bucket) == []


def test_a_publisher_killed_mid_publication_leaves_a_closed_cache_and_finishes(
    nix_daemon: NixDaemon,
    s3: S3Server,
    bucket: str,
    fleet: dict[str, KeyPair],
    tmp_path: Path,
) -> None:
    url = s3.store_url(bucket)
    expr = chain_expr(uuid.uuid4().hex[:10], 30)
    top = build(expr)[0]
    paths = closure(top)
    attest(url, fleet["a"], top)
    top = rebuild(expr, paths)
    attest(url, fleet["b"], top)

    proc = subprocess.Popen(
        [sys.executable, "-m", "uploader", *publish_args(url, fleet)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ),
    )  # fmt: skip
    try:
        while proc.poll() is None and len(narinfos(s3, bucket)) < 5:
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    seen = narinfos(s3, bucket)
    assert_closed(s3, bucket, seen)

    run_cli(*publish_args(url, fleet))
    final = narinfos(s3, bucket)
    assert set(final) == {f"{hash_part(p)}.narinfo" for p in paths}
    assert all(final[k] == v for k, v in seen.items()), "a published narinfo changed"
    assert_closed(s3, bucket, final)
    copied = substitute(s3.http_url(bucket), [top], fleet["cache"].public,
                        dest=str(tmp_path / "fresh"))  # fmt: skip
    assert copied.returncode == 0, copied.stderr


def narinfos(weed: S3Server, bucket: str) -> dict[str, bytes]:
    found = {}
    for key in keys_in(weed, bucket):
        if key.endswith(".narinfo"):
            found[key] = weed.get(bucket, key) or b""
    return found


def assert_closed(weed: S3Server, bucket: str, infos: dict[str, bytes]) -> None:
    """Every narinfo's NAR and every reference's narinfo are there."""
    present = set(keys_in(weed, bucket))
    for key, text in infos.items():
        info = NarInfo.parse(text.decode())
        assert info.url in present, f"{key}: its NAR {info.url} is missing"
        for ref in info.references:
            if ref != basename(info.store_path):
                assert f"{ref[:32]}.narinfo" in present, f"{key}: reference {ref} unpublished"


def test_the_daemon_in_attest_mode_attests_each_build_and_signs_no_narinfo(
    nix_daemon: NixDaemon,
    s3: S3Server,
    bucket: str,
    fleet: dict[str, KeyPair],
    tmp_path: Path,
) -> None:
    url = s3.store_url(bucket)
    run = UploaderRun(root=tmp_path / "builder-a", store_url=url, secret_key_file="")
    run.config_file = tmp_path / "builder-a.toml"
    run.config_file.write_text(
        f'to = "{url}"\nattest-key-file = "{fleet["a"].secret_file}"\n'
        f'spool = "{run.spool}"\nstate-dir = "{run.state_dir}"\n'
        f'gc-roots-dir = "{run.gc_roots}"\nlow-priority = false\n'
    )
    expr = chain_expr(uuid.uuid4().hex[:10], 2, random_bottom=True)
    run.start()
    try:
        top = build(expr, hook=str(run.hook))[0]
        run.wait_drained()
        paths = closure(top)
        attested = attestations_in(s3, bucket)
        first_log = run.log()
        status = run_cli("status", *run.queue_args()).stdout
        waited = run_cli("wait", *run.queue_args(), "--timeout", "5")

        # Collected and built again: its bottom differs now (random bytes).
        bottom = next(p for p in paths if p != top)
        first = {k: s3.get(bucket, k) for k in attested}
        subprocess.run(["nix-store", "--delete", *paths], env=nix_client_env(),
                       check=True, capture_output=True)  # fmt: skip
        assert build(expr, hook=str(run.hook))[0] == top
        run.wait_drained()
    finally:
        run.stop()
    assert attested == sorted(f"quorum/v1/attestations/{hash_part(p)}/ci-a-1.json" for p in paths)
    assert narinfos(s3, bucket) == {}
    assert keys_in(s3, bucket, "nar/") == []
    # Nothing is in the cache yet, and nothing says it is.
    assert "staged and attested" in first_log and "in the cache" not in first_log
    assert f"attested:    {len(paths)} paths" in status and "uploaded:" not in status
    assert "spool drained: every queued build is staged and attested" in waited.stderr

    # The rebuild: the first attestations stay, the log says which result differs.
    rebuilt_log = run.log()[len(first_log) :]
    assert {k: s3.get(bucket, k) for k in attested} == first
    assert f"{bottom}: ci-a-1 attested it before with another result" in rebuilt_log
    assert f"{top}: ci-a-1 attested it before" not in rebuilt_log  # the same bytes
    assert "attested before" in rebuilt_log and "staged and attested" not in rebuilt_log


def test_attestations_that_never_reach_the_quorum_expire_reported(
    nix_daemon: NixDaemon, s3: S3Server, bucket: str, fleet: dict[str, KeyPair]
) -> None:
    url = s3.store_url(bucket)
    path = build(chain_expr(uuid.uuid4().hex[:10], 1))[0]
    attest(url, fleet["a"], path)
    kept = run_cli(*publish_args(url, fleet))
    assert "expir" not in kept.stderr
    assert keys_in(s3, bucket, "quorum/v1/staging/") != []

    expired = run_cli(*publish_args(url, fleet), "--expire-days", "0")
    assert f"expiring {path}: attested by ci-a-1, never published" in expired.stderr
    assert "1 expired" in expired.stderr
    assert attestations_in(s3, bucket) == []
    assert keys_in(s3, bucket, "quorum/v1/staging/") == []
    assert narinfos(s3, bucket) == {}


def test_a_trusted_builder_alone_publishes_through_the_publisher_daemon_and_its_metrics(
    nix_daemon: NixDaemon, s3: S3Server, bucket: str, fleet: dict[str, KeyPair], tmp_path: Path
) -> None:
    """The publisher as a service: --trusted-builder makes one attestation
    enough, passes repeat, /metrics counts, SIGTERM stops it."""
    url = s3.store_url(bucket)
    top = build(chain_expr(uuid.uuid4().hex[:10], 2))[0]
    paths = closure(top)
    attest(url, fleet["c"], top)
    (port,) = free_ports(1)
    args = publish_args(url, fleet, quorum=3)
    args.remove("--once")
    args += ["--trusted-builder", "ci-c-1", "--interval", "0.5", "--metrics", str(port)]
    log = tmp_path / "publisher.log"
    with open(log, "wb") as out:
        publisher = subprocess.Popen([sys.executable, "-m", "uploader", *args], stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not all(narinfo(s3, bucket, p) is not None for p in paths):
            assert publisher.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        # The next pass has nothing left to do; the counters say what happened.
        time.sleep(1.5)
        series = scrape(port)
        assert series["nix_cache_uploader_quorum_published_total"] == len(paths)
        assert series["nix_cache_uploader_quorum_waiting"] == 0
        assert series["nix_cache_uploader_quorum_last_pass_timestamp_seconds"] > 0
    finally:
        publisher.send_signal(signal.SIGTERM)
        assert publisher.wait(timeout=60) == 0, log.read_text()
    copied = substitute(s3.http_url(bucket), [top], fleet["cache"].public, dest=str(tmp_path / "f"))
    assert copied.returncode == 0, copied.stderr


def test_what_the_publisher_published_is_a_root_that_gc_keeps(
    nix_daemon: NixDaemon, s3: S3Server, bucket: str, fleet: dict[str, KeyPair], tmp_path: Path
) -> None:
    url = s3.store_url(bucket)
    expr = chain_expr(uuid.uuid4().hex[:10], 3)
    top = build(expr)[0]
    paths = closure(top)
    attest(url, fleet["a"], top)
    attest(url, fleet["b"], rebuild(expr, paths))
    assert "published 3 paths" in run_cli(*publish_args(url, fleet)).stderr
    gc = ["gc", "--to", url, "--delete", "--grace", "0", "--keep-days", "0", "--nar-delay", "0"]
    time.sleep(2)  # past the second of the root: kept as the newest, not as young
    for _ in range(2):  # the second run could delete what the first marked
        run_cli(*gc)
    assert all(narinfo(s3, bucket, p) is not None for p in paths)
    copied = substitute(s3.http_url(bucket), [top], fleet["cache"].public, dest=str(tmp_path / "f"))
    assert copied.returncode == 0, copied.stderr


def test_a_closure_with_a_local_source_is_attested_and_published(
    nix_daemon: NixDaemon, s3: S3Server, bucket: str, fleet: dict[str, KeyPair], tmp_path: Path
) -> None:
    """A source a derivation refers to was added here, not built nor
    substituted (no "ultimate" in Nix 2.8): its content address proves it,
    one attestation publishes it, and what refers to it follows."""
    url = s3.store_url(bucket)
    salt = uuid.uuid4().hex[:10]
    source = tmp_path / f"src-{salt}.txt"
    source.write_text(f"source {salt}\n")
    top = build(
        f'derivation {{ name = "wrap-{salt}"; system = builtins.currentSystem; '
        f'builder = "/bin/sh"; PATH = "/usr/bin:/bin"; '
        f'args = ["-c" "echo ${{{source}}} > $out"]; }}'
    )[0]
    paths = closure(top)
    (src,) = [p for p in paths if p != top]
    assert str(nix_path_info([src])[src].get("ca")).startswith("fixed:r:sha256:")
    for name in "ab":
        pushed = attest(url, fleet[name], top)
        assert "attested 2 paths" in pushed.stderr, pushed.stderr
        assert "not built here" not in pushed.stderr
    # Builders write nothing outside quorum/v1/: the publisher writes nix-cache-info.
    assert s3.get(bucket, "nix-cache-info") is None
    assert sorted(keys_in(s3, bucket, "quorum/v1/attestations/read-check/")) == [
        "quorum/v1/attestations/read-check/ci-a-1.json",
        "quorum/v1/attestations/read-check/ci-b-1.json",
    ]

    result = run_cli(*publish_args(url, fleet))
    assert "published 2 paths, 0 waiting" in result.stderr, result.stderr
    assert s3.get(bucket, "nix-cache-info") is not None
    copied = substitute(s3.http_url(bucket), [top], fleet["cache"].public, dest=str(tmp_path / "f"))
    assert copied.returncode == 0, copied.stderr
    status = json.loads(run_cli("quorum", "status", "--to", url, "--json").stdout)
    assert status["waiting"] == [] and status["rejected"] == []


def test_a_full_disk_on_the_publisher_fails_the_pass_and_holds_nothing_against_the_builder(
    nix_daemon: NixDaemon, s3: S3Server, bucket: str, fleet: dict[str, KeyPair], tmp_path: Path
) -> None:
    """The publisher copies each staged NAR to check it: with no room for
    the copy, the pass fails in one line and is tried again; the builder's
    attestation is not listed as not counted, and counts once there is room."""
    url = s3.store_url(bucket)
    path = build(random_blob_expr("publisher-full", 256 << 10))[0]
    attest(url, fleet["a"], path)
    args = [*publish_args(url, fleet, quorum=1)]
    with small_tmpfs(tmp_path / "small", "64k") as small:
        full = run_cli(*args, "--tmp-dir", str(small), check=False)
        assert full.returncode == 1
        (line,) = [x for x in full.stderr.splitlines() if x.startswith("error:")]
        assert line.startswith(f"error: no space left in {small} for a copy of "), line
        assert "Traceback" not in full.stderr
        assert list(small.iterdir()) == []
    status = json.loads(run_cli("quorum", "status", "--to", url, "--json").stdout)
    assert status["rejected"] == []
    assert "published 1 path" in run_cli(*args).stderr
    assert narinfo(s3, bucket, path) is not None
