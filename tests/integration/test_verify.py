"""`nix-cache-uploader verify` on a bucket `push` wrote, in a real SeaweedFS,
damaged the ways buckets get damaged; `--repair` checked by the only judge
that matters: a fresh Nix store substituting with signatures required."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cli import KeyPair, make_keys, run_cli
from tests.support.nix import build, multi_output_expr, nix_path_info, substitute
from tests.support.services import NixDaemon, S3Server
from uploader.narinfo import NarInfo
from uploader.signing import SecretKey
from uploader.storepath import hash_part

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def closure(nix_daemon: NixDaemon) -> dict[str, str]:
    """``out`` references ``lib`` and ``dep``; built once for the module
    (verify only reads the store; repair uploads what is there)."""
    expr = multi_output_expr()
    out = build(expr)[0]
    lib = build(expr, attr="lib")[0]
    dep = next(p for p in nix_path_info([out], recursive=True) if p not in (out, lib))
    return {"out": out, "lib": lib, "dep": dep}


class Bucket:
    def __init__(self, weed: S3Server, name: str, keys: KeyPair) -> None:
        self.weed, self.name, self.keys = weed, name, keys
        self.url = weed.store_url(name)
        self.s3 = weed.client()

    def push(self, *paths: str) -> None:
        run_cli("push", "--to", self.url, "--secret-key-file", self.keys.secret_file, *paths)

    def narinfo(self, path: str) -> NarInfo:
        data = self.weed.get(self.name, f"{hash_part(path)}.narinfo")
        assert data is not None, f"no narinfo for {path}"
        return NarInfo.parse(data.decode())

    def read(self, key: str) -> bytes:
        data = self.weed.get(self.name, key)
        assert data is not None, key
        return data

    def write(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.name, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.name, Key=key)

    def verify(self, *args: str, public_key: str | None = None) -> tuple[int, dict[str, object]]:
        proc = run_cli(
            "verify", "--to", self.url, "--public-key", public_key or self.keys.public,
            "--json", *args, check=False,
        )  # fmt: skip
        assert proc.returncode in (0, 1), proc.stderr
        return proc.returncode, json.loads(proc.stdout)


@pytest.fixture
def pushed(s3: S3Server, bucket: str, keys: KeyPair, closure: dict[str, str]) -> Bucket:
    b = Bucket(s3, bucket, keys)
    b.push(closure["out"])
    return b


def test_a_pushed_bucket_is_clean(pushed: Bucket, closure: dict[str, str]) -> None:
    code, report = pushed.verify("--deep")
    assert code == 0, report
    assert report["clean"] is True and report["problems"] == []
    assert report["narinfos"] == 3 and report["nars"] == 3
    assert report["orphans"] == [] and report["signatures"] == "checked"
    # The text report says the same, on stderr.
    text = run_cli("verify", "--to", pushed.url, "--public-key", pushed.keys.public_file)
    assert "3 narinfos (signatures checked), 3 NARs" in text.stderr and "clean" in text.stderr
    assert text.stdout == ""


def _flip_a_byte(b: Bucket, path: str) -> None:
    url = b.narinfo(path).url
    data = bytearray(b.read(url))
    data[len(data) // 2] ^= 0x01
    b.write(url, bytes(data))


def _forge_signature(b: Bucket, c: dict[str, str], tmp_path: Path) -> None:
    other = SecretKey.load(make_keys(tmp_path, "someone-else-1").secret_file)
    info = b.narinfo(c["dep"])
    forged = NarInfo(**{**info.__dict__, "sigs": (other.sign(info.fingerprint()),)})
    b.write(f"{hash_part(c['dep'])}.narinfo", forged.render().encode())


def _delete_nar(b: Bucket, c: dict[str, str], tmp: Path) -> None:
    b.delete(b.narinfo(c["lib"]).url)


def _truncate_nar(b: Bucket, c: dict[str, str], tmp: Path) -> None:
    url = b.narinfo(c["lib"]).url
    b.write(url, b.read(url)[:-7])


def _delete_reference(b: Bucket, c: dict[str, str], tmp: Path) -> None:
    b.delete(f"{hash_part(c['dep'])}.narinfo")


Damage = Callable[[Bucket, dict[str, str], Path], None]
DAMAGES: dict[str, tuple[Damage, str, str, bool]] = {
    # name: (damage, kind, the path reported, needs --deep)
    "deleted NAR": (_delete_nar, "missing-nar", "lib", False),
    "truncated NAR": (_truncate_nar, "wrong-nar-size", "lib", False),
    "bad signature": (_forge_signature, "bad-signature", "dep", False),
    "missing reference": (_delete_reference, "missing-reference", "dep", False),
    "changed NAR byte": (lambda b, c, t: _flip_a_byte(b, c["out"]), "corrupt-nar", "out", True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(DAMAGES))
def test_each_damage_is_found_by_its_kind(
    pushed: Bucket, closure: dict[str, str], tmp_path: Path, name: str
) -> None:
    damage, kind, which, deep = DAMAGES[name]
    damage(pushed, closure, tmp_path)
    if deep:
        assert pushed.verify()[0] == 0  # the same size: only downloading tells
    code, report = pushed.verify(*(["--deep"] if deep else []))
    assert code == 1
    assert report["clean"] is False
    problems = report["problems"]
    assert isinstance(problems, list)
    assert [(p["kind"], p["store_path"]) for p in problems] == [(kind, closure[which])]
    assert problems[0]["key"] == f"{hash_part(closure[which])}.narinfo"
    counts = report["counts"]
    assert isinstance(counts, dict) and counts[kind] == 1 and sum(counts.values()) == 1


def test_an_orphan_nar_is_listed_with_its_bytes(pushed: Bucket) -> None:
    pushed.write("nar/0000000000000000000000000000000000000000000000000000.nar.zst", b"z" * 999)
    code, report = pushed.verify()
    assert code == 0
    assert report["orphans"] == [
        {"key": "nar/0000000000000000000000000000000000000000000000000000.nar.zst", "bytes": 999}
    ]
    assert report["orphan_bytes"] == 999


def test_usage_errors_exit_2(pushed: Bucket) -> None:
    no_key = run_cli("verify", "--to", pushed.url, "--repair", check=False)
    assert no_key.returncode == 2 and "--secret-key-file" in no_key.stderr
    bad_key = run_cli("verify", "--to", pushed.url, "--public-key", "nonsense", check=False)
    assert bad_key.returncode == 2
    assert run_cli("verify", check=False).returncode == 2


def test_repair_fixes_what_the_store_has_and_a_fresh_store_substitutes(
    pushed: Bucket, closure: dict[str, str], tmp_path: Path
) -> None:
    lib_url = pushed.narinfo(closure["lib"]).url
    pushed.write(lib_url, pushed.read(lib_url)[:-7])
    _flip_a_byte(pushed, closure["out"])
    pushed.delete(f"{hash_part(closure['dep'])}.narinfo")
    code, report = pushed.verify("--deep")
    assert code == 1
    assert report["counts"] == {
        **dict.fromkeys(report["counts"], 0),  # type: ignore[arg-type]
        "wrong-nar-size": 1, "corrupt-nar": 1, "missing-reference": 1,
    }  # fmt: skip

    repaired = run_cli(
        "verify", "--to", pushed.url, "--public-key", pushed.keys.public, "--deep", "--repair",
        "--secret-key-file", pushed.keys.secret_file, check=False,
    )  # fmt: skip
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    for path in closure.values():
        assert f"repaired {path}" in repaired.stdout

    code, after = pushed.verify("--deep")
    assert code == 0, after
    copied = substitute(
        pushed.weed.http_url(pushed.name), [closure["out"]], pushed.keys.public,
        dest=str(tmp_path / "fresh"),
    )  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / f"fresh{closure['out']}/share/self").read_text().strip() == closure["out"]


def test_repair_says_what_it_could_not_repair(
    pushed: Bucket, closure: dict[str, str], tmp_path: Path
) -> None:
    missing = "/nix/store/00000000000000000000000000000000-not-built-here"
    info = pushed.narinfo(closure["lib"])
    unsigned = NarInfo(**{**info.__dict__, "references": (missing.rsplit("/", 1)[1],), "sigs": ()})
    key = SecretKey.load(pushed.keys.secret_file)
    signed = NarInfo(**{**unsigned.__dict__, "sigs": (key.sign(unsigned.fingerprint()),)})
    pushed.write(f"{hash_part(closure['lib'])}.narinfo", signed.render().encode())
    proc = run_cli(
        "verify", "--to", pushed.url, "--repair", "--secret-key-file", pushed.keys.secret_file,
        "--json", check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert [(p["kind"], p["store_path"]) for p in report["problems"]] == [
        ("missing-reference", missing)
    ]
    assert report["repair"]["not_repaired"] == [
        {"subject": missing, "reason": "not valid in the local Nix store"}
    ]


def test_a_rotated_key_signs_the_old_narinfos_again(
    pushed: Bucket, closure: dict[str, str], tmp_path: Path
) -> None:
    # docs/operations.md, "Rotating the signing key": the old narinfos are
    # found signed by the old key, signed again by repair, and a store that
    # trusts only the new key substitutes the closure.
    new = make_keys(tmp_path, "rotated-2")
    code, report = pushed.verify(public_key=new.public)
    assert code == 1
    assert report["counts"]["bad-signature"] == 3, report  # type: ignore[index]
    old_name = pushed.keys.public.split(":")[0]
    listed = run_cli("verify", "--to", pushed.url, "--public-key", new.public, check=False)
    assert f"(signed by {old_name})" in listed.stdout, listed.stdout

    repaired = run_cli(
        "verify", "--to", pushed.url, "--public-key", new.public, "--repair",
        "--secret-key-file", new.secret_file, check=False,
    )  # fmt: skip
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    code, after = pushed.verify(public_key=new.public)
    assert code == 0, after
    assert all(pushed.narinfo(p).sigs[0].startswith("rotated-2:") for p in closure.values())
    copied = substitute(
        pushed.weed.http_url(pushed.name), [closure["out"]], new.public,
        dest=str(tmp_path / "fresh"),
    )  # fmt: skip
    assert copied.returncode == 0, copied.stderr
