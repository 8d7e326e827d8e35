"""The upload engine with plain objects in place of Nix and the bucket.

``FakeStore`` serves small directories as store paths and registers the hashes
Nix would; ``RecordingTarget`` keeps objects in memory and records, in order,
when each put began and when its object became visible.  The invariants of
DESIGN.md are checked on those records.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import lzma
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fakes import FakeStore, MiB, RecordingTarget
from uploader import signing
from uploader._exceptions import (
    StoreError,
    TransientTargetError,
    UploaderError,
    VerificationError,
)
from uploader.engine import DependencyFailed, Engine, PushResult, narinfo_key
from uploader.nixbase32 import encode as nix32
from uploader.nixbase32 import format_hash
from uploader.store import PathInfo
from uploader.storepath import basename, hash_part

KEY = signing.generate("test-cache-1")
PUBLIC = KEY.public_key()

DEFAULT_CACHE_INFO = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"


class MemoryKnown:
    """A KnownPaths in memory."""

    def __init__(self) -> None:
        self.hash_parts: set[str] = set()

    def known(self, hash_parts: Iterable[str]) -> set[str]:
        return set(hash_parts) & self.hash_parts

    def remember(self, hash_parts: Iterable[str]) -> None:
        self.hash_parts.update(hash_parts)


def decompress(key: str, data: bytes) -> bytes:
    if key.endswith(".zst"):
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        )
        return bytes(reader.read())
    if key.endswith(".xz"):
        return lzma.decompress(data)
    assert key.endswith(".nar"), key
    return data


def nar_objects(target: RecordingTarget) -> dict[str, bytes]:
    """Every NAR in the cache, decompressed, by key."""
    return {k: decompress(k, v) for k, v in target.objects.items() if k.startswith("nar/")}


def run(engine: Engine, roots: Iterable[str]) -> PushResult:
    """One push on a fresh event loop (as `nix-cache-uploader push` does)."""
    try:
        return asyncio.run(engine.push(roots))
    finally:
        engine.close()


def push(
    store: FakeStore, target: RecordingTarget, roots: Iterable[str], **options: Any
) -> PushResult:
    return run(Engine(store, target, KEY, **options), roots)


def nar_key_uncompressed(store: FakeStore, path: str) -> str:
    """The NAR's object key with compression=none (the file is the NAR)."""
    return f"nar/{nix32(hashlib.sha256(store.nar(path)).digest())}.nar"


def assert_signed_as_registered(store: FakeStore, target: RecordingTarget, path: str) -> None:
    info = target.narinfo(path)
    assert info is not None, f"no narinfo for {path}"
    registered = store.registered(path)
    assert info.store_path == path
    assert info.nar_hash == registered.nar_hash
    assert info.nar_size == registered.nar_size
    assert info.references == tuple(basename(r) for r in registered.references)
    assert len(info.sigs) == 1
    assert PUBLIC.verify(info.fingerprint(), info.sigs[0]), f"bad Sig for {path}"


# Invariants 1 and 2 over random closures -------------------------------------


@st.composite
def closures(draw: st.DrawFn) -> tuple[list[tuple[list[int], bool]], list[int]]:
    """A random DAG: node i references some nodes before it, maybe itself;
    and the roots to push."""
    size = draw(st.integers(2, 30))
    nodes = []
    for i in range(size):
        refs = draw(st.lists(st.integers(0, i - 1), max_size=4, unique=True)) if i else []
        nodes.append((refs, draw(st.booleans())))
    roots = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=size, unique=True))
    return nodes, roots


@settings(max_examples=30, deadline=None)
@given(dag=closures(), jobs=st.integers(1, 8), seed=st.integers(0, 2**32))
def test_narinfo_after_its_nar_and_its_references_narinfos(
    dag: tuple[list[tuple[list[int], bool]], list[int]], jobs: int, seed: int
) -> None:
    nodes, root_indexes = dag
    with tempfile.TemporaryDirectory() as tmp:
        store = FakeStore(Path(tmp))
        paths: list[str] = []
        for i, (refs, self_ref) in enumerate(nodes):
            paths.append(store.add(f"n{i}", [paths[r] for r in refs], self_reference=self_ref))
        roots = [paths[i] for i in root_indexes]
        target = RecordingTarget(delay=0.002, seed=seed)

        result = push(store, target, roots, jobs=jobs)

        closure = store.closure(roots)
        assert result.ok, result.failed
        assert sorted(result.uploaded) == sorted(closure)
        visible: dict[str, int] = {}
        began: dict[str, int] = {}
        for i, (event, key) in enumerate(target.events):
            {"put": visible, "begin": began}[event].setdefault(key, i)
        nars = nar_objects(target)
        for path in closure:
            info = target.narinfo(path)
            assert info is not None
            # Invariant 1: the NAR was complete before the narinfo put began.
            assert visible[info.url] < began[narinfo_key(path)], path
            # Invariant 2: so were the narinfos of its references.
            for ref in store.registered(path).references:
                if ref != path:
                    assert visible[narinfo_key(ref)] < began[narinfo_key(path)], (path, ref)
            assert_signed_as_registered(store, target, path)
            assert nars[info.url] == store.nar(path)


# Invariant 3 --------------------------------------------------------------------


@pytest.mark.parametrize("lie", ["nar_hash", "nar_size"])
def test_path_differing_from_the_database_is_not_signed_nor_its_referrers(
    tmp_path: Path, lie: str
) -> None:
    store = FakeStore(tmp_path)
    bad = store.add("bad")
    fine = store.add("fine")
    mid = store.add("mid", [bad, fine], self_reference=True)
    top = store.add("top", [mid])
    side = store.add("side", [bad])
    other = store.add("other", [fine])
    wrong: Any = format_hash(hashlib.sha256(b"not this").digest()) if lie == "nar_hash" else 8
    store.lie(bad, **{lie: wrong})
    target = RecordingTarget()

    result = push(store, target, [top, side, other], jobs=3)

    assert isinstance(result.failed[bad], VerificationError)
    assert "refusing to sign" in str(result.failed[bad])
    for referrer in (mid, top, side):
        assert isinstance(result.failed[referrer], DependencyFailed), referrer
        assert target.narinfo(referrer) is None
    assert set(result.failed) == {bad, mid, top, side}
    # Not a byte of the differing path reached the cache.
    assert target.narinfo(bad) is None
    assert store.nar(bad) not in nar_objects(target).values()
    assert sorted(result.uploaded) == sorted([fine, other])
    for path in (fine, other):
        assert_signed_as_registered(store, target, path)


# Target failures and retries ---------------------------------------------------------


def test_the_narinfo_carries_deriver_ca_and_other_keys_signatures_as_registered(
    tmp_path: Path,
) -> None:
    """Deriver and CA as the database registered them; a signature under our
    key's name (a path substituted from this cache, or signed before a key
    rotation under the same name) is replaced by the fresh one, and other
    keys' signatures are kept."""
    store = FakeStore(tmp_path)
    path = store.add("fod")
    drv = "/nix/store/" + "1" * 32 + "-fod.drv"
    ca = "fixed:r:sha256:" + "1" * 52
    other = "cache.example.org-1:" + "A" * 86 + "=="
    stale = f"{KEY.name}:" + "B" * 86 + "=="
    store.lie(path, deriver=drv, ca=ca, sigs=(stale, other))
    target = RecordingTarget()
    assert push(store, target, [path]).ok
    info = target.narinfo(path)
    assert info is not None
    assert (info.deriver, info.ca) == (basename(drv), ca)
    ours = [sig for sig in info.sigs if sig.startswith(f"{KEY.name}:")]
    assert len(ours) == 1 and PUBLIC.verify(info.fingerprint(), ours[0])
    assert other in info.sigs and len(info.sigs) == 2


def test_failed_nar_put_holds_back_referrers_and_a_retry_uploads_the_rest(
    tmp_path: Path,
) -> None:
    store = FakeStore(tmp_path)
    base = store.add("base")
    flaky = store.add("flaky", [base])
    top = store.add("top", [flaky, base])
    lone = store.add("lone")
    target = RecordingTarget()
    target.fail.add(nar_key_uncompressed(store, flaky))
    engine = Engine(store, target, KEY, compression="none", jobs=2)

    async def twice() -> tuple[PushResult, PushResult, int]:
        first = await engine.push([top, lone])
        assert target.narinfo(top) is None and target.narinfo(flaky) is None
        mark = len(target.events)
        target.fail.clear()
        second = await engine.push([top, lone])
        return first, second, mark

    try:
        first, second, mark = asyncio.run(twice())
    finally:
        engine.close()

    assert isinstance(first.failed[flaky], TransientTargetError)
    assert first.failed[flaky].store_path == flaky
    held_back = first.failed[top]
    assert isinstance(held_back, DependencyFailed)
    assert held_back.cause is first.failed[flaky]
    assert sorted(first.uploaded) == sorted([base, lone])

    assert second.ok, second.failed
    assert sorted(second.uploaded) == sorted([flaky, top])
    narinfos = [k for k in target.puts(mark) if k.endswith(".narinfo")]
    assert sorted(narinfos) == sorted(narinfo_key(p) for p in (flaky, top))
    for path in (base, flaky, top, lone):
        assert_signed_as_registered(store, target, path)


def test_second_push_uploads_nothing(tmp_path: Path) -> None:
    store = FakeStore(tmp_path)
    dep = store.add("dep", self_reference=True)
    app = store.add("app", [dep])
    target = RecordingTarget()
    push(store, target, [app])
    mark = len(target.events)
    objects = dict(target.objects)

    result = push(store, target, [app])

    assert target.events[mark:] == []
    assert target.objects == objects
    assert result.uploaded == [] and result.ok
    assert result.present == [app]


def test_known_paths_save_the_existence_checks(tmp_path: Path) -> None:
    store = FakeStore(tmp_path)
    dep = store.add("dep")
    app = store.add("app", [dep])
    tool = store.add("tool")
    target = RecordingTarget()
    known = MemoryKnown()
    push(store, target, [app, tool], known=known)
    assert known.hash_parts == {hash_part(p) for p in (dep, app, tool)}
    mark, events = len(target.exists_calls), len(target.events)

    result = push(store, target, [app, tool], known=known)

    assert [k for k in target.exists_calls[mark:] if k.endswith(".narinfo")] == []
    assert sorted(result.present) == sorted([app, tool])
    assert result.uploaded == []
    assert target.puts(events) == []


def upstream_of(paths: set[str]) -> Callable[[list[Any]], set[str]]:
    """An is_upstream callback serving ``paths`` (takes paths or PathInfos)."""

    def served(items: list[Any]) -> set[str]:
        asked = [getattr(item, "path", item) for item in items]
        return {p for p in asked if p in paths}

    return served


def test_upstream_paths_and_what_only_they_reach_are_not_uploaded(tmp_path: Path) -> None:
    store = FakeStore(tmp_path)
    libdep = store.add("libdep")
    shared = store.add("shared")
    lib = store.add("lib", [libdep, shared], self_reference=True)
    own = store.add("own", [shared])
    app = store.add("app", [lib, own])
    target = RecordingTarget()

    result = push(store, target, [app], is_upstream=upstream_of({lib}))

    assert result.ok, result.failed
    assert result.skipped_upstream == [lib]
    assert sorted(result.uploaded) == sorted([app, own, shared])
    assert target.narinfo(lib) is None and target.narinfo(libdep) is None
    assert store.nar(lib) not in nar_objects(target).values()
    assert store.nar(libdep) not in nar_objects(target).values()
    info = target.narinfo(app)
    assert info is not None and basename(lib) in info.references
    assert_signed_as_registered(store, target, app)


# Concurrent pushes ---------------------------------------------------------------------


def test_concurrent_pushes_upload_shared_paths_once(tmp_path: Path) -> None:
    store = FakeStore(tmp_path)
    base = store.add("base")
    shared = store.add("shared", [base])
    a = store.add("a", [shared])
    b = store.add("b", [shared, base])
    c = store.add("c")
    target = RecordingTarget(delay=0.02)
    infos = store.path_infos([a, b, c], closure=True)
    engine = Engine(store, target, KEY, jobs=4)

    async def both() -> list[PushResult]:
        return list(
            await asyncio.gather(engine.push_infos([a, c], infos), engine.push_infos([b], infos))
        )

    try:
        first, second = asyncio.run(both())
    finally:
        engine.close()

    assert first.ok and second.ok, (first.failed, second.failed)
    assert set(first.uploaded) | set(first.present) >= {a, c, shared, base}
    assert set(second.uploaded) | set(second.present) >= {b, shared, base}
    puts = Counter(k for k in target.puts() if k != "nix-cache-info")
    assert len(puts) == 2 * 5  # a NAR and a narinfo per path
    assert set(puts.values()) == {1}, puts
    for path in (a, b, c, shared, base):
        assert_signed_as_registered(store, target, path)


def test_path_uploaded_by_another_push_during_planning_is_not_uploaded_again(
    tmp_path: Path,
) -> None:
    store = FakeStore(tmp_path)
    shared = store.add("shared")
    deep = store.add("deep")
    chain = store.add("chain", [deep])
    target = RecordingTarget()
    infos = store.path_infos([shared, chain], closure=True)
    engine = Engine(store, target, KEY, jobs=2)
    deep_asked = threading.Event()
    release = threading.Event()

    def hold() -> None:
        deep_asked.set()
        release.wait(10)

    # The long push stalls on the second level of its plan, after it found
    # `shared` missing; the short push uploads `shared` meanwhile.
    target.before_exists[narinfo_key(deep)] = hold

    async def overlapping() -> tuple[PushResult, PushResult]:
        long = asyncio.create_task(engine.push_infos([shared, chain], infos))
        await asyncio.to_thread(deep_asked.wait, 10)
        short = asyncio.create_task(engine.push_infos([shared], infos))
        # An engine that has claimed `shared` makes the short push wait for
        # the long one: let the long one go on after a while.
        await asyncio.wait([short], timeout=1)
        release.set()
        return await short, await long

    try:
        short, long = asyncio.run(overlapping())
    finally:
        release.set()
        engine.close()

    assert short.ok and long.ok, (short.failed, long.failed)
    assert shared in short.uploaded + short.present
    assert Counter(target.puts())[narinfo_key(shared)] == 1


def test_engine_recovers_after_an_upload_crashes(tmp_path: Path) -> None:
    store = FakeStore(tmp_path)
    big = store.add("big", contents=os.urandom(9 * MiB))
    small = store.add("small")
    # The spool directory vanished: the 9 MiB NAR cannot spill to disk.
    spool = tmp_path / "spool"
    target = RecordingTarget(delay=0.5)
    target.objects["nix-cache-info"] = DEFAULT_CACHE_INFO
    engine = Engine(store, target, KEY, compression="none", jobs=2, tmp_dir=str(spool))

    async def crash_then_retry() -> PushResult:
        # Raises today: the bug in test_unwritable_tmp_dir_is_a_per_path_failure.
        with contextlib.suppress(OSError):
            await engine.push([big, small])
        spool.mkdir()
        return await engine.push([big, small])

    try:
        result = asyncio.run(crash_then_retry())
    finally:
        engine.close()

    assert result.ok, result.failed
    assert target.narinfo(big) is not None and target.narinfo(small) is not None


class CancelOnStart:
    """A Progress whose start() lets a watcher cancel the push at once."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    def start(self, total_paths: int, total_bytes: int) -> None:
        self.started.set()

    def advance(self, info: PathInfo, uploaded: bool) -> None:
        pass


def test_push_after_a_cancelled_push_completes(tmp_path: Path) -> None:
    store = FakeStore(tmp_path)
    path = store.add("app")
    target = RecordingTarget()
    engine = Engine(store, target, KEY)

    async def cancel_then_push() -> PushResult:
        progress = CancelOnStart()
        cancelled = asyncio.create_task(engine.push([path], progress))
        await progress.started.wait()
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        return await asyncio.wait_for(engine.push([path]), timeout=2)

    try:
        result = asyncio.run(cancel_then_push())
    finally:
        engine.close()

    assert result.uploaded == [path]


def test_unwritable_tmp_dir_is_a_per_path_failure(tmp_path: Path) -> None:
    store = FakeStore(tmp_path)
    big = store.add("big", contents=os.urandom(9 * MiB))
    small = store.add("small")
    target = RecordingTarget()

    result = push(
        store, target, [big, small], compression="none", tmp_dir=str(tmp_path / "missing")
    )

    assert isinstance(result.failed[big], UploaderError)
    assert result.uploaded == [small]


def test_a_disk_that_fills_while_a_nar_waits_is_a_per_path_failure_that_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filled mid-write, the temporary file fails again as it closes (its
    buffered bytes do not fit either): still the path's failure, with the
    directory and what to do, not an unexpected error of the whole batch."""
    store = FakeStore(tmp_path)
    big = store.add("big", contents=os.urandom(9 * MiB))
    small = store.add("small")
    real = tempfile.NamedTemporaryFile

    class FillsUp:
        def __init__(self, **kwargs: Any) -> None:
            self.file = real(**kwargs)
            self.name = self.file.name
            self.written = 0

        def write(self, data: bytes) -> int:
            self.written += len(data)
            if self.written > 2 * MiB:
                raise OSError(28, "No space left on device")
            return self.file.write(data)

        def close(self) -> None:
            self.file.close()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr("uploader.engine.tempfile.NamedTemporaryFile", FillsUp)
    result = push(store, RecordingTarget(), [big, small], tmp_dir=str(tmp_path))
    assert result.uploaded == [small]
    assert str(result.failed[big]).startswith(f"{big}: no space left in {tmp_path} for ")


# Compression, nix-cache-info, large NARs ------------------------------------------


@pytest.mark.parametrize(("method", "suffix"), [("zstd", ".zst"), ("xz", ".xz"), ("none", "")])
def test_nar_object_is_the_compressed_nar_the_narinfo_describes(
    tmp_path: Path, method: str, suffix: str
) -> None:
    store = FakeStore(tmp_path)
    path = store.add("app", contents=b"some text, " * 5000, self_reference=True)
    target = RecordingTarget()

    push(store, target, [path], compression=method)

    info = target.narinfo(path)
    assert info is not None
    assert info.compression == method
    assert info.url.startswith("nar/") and info.url.endswith(".nar" + suffix)
    data = target.objects[info.url]
    assert target.content_types[info.url] == "application/x-nix-nar"
    assert target.content_types[narinfo_key(path)] == "text/x-nix-narinfo"
    assert info.file_hash == format_hash(hashlib.sha256(data).digest())
    assert info.url == f"nar/{nix32(hashlib.sha256(data).digest())}.nar{suffix}"
    assert info.file_size == len(data)
    assert decompress(info.url, data) == store.nar(path)
    if method != "none":
        assert len(data) < info.nar_size / 10
    assert_signed_as_registered(store, target, path)


def test_cache_info_is_written_when_missing(tmp_path: Path) -> None:
    store = FakeStore(tmp_path)
    path = store.add("app")
    target = RecordingTarget()

    push(store, target, [path])

    assert target.objects["nix-cache-info"] == DEFAULT_CACHE_INFO
    assert target.content_types["nix-cache-info"] == "text/x-nix-cache-info"
    assert target.puts()[0] == "nix-cache-info"


def test_cache_info_is_not_rewritten(tmp_path: Path) -> None:
    store = FakeStore(tmp_path)
    path = store.add("app")
    target = RecordingTarget()
    theirs = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n"
    target.objects["nix-cache-info"] = theirs

    push(store, target, [path])

    assert target.objects["nix-cache-info"] == theirs
    assert "nix-cache-info" not in target.puts()
    assert target.narinfo(path) is not None


class SlowNix(FakeStore):
    """A store whose closure query answers only once the cache was asked
    for nix-cache-info (or after a few seconds)."""

    def __init__(self, root: Path, target: RecordingTarget) -> None:
        super().__init__(root)
        self.asked = threading.Event()
        target.before_exists["nix-cache-info"] = self.asked.set
        self.waited: bool | None = None
        self.fail: Exception | None = None

    def path_infos(self, paths: Iterable[str], **kwargs: Any) -> dict[str, PathInfo]:
        self.waited = self.asked.wait(timeout=5)
        if self.fail is not None:
            raise self.fail
        return super().path_infos(paths, **kwargs)


def test_the_cache_is_asked_while_nix_computes_the_closure(tmp_path: Path) -> None:
    """Far from S3 each question is a round trip: nix-cache-info is asked
    without waiting for Nix, and still written before anything else."""
    target = RecordingTarget()
    store = SlowNix(tmp_path, target)
    path = store.add("app")

    result = push(store, target, [path])

    assert result.ok, result.failed
    assert store.waited, "the closure was queried before the cache was asked"
    assert target.puts()[0] == "nix-cache-info"
    assert target.narinfo(path) is not None


def test_a_closure_nix_cannot_give_is_the_error_even_if_the_cache_refuses_too(
    tmp_path: Path,
) -> None:
    target = RecordingTarget()
    store = SlowNix(tmp_path, target)
    path = store.add("app")
    store.fail = StoreError("nix path-info failed: no such path")

    def refused() -> None:
        store.asked.set()
        raise TransientTargetError("s3://bucket: no answer")

    target.before_exists["nix-cache-info"] = refused

    with pytest.raises(StoreError, match="no such path"):
        push(store, target, [path])
    assert not target.puts()


def test_a_cache_that_refuses_stops_the_push_before_any_upload(tmp_path: Path) -> None:
    target = RecordingTarget()
    store = FakeStore(tmp_path)
    path = store.add("app")
    target.refuse = TransientTargetError("s3://bucket: credentials were refused")

    with pytest.raises(TransientTargetError, match="refused"):
        push(store, target, [path])
    assert not target.puts()


def test_concurrent_first_pushes_write_cache_info_once(tmp_path: Path) -> None:
    store = FakeStore(tmp_path)
    a, b = store.add("a"), store.add("b")
    target = RecordingTarget(delay=0.02)
    infos = store.path_infos([a, b])
    engine = Engine(store, target, KEY)

    async def both() -> None:
        await asyncio.gather(engine.push_infos([a], infos), engine.push_infos([b], infos))

    try:
        asyncio.run(both())
    finally:
        engine.close()

    assert target.puts().count("nix-cache-info") == 1


def test_large_nar_spills_to_disk_and_round_trips(tmp_path: Path) -> None:
    """For a target that stores whole files (file://); S3 takes it in parts
    while it is compressed (test_narstream.py)."""
    store = FakeStore(tmp_path)
    path = store.add("big", contents=os.urandom(20 * MiB))
    target = RecordingTarget(parts=False)

    result = push(store, target, [path], tmp_dir=str(tmp_path))

    assert result.ok, result.failed
    info = target.narinfo(path)
    assert info is not None
    assert target.spilled[info.url], "the compressed NAR stayed in memory"
    assert decompress(info.url, target.objects[info.url]) == store.nar(path)
    assert info.file_size == len(target.objects[info.url])
    assert_signed_as_registered(store, target, path)


# -- existence checks: listings of the cache instead of a HEAD per narinfo --


def lookup(target: RecordingTarget, keys: list[str]) -> set[str]:
    engine = Engine(FakeStore(Path(tempfile.gettempdir())), target, KEY)
    try:
        return asyncio.run(engine._lookup(keys))
    finally:
        engine.close()


def fake_hash(i: int) -> str:
    return nix32(hashlib.sha256(str(i).encode()).digest()[:20])


@settings(max_examples=150, deadline=None)
@given(
    cached=st.sets(st.integers(0, 3000), max_size=2500),
    asked=st.sets(st.integers(0, 3000), max_size=400),
    page=st.one_of(st.none(), st.integers(1, 1200)),
    extra=st.sets(st.sampled_from(["nix-cache-info", "nar/x.nar.zst", "log/y", "aaa.ls"])),
)
def test_lookup_finds_exactly_what_the_cache_has(
    cached: set[int], asked: set[int], page: int | None, extra: set[str]
) -> None:
    target = RecordingTarget(page=page)
    target.objects = {f"{fake_hash(i)}.narinfo": b"" for i in cached} | {k: b"" for k in extra}
    keys = [f"{fake_hash(i)}.narinfo" for i in asked]

    assert lookup(target, keys) == {f"{fake_hash(i)}.narinfo" for i in asked & cached}


def test_many_narinfos_in_a_small_cache_cost_a_few_listings_and_no_head() -> None:
    target = RecordingTarget()
    target.objects = {f"{fake_hash(i)}.narinfo": b"" for i in range(0, 1500, 2)}
    target.objects["nar/" + "x" * 52 + ".nar.zst"] = b""
    keys = [f"{fake_hash(i)}.narinfo" for i in range(2000)]

    found = lookup(target, keys)

    assert found == {f"{fake_hash(i)}.narinfo" for i in range(0, 1500, 2)}
    assert target.exists_calls == []
    assert 1 <= len(target.list_calls) <= 4


def test_listings_measure_the_round_trip_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settled by listings alone, the plan still learns how far the cache is."""
    import time

    target = RecordingTarget()
    target.objects = {f"{fake_hash(i)}.narinfo": b"" for i in range(0, 1500, 2)}
    listed = target.list_keys

    def far(start_after: str) -> Any:
        time.sleep(0.02)
        return listed(start_after)

    monkeypatch.setattr(target, "list_keys", far)
    engine = Engine(FakeStore(Path(tempfile.gettempdir())), target, KEY)
    try:
        asyncio.run(engine._lookup([f"{fake_hash(i)}.narinfo" for i in range(2000)]))
        assert target.exists_calls == []
        assert engine._round_trips.rtt >= 0.02
    finally:
        engine.close()


def test_a_cache_much_larger_than_the_batch_is_asked_by_head() -> None:
    # 20000 narinfos, pages of 1000: a page spans ~5% of the key space, so
    # ~3 of 60 asked keys; listing gives up after one page per range.
    target = RecordingTarget()
    target.objects = {f"{fake_hash(i)}.narinfo": b"" for i in range(20000)}
    keys = [f"{fake_hash(i)}.narinfo" for i in range(19970, 20030)]

    engine = Engine(FakeStore(Path(tempfile.gettempdir())), target, KEY)
    try:
        found = asyncio.run(engine._lookup(keys))
        assert found == {f"{fake_hash(i)}.narinfo" for i in range(19970, 20000)}
        assert len(target.list_calls) == 1
        assert len(target.exists_calls) >= 50

        # Learnt: a page spans ~5% of the hash space, so 60 keys are not
        # worth a listing; 1000 are.
        asyncio.run(engine._lookup(keys))
        assert len(target.list_calls) == 1
        more = [f"{fake_hash(i)}.narinfo" for i in range(19000, 20000)]
        assert asyncio.run(engine._lookup(more)) == set(more)
        assert len(target.list_calls) > 1
    finally:
        engine.close()


def test_few_narinfos_are_asked_by_head_and_a_target_that_cannot_list_too() -> None:
    few = RecordingTarget()
    few.objects = {f"{fake_hash(1)}.narinfo": b""}
    assert lookup(few, [f"{fake_hash(i)}.narinfo" for i in range(10)]) == {
        f"{fake_hash(1)}.narinfo"
    }
    assert few.list_calls == [] and len(few.exists_calls) == 10

    unlisted = RecordingTarget(page=None)
    unlisted.objects = dict(few.objects)
    keys = [f"{fake_hash(i)}.narinfo" for i in range(200)]
    assert lookup(unlisted, keys) == {f"{fake_hash(1)}.narinfo"}
    assert len(unlisted.exists_calls) == 200


def test_forced_paths_are_uploaded_again_nar_before_narinfo(tmp_path: Path) -> None:
    """What `verify --repair` relies on: a forced path is uploaded although
    its narinfo exists, its NAR written again (even a large one, whose URL
    exists) before the narinfo is replaced; its present references are not."""
    store = FakeStore(tmp_path)
    base = store.add("base")
    big = store.add("big", [base], contents=os.urandom(6 * MiB))
    target = RecordingTarget()
    assert push(store, target, [big]).ok
    since = len(target.events)
    engine = Engine(store, target, KEY)
    try:
        result = asyncio.run(engine.push([big], force=[big]))
    finally:
        engine.close()
    assert result.uploaded == [big] and result.present == [base]
    info = target.narinfo(big)
    assert info is not None
    assert target.puts(since) == [info.url, narinfo_key(big)]


def test_the_nars_are_ordered_by_the_round_trip_time_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request (nix-cache-info) is timed, and the order of the NARs
    weighs the chain of narinfos by that round-trip time (engine._schedule)."""
    import time

    from uploader import engine as engine_module

    store = FakeStore(tmp_path / "store")
    bottom = store.add("bottom")
    chain = [bottom]
    for i in range(5):
        chain.append(store.add(f"link{i}", [chain[-1]]))
    target = RecordingTarget()
    # Every question takes 30 ms, as 30 ms from S3.
    for key in ["nix-cache-info", *(narinfo_key(p) for p in chain)]:
        target.before_exists[key] = lambda: time.sleep(0.03)
    seen: list[tuple[list[str], float]] = []
    schedule = engine_module._schedule

    def recording(paths: Iterable[str], infos: Any, rtt: float = 0.0) -> list[str]:
        order = schedule(paths, infos, rtt)
        seen.append((order, rtt))
        return order

    monkeypatch.setattr(engine_module, "_schedule", recording)
    result = push(store, target, [chain[-1]])
    assert result.ok and sorted(result.uploaded) == sorted(chain)
    # The last call orders the NARs this push uploads.
    order, rtt = seen[-1]
    assert rtt >= 0.03
    assert order == chain  # the bottom of the chain first, then up
