"""`verify` and `--repair` on a file:// cache written by the engine from a
``FakeStore``: each kind of damage is found by its kind, and repaired."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fakes import FakeStore
from uploader import signing
from uploader.engine import Engine
from uploader.lifecycle import RepairResult, Report, VerifyOptions, repair, verify
from uploader.narinfo import NarInfo
from uploader.storepath import hash_part
from uploader.targets import ObjectPage, open_target
from uploader.targets.file import FileTarget

KEY = signing.generate("test-cache-1")
OTHER = signing.generate("someone-else-1")


class Cache:
    """A FakeStore closure pushed into a file:// cache: app -> lib -> base."""

    def __init__(self, root: Path) -> None:
        self.store = FakeStore(root / "store")
        self.base = self.store.add("base")
        self.lib = self.store.add("lib", [self.base])
        self.app = self.store.add("app", [self.lib, self.base], self_reference=True)
        self.dir = root / "cache"
        self.target = open_target(f"file://{self.dir}")
        assert isinstance(self.target, FileTarget)
        self.push(self.app)

    def engine(self) -> Engine:
        return Engine(self.store, self.target, KEY, jobs=2)

    def push(self, *paths: str) -> None:
        engine = self.engine()
        try:
            assert asyncio.run(engine.push(paths)).ok
        finally:
            engine.close()

    def narinfo(self, path: str) -> NarInfo:
        return NarInfo.parse((self.dir / f"{hash_part(path)}.narinfo").read_text())

    def nar_file(self, path: str) -> Path:
        return self.dir / self.narinfo(path).url

    def verify(self, *, deep: bool = False, keys: tuple[signing.PublicKey, ...] = ()) -> Report:
        return verify(self.target, VerifyOptions(keys=keys or (KEY.public_key(),), deep=deep))

    def repair(self, report: Report) -> RepairResult:
        engine = self.engine()
        try:
            return repair(report, engine, self.store)
        finally:
            engine.close()


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    yield Cache(tmp_path)


def kinds(report: Report) -> dict[str, str | None]:
    return {p.kind: p.store_path for p in report.problems}


def test_a_pushed_cache_is_clean(cache: Cache) -> None:
    report = cache.verify(deep=True)
    assert report.clean, report.problems
    assert report.narinfos == 3 and report.nars == 3 and not report.orphans
    assert report.nar_bytes == sum(f.stat().st_size for f in (cache.dir / "nar").iterdir())


def test_a_deleted_nar(cache: Cache) -> None:
    cache.nar_file(cache.lib).unlink()
    assert kinds(cache.verify()) == {"missing-nar": cache.lib}


def test_a_truncated_nar(cache: Cache) -> None:
    nar = cache.nar_file(cache.lib)
    nar.write_bytes(nar.read_bytes()[:-10])
    assert kinds(cache.verify()) == {"wrong-nar-size": cache.lib}


def test_a_nar_longer_than_its_file_size(cache: Cache) -> None:
    """A NAR with more bytes than FileSize is reported too, not only a
    truncated one.  Broken, a NAR replaced by a larger one (which clients
    refuse to substitute) passes verify as clean."""
    nar = cache.nar_file(cache.lib)
    nar.write_bytes(nar.read_bytes() + b"x" * 7)
    assert kinds(cache.verify()) == {"wrong-nar-size": cache.lib}


def test_a_changed_nar_byte_takes_deep(cache: Cache) -> None:
    info = cache.narinfo(cache.app)
    nar = cache.nar_file(cache.app)
    data = bytearray(nar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    nar.write_bytes(bytes(data))
    assert cache.verify().clean  # same size: only downloading tells
    problems = cache.verify(deep=True).problems
    assert [(p.kind, p.store_path) for p in problems] == [("corrupt-nar", cache.app)]
    assert info.url in problems[0].detail


def test_a_bad_signature_and_an_unknown_signer(cache: Cache) -> None:
    file = cache.dir / f"{hash_part(cache.base)}.narinfo"
    info = cache.narinfo(cache.base)
    forged = NarInfo(**{**info.__dict__, "nar_size": info.nar_size + 1})
    file.write_text(forged.render())
    assert kinds(cache.verify()) == {"bad-signature": cache.base}
    # Under keys that signed nothing here, every path is refused.
    report = cache.verify(keys=(OTHER.public_key(),))
    assert {p.kind for p in report.problems} == {"bad-signature"}
    assert len(report.problems) == 3
    assert not report.clean


def test_signatures_unchecked_without_keys(cache: Cache) -> None:
    report = verify(cache.target, VerifyOptions())
    assert report.clean and not report.signatures_checked
    assert report.to_json()["signatures"] == "unchecked"


def test_an_unsigned_narinfo_is_reported_even_without_keys(cache: Cache) -> None:
    """A narinfo with no Sig at all is reported even when no key is given
    to check signatures against (lifecycle.md).  Broken, verify calls clean
    a cache whose paths every client configured with a key refuses."""
    unsigned = NarInfo(**{**cache.narinfo(cache.lib).__dict__, "sigs": ()})
    (cache.dir / f"{hash_part(cache.lib)}.narinfo").write_text(unsigned.render())
    report = verify(cache.target, VerifyOptions())
    assert kinds(report) == {"bad-signature": cache.lib}


def test_a_missing_reference(cache: Cache) -> None:
    lib_nar = cache.narinfo(cache.lib).url
    (cache.dir / f"{hash_part(cache.lib)}.narinfo").unlink()
    report = cache.verify()
    assert kinds(report) == {"missing-reference": cache.lib}
    assert cache.app.rsplit("/", 1)[1] in report.problems[0].detail
    # Its NAR is now named by no narinfo.
    assert list(report.orphans) == [lib_nar]


def test_a_reference_pushed_after_the_listing_is_not_reported(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push running beside verify: the narinfo of a reference that appears
    after the listing passed its place is asked for again before it is
    reported.  Broken, verify beside a running push raises false alarms and
    exits 1 in monitoring."""
    lib = cache.dir / f"{hash_part(cache.lib)}.narinfo"
    text = lib.read_text()
    lib.unlink()
    list_objects = cache.target.list_objects

    def push_during(prefix: str, start_after: str) -> ObjectPage:
        page = list_objects(prefix, start_after)
        if prefix == "" and not lib.exists():
            lib.write_text(text)  # the push lands just after the listing
        return page

    monkeypatch.setattr(cache.target, "list_objects", push_during)
    report = cache.verify()
    assert report.clean, report.problems


def test_an_orphan_nar_is_waste_not_damage(cache: Cache) -> None:
    (cache.dir / "nar" / "0000.nar.zst").write_bytes(b"x" * 1234)
    report = cache.verify()
    assert report.clean
    assert report.orphans == {"nar/0000.nar.zst": 1234}


def test_an_unreadable_narinfo(cache: Cache) -> None:
    (cache.dir / f"{hash_part(cache.base)}.narinfo").write_text(
        f"StorePath: {cache.base}\nURL: nar/x.nar\n"
    )
    report = cache.verify()
    assert kinds(report) == {"unreadable-narinfo": cache.base}
    assert report.problems[0].detail == "narinfo has no NarSize"


def test_json_report(cache: Cache) -> None:
    cache.nar_file(cache.lib).unlink()
    data = json.loads(json.dumps(cache.verify().to_json()))
    assert data["clean"] is False
    assert data["counts"]["missing-nar"] == 1 and data["counts"]["corrupt-nar"] == 0
    (problem,) = data["problems"]
    assert problem["kind"] == "missing-nar"
    assert problem["store_path"] == cache.lib
    assert problem["key"] == f"{hash_part(cache.lib)}.narinfo"
    assert data["narinfos"] == 3 and data["nars"] == 2


def test_repair_fixes_what_the_store_has(cache: Cache) -> None:
    cache.nar_file(cache.lib).unlink()
    nar = cache.nar_file(cache.app)
    data = bytearray(nar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    nar.write_bytes(bytes(data))
    (cache.dir / f"{hash_part(cache.base)}.narinfo").unlink()
    report = cache.verify(deep=True)
    assert set(kinds(report)) == {"missing-nar", "corrupt-nar", "missing-reference"}
    result = cache.repair(report)
    assert result.complete, result.not_repaired
    assert sorted(result.repaired) == sorted([cache.base, cache.lib, cache.app])
    after = cache.verify(deep=True)
    assert after.clean, after.problems


def test_repair_says_what_the_store_lacks(cache: Cache, tmp_path: Path) -> None:
    cache.nar_file(cache.lib).unlink()
    report = cache.verify()
    empty = FakeStore(tmp_path / "empty")
    engine = Engine(empty, cache.target, KEY)
    try:
        result = repair(report, engine, empty)
    finally:
        engine.close()
    assert result.not_repaired == {cache.lib: "not valid in the local Nix store"}
    assert not result.complete


def test_repair_rewrites_a_large_nar_at_the_same_url(tmp_path: Path) -> None:
    """Above the size where the engine skips a NAR whose URL exists, a
    truncated NAR under the right name must still be written again."""
    cache = Cache(tmp_path)
    big = cache.store.add("big", contents=os.urandom(6 << 20))
    cache.push(big)
    nar = cache.nar_file(big)
    nar.write_bytes(nar.read_bytes()[: 1 << 20])
    report = cache.verify()
    assert kinds(report) == {"wrong-nar-size": big}
    assert cache.repair(report).complete
    assert cache.nar_file(big) == nar  # same bytes, same URL
    assert cache.verify(deep=True).clean


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP binary cache on 127.0.0.1 serving a directory, as cache.nixos.org would."""
    directory = tmp_path / "upstream"
    directory.mkdir()
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", directory
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_reference_an_upstream_serves_is_not_damage(
    cache: Cache, upstream: tuple[str, Path]
) -> None:
    url, directory = upstream
    narinfo = f"{hash_part(cache.base)}.narinfo"
    (cache.dir / narinfo).rename(directory / narinfo)
    options = VerifyOptions(keys=(KEY.public_key(),), upstream_urls=(url,))
    report = verify(cache.target, options)
    assert report.clean, report.problems
    assert report.upstream_references == 1
    # Only when signed by an upstream key, once upstream keys are given.
    trusted = VerifyOptions(**{**options.__dict__, "upstream_keys": (KEY.public_key(),)})
    assert verify(cache.target, trusted).clean
    other = VerifyOptions(**{**options.__dict__, "upstream_keys": (OTHER.public_key(),)})
    assert kinds(verify(cache.target, other)) == {"missing-reference": cache.base}


def test_deep_progress_counts_the_nar_objects_bytes_even_without_file_size(
    cache: Cache,
) -> None:
    """A narinfo another tool wrote may omit FileSize: the progress total is
    what will be downloaded, the objects' listed sizes."""
    path = cache.dir / f"{hash_part(cache.lib)}.narinfo"
    path.write_text("".join(
        line for line in path.read_text().splitlines(keepends=True)
        if not line.startswith(("FileSize:", "FileHash:", "Sig:"))
    ))  # fmt: skip
    steps: list[tuple[int, int]] = []

    class Recorder:
        def start(self, total: int, total_bytes: int = 0) -> None:
            steps.append((total, total_bytes))

        def step(self, n: int = 1, nbytes: int = 0) -> None:
            steps.append((n, nbytes))

        def finish(self) -> None:
            pass

    report = verify(
        cache.target,
        VerifyOptions(keys=(), deep=True),
        progress=lambda label: Recorder() if label == "NARs" else None,  # type: ignore[arg-type,return-value]
    )
    sizes = {p: cache.nar_file(p).stat().st_size for p in (cache.base, cache.lib, cache.app)}
    assert steps[0] == (3, sum(sizes.values()))
    assert sorted(n for _, n in steps[1:]) == sorted(sizes.values())
    assert report.nar_bytes == sum(sizes.values())
