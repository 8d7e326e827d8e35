from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.requirements import add_path_with_references, run_nix
from uploader import nixbase32, signing
from uploader._exceptions import InvalidPathError
from uploader.narinfo import NarInfo, fingerprint

# Written by Nix 2.8.0 (`nix copy --to file://...?compression=zstd&secret-key=...`).
NIX_NARINFO = """\
StorePath: /nix/store/gxs9hr309n6jrgv3dzmbklh6rcf9iw7v-x-12036
URL: nar/05wmykb5nsq20r3q2ypnq3782bbqgcsn4068jmqncrp7c1fm5wg7.nar.zst
Compression: zstd
FileHash: sha256:05wmykb5nsq20r3q2ypnq3782bbqgcsn4068jmqncrp7c1fm5wg7
FileSize: 163
NarHash: sha256:1nmyb06kh13gzyhnnibqlia68na1hr5b562ckg5xwfvvr8mz45gj
NarSize: 216
References: qqs0540h93fdwg46kxga1ql5id84hrmz-y-12036 rxf23p6a4vxh37jjfb21yj4cs1gc80gw-a-12036
Sig: test-1:jwmxRa2OrFOxdRsWfbOdPCu5TXfYPgbXJWSu0l2OpMFT4XlPTIen0U/pRbZpdUOZWrAAX2GHA3WA0SxgqixMCA==
CA: text:sha256:1wfahrwv79i40chsmv66v6m5bj9bgjh5piwfcjrryfybxkrfgkgs
"""
NIX_PUBLIC_KEY = "test-1:/QmDU3pZkRCwdcLBkzZkF0H8HnBnhKChI/MUIODBI9Q="
NIX_INFO = NarInfo(
    store_path="/nix/store/gxs9hr309n6jrgv3dzmbklh6rcf9iw7v-x-12036",
    url="nar/05wmykb5nsq20r3q2ypnq3782bbqgcsn4068jmqncrp7c1fm5wg7.nar.zst",
    compression="zstd",
    file_hash="sha256:05wmykb5nsq20r3q2ypnq3782bbqgcsn4068jmqncrp7c1fm5wg7",
    file_size=163,
    nar_hash="sha256:1nmyb06kh13gzyhnnibqlia68na1hr5b562ckg5xwfvvr8mz45gj",
    nar_size=216,
    # Out of order on purpose: the narinfo must list them sorted.
    references=(
        "rxf23p6a4vxh37jjfb21yj4cs1gc80gw-a-12036",
        "qqs0540h93fdwg46kxga1ql5id84hrmz-y-12036",
    ),
    sigs=(
        "test-1:jwmxRa2OrFOxdRsWfbOdPCu5TXfYPgbXJWSu0l2OpMFT4XlPTIen0U/pRbZpdUOZWrAAX2GHA3WA0SxgqixMCA==",
    ),
    ca="text:sha256:1wfahrwv79i40chsmv66v6m5bj9bgjh5piwfcjrryfybxkrfgkgs",
)
HASH = "sha256:1nmyb06kh13gzyhnnibqlia68na1hr5b562ckg5xwfvvr8mz45gj"
PATH = "/nix/store/gxs9hr309n6jrgv3dzmbklh6rcf9iw7v-x-12036"


def test_render_matches_nix_byte_for_byte() -> None:
    assert NIX_INFO.render() == NIX_NARINFO


def test_parse_reads_what_nix_writes() -> None:
    assert NarInfo.parse(NIX_NARINFO) == NIX_INFO


def test_signature_written_by_nix_verifies_against_our_fingerprint() -> None:
    key = signing.PublicKey.parse(NIX_PUBLIC_KEY)
    assert key.verify(NIX_INFO.fingerprint(), NIX_INFO.sigs[0])


def test_minimal_narinfo_has_an_empty_references_line_and_no_optional_fields() -> None:
    info = NarInfo(
        store_path=PATH,
        url="nar/x.nar",
        compression="none",
        file_hash=None,
        file_size=None,
        nar_hash=HASH,
        nar_size=120,
    )
    assert info.render() == (
        f"StorePath: {PATH}\nURL: nar/x.nar\nCompression: none\n"
        f"NarHash: {HASH}\nNarSize: 120\nReferences: \n"
    )


def test_deriver_and_several_sigs_follow_references_in_nix_order() -> None:
    info = NarInfo(
        store_path=PATH,
        url="nar/x.nar.xz",
        compression="xz",
        file_hash=None,
        file_size=None,
        nar_hash=HASH,
        nar_size=120,
        deriver="0000000000000000000000000000000a-x.drv",
        sigs=("k2:b", "k1:a"),
        ca="fixed:r:" + HASH,
    )
    assert info.render().splitlines()[-5:] == [
        "References: ",
        "Deriver: 0000000000000000000000000000000a-x.drv",
        "Sig: k2:b",
        "Sig: k1:a",
        "CA: fixed:r:" + HASH,
    ]


def test_fingerprint_format() -> None:
    refs = [
        "/nix/store/rxf23p6a4vxh37jjfb21yj4cs1gc80gw-a",
        "/nix/store/0ab5ky403c8cxajgnhrfbybp14d3nmx0-b",
    ]
    assert (
        fingerprint(PATH, HASH, 216, refs)
        == (
            f"1;{PATH};{HASH};216;"
            "/nix/store/0ab5ky403c8cxajgnhrfbybp14d3nmx0-b,/nix/store/rxf23p6a4vxh37jjfb21yj4cs1gc80gw-a"
        ).encode()
    )


def test_fingerprint_without_references_ends_in_a_semicolon() -> None:
    assert fingerprint(PATH, HASH, 216, []) == f"1;{PATH};{HASH};216;".encode()


def test_fingerprint_normalises_the_nar_hash_notation() -> None:
    digest = nixbase32.parse_hash(HASH)
    for notation in ("sha256:" + digest.hex(), "sha256-" + base64.b64encode(digest).decode()):
        assert fingerprint(PATH, notation, 216, []) == fingerprint(PATH, HASH, 216, [])


def test_fingerprint_refuses_basenames_as_references() -> None:
    with pytest.raises(InvalidPathError):
        fingerprint(PATH, HASH, 216, ["rxf23p6a4vxh37jjfb21yj4cs1gc80gw-a"])


def test_fingerprint_refuses_an_unknown_nar_size() -> None:
    with pytest.raises(ValueError, match="NarSize"):
        fingerprint(PATH, HASH, 0, [])


def test_parse_is_tolerant_of_what_old_or_other_writers_do() -> None:
    digest = nixbase32.parse_hash(HASH)
    text = (
        f"StorePath: {PATH}\nURL: nar/x.nar.bz2\nNarHash: sha256:{digest.hex()}\n"
        "NarSize: 216\nReferences:\nDeriver: unknown-deriver\nSystem: x86_64-linux\n"
        "FileHash: sha256-" + base64.b64encode(digest).decode()  # no final newline
    )
    info = NarInfo.parse(text)
    assert info.compression == "bzip2"
    assert info.nar_hash == HASH
    assert info.file_hash == HASH
    assert info.references == ()
    assert info.deriver is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.replace(f"StorePath: {PATH}\n", ""), "no StorePath"),
        (lambda t: t.replace("URL: ", "Url: "), "no URL"),
        (lambda t: t.replace(f"NarHash: {HASH}\n", ""), "no NarHash"),
        (lambda t: t.replace("NarSize: 216\n", ""), "no NarSize"),
        (lambda t: t.replace("NarSize: 216", "NarSize: -1"), "NarSize is not"),
        (lambda t: t.replace("NarSize: 216", "NarSize: 0"), "NarSize is 0"),
        # Digits Python reads but Nix does not (Arabic-Indic 216).
        (lambda t: t.replace("NarSize: 216", "NarSize: \u0662\u0661\u0666"), "NarSize is not"),
        (lambda t: t.replace("FileSize: 163", "FileSize: big"), "FileSize is not"),
        (lambda t: t.replace("NarHash: sha256:", "NarHash: md5:"), "NarHash"),
        (lambda t: t.replace("FileHash: sha256:0", "FileHash: sha256:e"), "FileHash"),
        (lambda t: t.replace("StorePath: /nix/store/", "StorePath: /nix/store/../"), "StorePath"),
        (lambda t: t + "garbage without a colon\n", "line 11"),
        (lambda t: t + "NarSize: 216\n", "more than one NarSize"),
        (lambda t: t.replace("References: q", "References: /nix/store/q"), "References"),
        (lambda t: t.replace("CA:", "Deriver: x.drv\nCA:"), "Deriver"),
    ],
)
def test_parse_errors_say_what_is_wrong(change: Callable[[str], str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NarInfo.parse(change(NIX_NARINFO))


basenames = st.builds(
    lambda digest, name: f"{nixbase32.encode(digest)}-{name}",
    st.binary(min_size=20, max_size=20),
    st.from_regex(r"[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,30}", fullmatch=True),
)
sha256s = st.binary(min_size=32, max_size=32).map(nixbase32.format_hash)
signatures = st.builds(
    lambda name, sig: f"{name}:{base64.b64encode(sig).decode()}",
    st.from_regex(r"[a-z0-9.\-]{1,20}", fullmatch=True),
    st.binary(min_size=64, max_size=64),
)
narinfos = st.builds(
    NarInfo,
    store_path=basenames.map(lambda b: f"/nix/store/{b}"),
    url=sha256s.map(lambda h: f"nar/{h[7:]}.nar.zst"),
    compression=st.sampled_from(["zstd", "xz", "none", "bzip2"]),
    file_hash=st.none() | sha256s,
    file_size=st.none() | st.integers(min_value=0, max_value=2**63),
    nar_hash=sha256s,
    nar_size=st.integers(min_value=1, max_value=2**63),
    references=st.lists(basenames, unique=True, max_size=8).map(tuple),
    deriver=st.none() | basenames.map(lambda b: b + ".drv"),
    sigs=st.lists(signatures, max_size=3).map(tuple),
    ca=st.none() | sha256s.map(lambda h: "fixed:r:" + h),
)


@given(narinfos)
def test_parse_inverts_render(info: NarInfo) -> None:
    text = info.render()
    assert NarInfo.parse(text) == info
    assert text.endswith("\n") and "\n\n" not in text


@pytest.mark.integration
def test_narinfos_written_by_nix_round_trip_and_verify(tmp_path: Path) -> None:
    key = signing.generate("round-trip-test-1")
    signing.write_secret_key(str(tmp_path / "sk"), key)
    top = add_path_with_references()
    cache = tmp_path / "cache"
    run_nix(
        "nix", "copy", "--to", f"file://{cache}?compression=none&secret-key={tmp_path / 'sk'}", top
    )
    info = json.loads(run_nix("nix", "path-info", "--json", "--recursive", top))
    narinfo_files = sorted(cache.glob("*.narinfo"))
    assert len(narinfo_files) == len(info) == 3
    for path in narinfo_files:
        text = path.read_text()
        parsed = NarInfo.parse(text)
        assert parsed.render() == text
        assert any(key.public_key().verify(parsed.fingerprint(), sig) for sig in parsed.sigs)
