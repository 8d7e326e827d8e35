"""Roots, pins, marks, the lock and gc on a file:// cache written by the
engine from a ``FakeStore`` (the same code paths as against S3)."""

from __future__ import annotations

import asyncio
import gc as pygc
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.fakes import FakeStore
from uploader import signing
from uploader._exceptions import TargetError, UploaderError
from uploader.cli import main
from uploader.engine import Engine
from uploader.lifecycle import (
    GcResult,
    LayoutError,
    LockHeld,
    PinRefused,
    Policy,
    Protection,
    VerifyOptions,
    add_pin,
    collect,
    list_pins,
    remove_pin,
    verify,
)
from uploader.lifecycle import gc as gc_module
from uploader.lifecycle.gc import _Deleter
from uploader.lifecycle.gclock import GcLock, LockInfo, ServerClock, held_locks, wait_for
from uploader.lifecycle.layout import LAYOUT, LOCKS, ROOTS, RUNS, key_time, time_key, timed_key
from uploader.lifecycle.marks import Marks
from uploader.lifecycle.roots import RootWriter, list_roots, read_root
from uploader.lifecycle.upstream import served_upstream as served
from uploader.narinfo import NarInfo
from uploader.state import KnownCache
from uploader.storepath import hash_part
from uploader.targets import Target, open_target
from uploader.targets.file import FileTarget

KEY = signing.generate("test-cache-1")
# Everything unreachable is deletable by the second run: no grace, no days.
TIGHT = Policy(keep_days=0, keep_last=1, grace=0, nar_delay=0)


class Cache:
    def __init__(self, root: Path) -> None:
        self.store = FakeStore(root / "store")
        self.dir = root / "cache"
        self.target = open_target(f"file://{self.dir}")
        assert isinstance(self.target, FileTarget)

    def push(self, root: str, *paths: str, known: KnownCache | None = None) -> Engine:
        guard = Protection(self.target, root, forget=known.forget if known else None)
        engine = Engine(self.store, self.target, KEY, jobs=2, guard=guard, known=known)
        try:
            assert asyncio.run(engine.push(paths)).ok
        finally:
            engine.close()
        return engine

    def has(self, path: str) -> bool:
        return (self.dir / f"{hash_part(path)}.narinfo").exists()

    def gc(self, policy: Policy = TIGHT, *, delete: bool = True) -> GcResult:
        return collect(self.target, policy, delete=delete, jobs=4)

    def clean(self) -> bool:
        report = verify(self.target, VerifyOptions(keys=(KEY.public_key(),)))
        return report.clean

    def nar_url(self, path: str) -> str:
        return NarInfo.parse((self.dir / f"{hash_part(path)}.narinfo").read_text()).url

    def newest_run(self) -> Path:
        return sorted((self.dir / RUNS).iterdir())[-1]


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path)


def test_time_keys_sort_by_time_and_read_back() -> None:
    t = 1_700_000_000.123456
    assert key_time(f"x/{time_key(t)}-ab.json") == pytest.approx(t)
    assert time_key(t) < time_key(t + 0.001) < time_key(t + 86400)


def test_a_newer_layout_is_refused(cache: Cache) -> None:
    cache.target.put_bytes(LAYOUT, json.dumps({"version": 2}).encode(), "application/json")
    with pytest.raises(LayoutError, match="layout version 2, newer than the 1"):
        cache.gc(delete=False)
    a = cache.store.add("a")
    with pytest.raises(LayoutError, match="upgrade"):
        cache.push("host", a)
    assert not cache.has(a)


def test_a_push_writes_its_root_before_and_completes_it(cache: Cache) -> None:
    base = cache.store.add("base")
    app = cache.store.add("app", [base])
    cache.push("ci", app)
    (ref,) = list_roots(cache.target)
    root = read_root(cache.target, ref.key)
    assert root is not None and root.name == "ci" and root.state == "complete"
    assert set(root.paths) == {os.path.basename(p) for p in (base, app)}
    assert ref.key.startswith(f"{ROOTS}ci/")
    assert json.loads((cache.dir / LAYOUT).read_text()) == {"version": 1}


def test_pins_add_list_rm_and_refuse_a_closure_not_in_the_cache(cache: Cache) -> None:
    base = cache.store.add("base")
    app = cache.store.add("app", [base])
    other = cache.store.add("other", [base])
    cache.push("ci", app)
    assert add_pin(cache.target, "release", [app]) == (2, 0)
    with pytest.raises(PinRefused, match=f"missing {other}"):
        add_pin(cache.target, "broken", [other])
    with pytest.raises(PinRefused):
        add_pin(cache.target, "release", [other])  # a replacement refused keeps the old pin
    (pin,) = list_pins(cache.target)
    assert pin.name == "release" and pin.paths == (os.path.basename(app),)
    assert remove_pin(cache.target, "release") and not remove_pin(cache.target, "release")
    assert list_pins(cache.target) == []


def test_retention_keeps_pins_and_kept_roots_and_deletes_the_unreachable(cache: Cache) -> None:
    base = cache.store.add("base")
    old = cache.store.add("old", [base])
    old_dep = cache.store.add("old-dep")
    old_top = cache.store.add("old-top", [old, old_dep])
    new = cache.store.add("new", [base])
    pinned_dep = cache.store.add("pinned-dep")
    pinned = cache.store.add("pinned", [pinned_dep])
    other = cache.store.add("other", [base])
    cache.push("a", old_top)
    cache.push("a", new)  # the newest of name a: old-top lapses
    cache.push("b", other)
    cache.push("c", pinned)
    cache.push("c", new)
    add_pin(cache.target, "keep", [pinned])
    first = cache.gc()
    assert not first.plan.narinfos
    assert first.plan.candidates == {hash_part(p) for p in (old, old_dep, old_top)}
    second = cache.gc()
    assert sorted(second.plan.narinfos) == sorted(hash_part(p) for p in (old, old_dep, old_top))
    for p in (old, old_dep, old_top):
        assert not cache.has(p)
    for p in (base, new, pinned, pinned_dep, other):
        assert cache.has(p)
    assert cache.clean()
    # The lapsed root went with the first run that deleted.
    assert {r.name for r in list_roots(cache.target)} == {"a", "b", "c"}


def test_a_shared_nar_lives_while_one_narinfo_names_it(cache: Cache) -> None:
    kept = cache.store.add("kept")
    gone = cache.store.add("gone")
    cache.push("x", gone)
    cache.push("x", kept)
    # A second narinfo naming the NAR of `kept` (as two paths with the same
    # contents have): it is unreachable, the NAR is not.
    info = NarInfo.parse((cache.dir / f"{hash_part(kept)}.narinfo").read_text())
    twin = NarInfo(**{**info.__dict__, "store_path": gone, "references": (), "sigs": ()})
    (cache.dir / f"{hash_part(gone)}.narinfo").write_text(twin.render())
    os.utime(cache.dir / f"{hash_part(gone)}.narinfo", (1, 1))
    for _ in range(3):
        cache.gc()
    assert not cache.has(gone)
    assert (cache.dir / info.url).exists()
    assert cache.clean()


def test_a_nar_goes_only_after_the_nar_delay_in_two_runs(cache: Cache) -> None:
    a = cache.store.add("a")
    b = cache.store.add("b")
    cache.push("x", a)
    nar = NarInfo.parse((cache.dir / f"{hash_part(a)}.narinfo").read_text()).url
    cache.push("x", b)
    late = Policy(keep_days=0, keep_last=1, grace=0, nar_delay=3600)
    cache.gc(late)
    cache.gc(late)
    assert not cache.has(a) and (cache.dir / nar).exists()  # unreferenced, not for an hour
    os.utime(cache.dir / nar, (1, 1))
    record = cache.gc(late)
    assert (cache.dir / nar).exists()  # its "since" is this run's: still an hour to go
    assert nar in record.plan.unreferenced
    cache.gc(TIGHT)
    assert not (cache.dir / nar).exists()


def test_a_dry_run_writes_nothing_and_says_what_would_go(cache: Cache) -> None:
    a = cache.store.add("a")
    cache.push("x", a)
    cache.push("x", cache.store.add("b"))
    cache.gc()
    before = sorted(p.relative_to(cache.dir) for p in cache.dir.rglob("*"))
    dry = cache.gc(delete=False)
    assert dry.plan.narinfos == [hash_part(a)]
    assert sorted(p.relative_to(cache.dir) for p in cache.dir.rglob("*")) == before


def test_an_uploader_relying_on_a_candidate_writes_it_again(cache: Cache) -> None:
    base = cache.store.add("base")
    a = cache.store.add("a", [base])
    cache.push("x", a)
    cache.push("x", cache.store.add("b"))
    cache.gc()  # base and a are candidates now
    cache.push("y", a)  # found in the cache, but marked: written again
    # The next run would have deleted them (candidates twice), but y's root
    # keeps them; and once that lapses, they are newer than the mark.
    cache.gc()
    assert cache.has(a) and cache.has(base)
    assert cache.clean()


def test_a_path_gc_deleted_is_uploaded_again_and_forgotten(cache: Cache, tmp_path: Path) -> None:
    a = cache.store.add("a")
    known = KnownCache(str(tmp_path / "state.sqlite"), "t")
    cache.push("x", a, known=known)
    assert known.known([hash_part(a)]) == {hash_part(a)}
    cache.push("x", cache.store.add("b"), known=known)
    cache.gc()
    cache.gc()
    assert not cache.has(a)
    # The uploader remembers `a`; the run record makes it forget.
    marks = Marks(cache.target)
    guard = Protection(cache.target, "x", forget=known.forget)
    guard.marks = marks
    guard.begin([a])
    assert known.known([hash_part(a)]) == set()
    cache.push("x", a, known=known)
    assert cache.has(a) and cache.clean()


def test_a_second_gc_refuses_and_an_expired_lock_is_taken_over(cache: Cache) -> None:
    first = GcLock(cache.target)
    first.acquire()
    try:
        with pytest.raises(LockHeld, match=f"another gc is running.*pid {os.getpid()}"):
            cache.gc()
        assert [lock.key for lock in held_locks(cache.target)] == [first.key]
    finally:
        first.release()
    crashed = GcLock(cache.target, expiry=0.2)
    crashed.acquire()
    crashed._stop.set()  # a gc that died: never refreshed, never released
    time.sleep(0.3)
    cache.gc()  # takes over
    assert held_locks(cache.target) == []


def test_a_gc_that_cannot_refresh_its_lock_stops_before_deleting(cache: Cache) -> None:
    lock = GcLock(cache.target, expiry=0.4, refresh=3600)
    lock.acquire()
    time.sleep(0.35)
    with pytest.raises(Exception, match="could not be refreshed"):
        lock.check()
    lock.release()


class _Wrapped:
    """A target passing everything on to ``inner`` but what a test overrides."""

    def __init__(self, inner: FileTarget) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_a_gc_that_fails_while_taking_its_lock_leaves_no_lock(cache: Cache) -> None:
    """A listing that failed once the lock was written (a 503 past the
    retries) left the lock: the next gc was refused for two minutes, by a
    gc that never ran."""

    class FailingList(_Wrapped):
        failed = False

        def list_objects(self, prefix: str, start_after: str) -> object:
            if prefix == LOCKS and not self.failed:
                self.failed = True
                raise TargetError("listing lifecycle/v1/locks/: 503 SlowDown")
            return self.inner.list_objects(prefix, start_after)

    with pytest.raises(TargetError, match="SlowDown"):
        GcLock(FailingList(cache.target)).acquire()  # type: ignore[arg-type]
    assert held_locks(cache.target) == []
    cache.gc()  # not refused


def test_a_lock_refresh_answered_late_counts_from_when_it_was_sent(cache: Cache) -> None:
    """Others judge a lock by when the server stored it; this gc judged it
    by when the answer came.  A refresh answered late let it go on deleting
    after the others could take the lock: two gcs deleting at once."""

    class LateAnswers(_Wrapped):
        delay = 0.0

        def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
            self.inner.put_bytes(key, data, content_type)
            time.sleep(self.delay)

    late = LateAnswers(cache.target)
    lock = GcLock(late, expiry=2.0, refresh=3600)  # type: ignore[arg-type]
    lock.acquire()
    try:
        late.delay = 1.0
        lock._write()  # stored at once, answered a second later
        answered = time.monotonic()
        # The others may take the lock over one second after the answer
        # (stored + 2 s); before that, this gc must have stopped deleting.
        time.sleep(max(0.0, answered + 0.8 - time.monotonic()))
        with pytest.raises(UploaderError, match="could not be refreshed"):
            lock.check()
    finally:
        late.delay = 0.0
        lock.release()


def test_an_unreadable_narinfo_stops_every_deletion_lapsed_roots_included(cache: Cache) -> None:
    a = cache.store.add("a")
    cache.push("x", a)
    cache.push("x", cache.store.add("b"))  # the newest root of x: a's lapses
    (cache.dir / f"{'z' * 32}.narinfo").write_text("garbage")
    for _ in range(2):
        result = cache.gc()
        assert result.plan.unreadable and not result.plan.narinfos
        assert result.lapsed_roots == [] and result.pruned_runs == []
    assert cache.has(a) and len(list_roots(cache.target)) == 2
    (cache.dir / f"{'z' * 32}.narinfo").unlink()
    cache.gc()
    assert not cache.has(a) and len(list_roots(cache.target)) == 1


def test_run_records_over_two_weeks_old_go_and_are_said(cache: Cache) -> None:
    cache.push("x", cache.store.add("a"))
    for _ in range(3):
        cache.gc()
    runs = sorted((cache.dir / RUNS).iterdir())
    old = time.time() - 20 * 86400
    aged = [cache.dir / timed_key(RUNS, old + i) for i in range(3)]
    for path, src in zip(aged, runs, strict=True):
        src.rename(path)
    keys = [str(p.relative_to(cache.dir)) for p in aged[:2]]
    # The newest record stays whatever its age: the next run's mark.
    assert cache.gc(delete=False).pruned_runs == keys
    assert cache.gc().pruned_runs == keys
    assert [p.exists() for p in aged] == [False, False, True]


def test_a_pin_leaves_to_an_upstream_the_paths_it_serves(cache: Cache, tmp_path: Path) -> None:
    base = cache.store.add("base")
    app = cache.store.add("app", [base])
    upstream = Cache(tmp_path / "upstream")
    upstream.store = cache.store
    upstream.push("up", base)
    cache.push("ci", app)
    (cache.dir / f"{hash_part(base)}.narinfo").unlink()  # as `run --upstream` leaves it
    with pytest.raises(PinRefused, match=f"missing {base}"):
        add_pin(cache.target, "release", [app])
    urls = [f"file://{upstream.dir}"]
    other = signing.generate("other-1").public_key()
    with pytest.raises(PinRefused, match=f"missing {base}"):
        add_pin(cache.target, "release", [app], upstream=lambda n: served(urls, (other,), n, 4))
    trusted = (KEY.public_key(),)
    added = add_pin(cache.target, "release", [app], upstream=lambda n: served(urls, trusted, n, 4))
    assert added == (1, 1)
    assert [p.name for p in list_pins(cache.target)] == ["release"]


def test_verify_reports_a_pinned_path_that_left_the_cache(cache: Cache) -> None:
    a = cache.store.add("a")
    cache.push("ci", a)
    add_pin(cache.target, "release", [a])
    assert cache.clean()
    (cache.dir / f"{hash_part(a)}.narinfo").unlink()
    report = verify(cache.target, VerifyOptions(keys=(KEY.public_key(),)))
    (problem,) = report.problems
    assert problem.kind == "missing-reference" and problem.store_path == a
    assert problem.detail == "referenced by pin 'release'"


def test_a_pin_that_cannot_be_undone_says_it_was_written_and_why(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = cache.store.add("a")
    cache.push("ci", a)

    def denied(*args: object, **kwargs: object) -> None:
        raise TargetError("reading s3://b/x.narinfo: AccessDenied (this needs s3:GetObject)")

    def no_delete(key: str) -> None:
        raise TargetError(f"deleting s3://b/{key}: AccessDenied")

    monkeypatch.setattr("uploader.lifecycle.pins._closure", denied)
    monkeypatch.setattr(cache.target, "delete", no_delete)
    with pytest.raises(UploaderError) as failed:
        add_pin(cache.target, "release", [a])
    message = str(failed.value)
    assert "pin 'release' was written" in message and "s3:GetObject" in message
    assert "deleting" in message and "pin rm release" in message
    assert [p.name for p in list_pins(cache.target)] == ["release"]


def test_a_gc_stopped_after_any_deletion_leaves_every_closure_whole(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Referrers go before what they reference: however far a deleting run
    got (Ctrl-C, kill), every narinfo left still has its closure."""
    leaf = cache.store.add("leaf")
    mid = [cache.store.add(f"mid{i}", [leaf]) for i in range(3)]
    top = cache.store.add("top", [*mid, leaf])
    side = cache.store.add("side", [mid[0]])
    keep = cache.store.add("keep")
    cache.push("a", top)
    cache.push("a", side)
    cache.push("a", keep)  # the newest root of "a": the others lapse
    cache.gc()  # marks
    doomed = {hash_part(p) for p in (leaf, *mid, top, side)}
    real_delete = FileTarget.delete
    for allowed in range(1, len(doomed)):
        snapshot = cache.dir.parent / f"copy{allowed}"
        shutil.copytree(cache.dir, snapshot)
        count = {"n": 0}

        def stop_after(
            self: FileTarget, key: str, allowed: int = allowed, count: dict[str, int] = count
        ) -> None:
            if key.endswith(".narinfo"):
                if count["n"] == allowed:
                    raise KeyboardInterrupt
                count["n"] += 1
            real_delete(self, key)

        monkeypatch.setattr(FileTarget, "delete", stop_after)
        copy = Cache(cache.dir.parent / f"run{allowed}")
        copy.dir, copy.target = snapshot, open_target(f"file://{snapshot}")
        deleted: dict[str, int] = {}
        told: dict[str, str] = {}
        with pytest.raises(KeyboardInterrupt):
            collect(
                copy.target, TIGHT, delete=True, jobs=1, deleted=deleted,
                on_deleted=told.__setitem__,
            )  # fmt: skip
        assert deleted == ({"narinfo": allowed} if allowed else {})
        monkeypatch.setattr(FileTarget, "delete", real_delete)
        left = {p.name[:32] for p in snapshot.glob("*.narinfo")}
        assert len(left & doomed) == len(doomed) - allowed
        # Told of exactly what went, as it went.
        assert set(told) == {f"{h}.narinfo" for h in doomed - left}
        assert all(" unreachable, a candidate since " in why for why in told.values())
        assert copy.clean(), f"stopped after {allowed}: a narinfo lost part of its closure"


def test_a_deletion_stopped_from_outside_starts_nothing_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C or SIGTERM in the main thread while deletions are queued:
    those not begun are not made (and so not left unreported); those under
    way finish and are reported."""
    keys = [f"k{i:03}" for i in range(60)]
    started: list[str] = []
    gone: list[str] = []
    counting = threading.Lock()
    both_under_way = threading.Barrier(2, timeout=10)
    cancelled = threading.Event()

    class Noticed(ThreadPoolExecutor):
        """Says when what had not begun can no longer begin."""

        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            super().shutdown(wait=False, cancel_futures=cancel_futures)
            cancelled.set()
            super().shutdown(wait=wait)

    class Stopped:
        """Ctrl-C while the 5th and 6th deletions (one per worker) are under way."""

        def delete(self, key: str) -> None:
            with counting:
                started.append(key)
                n = len(started)
            if n in (5, 6):
                if both_under_way.wait() == 0:
                    main_thread = threading.main_thread().ident
                    assert main_thread is not None
                    signal.pthread_kill(main_thread, signal.SIGINT)
                assert cancelled.wait(10), "the stop was not noticed"
            with counting:
                gone.append(key)

    class Held:
        def check(self) -> None:
            pass

    monkeypatch.setattr(gc_module, "ThreadPoolExecutor", Noticed)
    told: list[str] = []
    deleter = _Deleter(Stopped(), Held(), 2, {}, lambda k, w: told.append(k), {})  # type: ignore[arg-type]
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    # No garbage collection meanwhile: a KeyboardInterrupt raised in a gc
    # callback (hypothesis installs one) is printed and dropped, not raised.
    collecting = pygc.isenabled()
    pygc.disable()
    try:
        with pytest.raises(KeyboardInterrupt):
            deleter(keys)
    finally:
        if collecting:
            pygc.enable()
        signal.signal(signal.SIGINT, previous)
    assert sorted(started) == keys[:6], "a deletion started after the stop"
    assert sorted(gone) == keys[:6], "a deletion under way did not finish"
    assert sorted(told) == keys[:6]


def test_referrers_come_before_what_they_reference() -> None:
    from uploader.lifecycle.gc import referrers_first
    from uploader.lifecycle.survey import Bucket, Entry

    def entry(*refs: str) -> Entry:
        return Entry(name="x", size=1, mtime=0, url="nar/x", refs=refs)

    a, b, c, d, e = (ch * 32 for ch in "abcde")
    bucket = Bucket(narinfos={a: entry(b, a), b: entry(c), c: entry(), d: entry(c), e: entry()})
    assert referrers_first(bucket, {a, b, c, d}) == [sorted([a, d]), [b], [c]]
    assert referrers_first(bucket, {b, c}) == [[b], [c]]  # a stays: not doomed here


def test_a_stopped_gc_says_what_it_deleted(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    leaf = cache.store.add("leaf")
    cache.push("a", cache.store.add("top", [leaf]))
    cache.push("a", cache.store.add("keep"))
    cache.gc()  # marks
    real_delete = FileTarget.delete
    deleted: list[str] = []

    def stop_after_one(self: FileTarget, key: str) -> None:
        if key.endswith(".narinfo") and deleted:
            raise KeyboardInterrupt
        deleted.append(key)
        real_delete(self, key)

    monkeypatch.setattr(FileTarget, "delete", stop_after_one)
    result = CliRunner().invoke(
        main, ["gc", "--to", f"file://{cache.dir}", "--delete", "--grace", "0", "--keep-days",
               "0", "--nar-delay", "0", "-j", "1"],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "gc stopped after deleting 1 narinfo; what stays has its closures" in result.output
    assert "warning: --nar-delay 0s is shorter than an upload may take" in result.output
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # as the command found it
    monkeypatch.setattr(FileTarget, "delete", real_delete)
    assert cache.clean()


def test_an_uploader_whose_clock_is_ahead_still_waits_for_the_running_gc(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The uploader judges a gc's lock by the server's clock (read from its
    own root), so 150 s ahead it does not take a live lock for expired."""
    first = GcLock(cache.target)
    first.acquire()
    guard = Protection(cache.target, "x")
    guard.begin([cache.store.add("p")])
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 150)
    waiter = threading.Thread(target=guard._wait_for_running_gc)
    waiter.start()
    waiter.join(1.5)
    assert waiter.is_alive(), "did not wait for the gc holding the lock"
    first.release()
    waiter.join(10)
    assert not waiter.is_alive()


def _after_the_mark(cache: Cache) -> None:
    """Wait until what is written now gets an mtime past the newest mark
    (file times come from the kernel's coarse clock)."""
    mark = float(json.loads(cache.newest_run().read_text())["time"])
    probe = cache.dir / "probe"
    deadline = time.monotonic() + 5
    while True:
        probe.write_bytes(b"")
        if probe.stat().st_mtime > mark:
            break
        assert time.monotonic() < deadline, "the file system clock stands still"
        time.sleep(0.001)
    probe.unlink()


def test_a_rewritten_candidate_stays_after_the_root_relying_on_it_lapsed(cache: Cache) -> None:
    """An uploader that found a candidate writes its narinfo again; the next
    run must not delete it even once that uploader's root has lapsed (the
    narinfo is newer than the mark).  Broken, a path an uploader just relied
    on is deleted, and everything that references it loses its closure."""
    base = cache.store.add("base")
    a = cache.store.add("a", [base])
    cache.push("x", a)
    cache.push("x", cache.store.add("b"))
    cache.gc()  # a and base: candidates
    _after_the_mark(cache)
    cache.push("y", a)  # relies on the candidates: writes them again
    cache.push("y", cache.store.add("c"))  # y's root for a lapses (keep-last 1, keep-days 0)
    cache.gc()
    assert cache.has(a) and cache.has(base)
    assert cache.clean()


def test_a_narinfo_new_since_the_mark_keeps_its_references(cache: Cache) -> None:
    """What stays is closed under references: a narinfo written after the
    mark by a tool that follows no protocol (no root, no re-write of what
    it found) is kept, and so is the candidate it references.  Broken, the
    cache serves a narinfo whose reference was deleted: substitution fails."""
    base = cache.store.add("base")
    top = cache.store.add("top", [base])
    cache.push("x", base)
    cache.push("x", cache.store.add("other"))  # base's root lapses
    cache.gc()  # base: a candidate
    _after_the_mark(cache)
    engine = Engine(cache.store, cache.target, KEY, jobs=2)  # no guard: no root, no mark
    try:
        assert asyncio.run(engine.push([top])).ok
    finally:
        engine.close()
    cache.gc()
    assert cache.has(top) and cache.has(base)
    assert cache.clean()


def test_damaged_narinfos_and_their_closure_are_kept(cache: Cache) -> None:
    """A narinfo whose NAR is missing is reported damaged and kept, with
    what it references, even unrooted: gc does not make a damaged bucket
    worse.  Broken, gc deletes the evidence and the references a repair
    would need."""
    base = cache.store.add("base")
    top = cache.store.add("top", [base])
    cache.push("x", top)
    cache.push("x", cache.store.add("other"))  # top's root lapses
    (cache.dir / cache.nar_url(top)).unlink()
    cache.gc()
    result = cache.gc()
    assert result.plan.damaged == {hash_part(top)}
    assert cache.has(top) and cache.has(base)


def test_grace_keeps_young_narinfos(cache: Cache) -> None:
    """--grace keeps unrooted narinfos written less than that long ago.
    Broken, the default one-day grace does nothing, and a path uploaded
    outside any root (another tool, a root not yet written) goes at once."""
    a = cache.store.add("a")
    cache.push("x", a)
    cache.push("x", cache.store.add("b"))
    grace = Policy(keep_days=0, keep_last=1, grace=86400, nar_delay=0)
    cache.gc(grace)
    cache.gc(grace)
    assert cache.has(a)


def test_a_nar_written_again_recently_is_not_deleted(cache: Cache) -> None:
    """A NAR unreferenced for longer than --nar-delay but written again just
    now (an uploader following protocol step 4, its narinfo about to come)
    stays.  Broken, gc deletes the NAR under the upload, and the narinfo
    that follows names a NAR that is not there."""
    a = cache.store.add("a")
    cache.push("x", a)
    nar = cache.nar_url(a)
    cache.push("x", cache.store.add("b"))
    late = Policy(keep_days=0, keep_last=1, grace=0, nar_delay=3600)
    cache.gc(late)
    cache.gc(late)
    assert not cache.has(a) and (cache.dir / nar).exists()
    # The newest record says: unreferenced since two hours ago.
    newest = cache.newest_run()
    record = json.loads(newest.read_text())
    record["unreferenced_nars"][nar] = time.time() - 7200
    newest.write_text(json.dumps(record))
    os.utime(cache.dir / nar)  # written again just now
    cache.gc(late)
    assert (cache.dir / nar).exists()


def test_a_nar_no_narinfo_names_yet_survives_one_run_even_without_delay(cache: Cache) -> None:
    """A NAR is deleted only if the previous mark, too, said no narinfo
    names it, whatever --nar-delay.  Broken, with a short --nar-delay the
    NAR of an upload under way (its narinfo not yet written) is deleted by
    the first run that sees it."""
    cache.push("x", cache.store.add("a"))
    cache.gc()  # a previous mark, from before the NAR
    nar = cache.dir / "nar" / ("0" * 52 + ".nar")
    nar.write_bytes(b"an upload under way")
    os.utime(nar, (1, 1))
    cache.gc()
    assert nar.exists()
    cache.gc()
    assert not nar.exists()


def test_in_progress_roots_are_kept_a_day(cache: Cache) -> None:
    """A root still in progress keeps its paths for a day whatever
    --keep-days.  Broken, with --keep-days 0 a slow batch's root lapses as
    soon as a later one of the same name completes, and gc deletes paths
    under the upload that relies on them."""
    a = cache.store.add("a")
    cache.push("x", a)
    cache.push("x", cache.store.add("b"))  # a's complete root lapses
    RootWriter(cache.target, "x").start([a])  # an upload of the same name still running
    cache.gc()
    cache.gc()
    assert cache.has(a)


def test_an_unreadable_lock_still_holds(cache: Cache) -> None:
    """A lock gc cannot read (broken, or from a newer layout version) counts
    as held until it would expire.  Broken, two gcs delete at once, each
    with a mark that does not know of the other's."""
    cache.push("x", cache.store.add("a"))
    cache.target.put_bytes(timed_key(LOCKS, time.time()), b"garbage", "application/json")
    with pytest.raises(LockHeld):
        cache.gc()


def test_a_mark_read_while_its_gc_ran_is_read_again_once_complete(cache: Cache) -> None:
    """An uploader that read the mark of a gc still running reads it again
    at its next refresh, and so learns what that gc deleted.  Broken, it
    keeps trusting its memory of the deleted paths for days, skips them,
    and uploads referrers whose references are gone."""
    a = cache.store.add("a")
    cache.push("x", a)
    cache.push("x", cache.store.add("b"))
    cache.gc()
    marks = Marks(cache.target)

    class Peeking(_Wrapped):
        peeked = False

        def delete(self, key: str) -> None:
            if not self.peeked:
                self.peeked = True
                marks.refresh()  # the uploader reads the mark while this gc deletes
            self.inner.delete(key)

    collect(Peeking(cache.target), TIGHT, delete=True, jobs=1)  # type: ignore[arg-type]
    assert marks.mark is not None and not marks.mark.complete
    assert hash_part(a) in marks.refresh()
    assert marks.mark.complete


def test_a_pin_added_while_gc_deletes_its_path_is_refused(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pin add` beside a running gc asks again, once that gc finished, for
    the paths the gc's mark names candidates.  Broken, `pin add` says the
    pin is written while the gc deletes the pinned path: the release is not
    in the cache, and only verify tells."""
    a = cache.store.add("a")
    cache.push("x", a)
    cache.push("x", cache.store.add("b"))
    cache.gc()  # a: a candidate
    outcome: list[object] = []
    settled = threading.Event()  # the pin finished, or waits for the gc

    def waiting(target: Target, locks: list[LockInfo], clock: ServerClock | None = None) -> None:
        settled.set()
        wait_for(target, locks, clock)

    monkeypatch.setattr("uploader.lifecycle.protect.wait_for", waiting)

    def pin() -> None:
        try:
            outcome.append(add_pin(cache.target, "release", [a]))
        except PinRefused as e:
            outcome.append(e)
        finally:
            settled.set()

    pinning = threading.Thread(target=pin)

    class PinDuring(_Wrapped):
        started = False

        def delete(self, key: str) -> None:
            if not self.started:
                self.started = True
                pinning.start()
                assert settled.wait(10), "pin add neither finished nor waited for the gc"
            self.inner.delete(key)

    collect(PinDuring(cache.target), TIGHT, delete=True, jobs=1)  # type: ignore[arg-type]
    pinning.join(10)
    assert outcome, "pin add never finished"
    pinned = [p.name for p in list_pins(cache.target)]
    assert (isinstance(outcome[0], PinRefused) and pinned == []) or cache.has(a)


def test_gc_exits_1_when_it_finds_damaged_narinfos(cache: Cache) -> None:
    """`gc` exits 1 when it found damaged narinfos (lifecycle.md, --help).
    Broken, a gc timer succeeds every night and nobody hears of the damage."""
    a = cache.store.add("a")
    cache.push("x", a)
    (cache.dir / cache.nar_url(a)).unlink()
    result = CliRunner().invoke(main, ["gc", "--to", f"file://{cache.dir}"])
    assert result.exit_code == 1, result.output
    assert "damaged" in result.output


def test_a_root_written_while_gc_surveys_the_bucket_keeps_its_closure(cache: Cache) -> None:
    """Protocol step 6: once its mark is written, gc reads the roots and
    pins again.  A root written while it surveyed (by an uploader that read
    an older mark, so did not wait for this run) keeps its paths, though
    they were candidates.  Broken, that uploader's referrers lose their
    closure."""
    base = cache.store.add("base")
    a = cache.store.add("a", [base])
    cache.push("x", a)
    cache.push("x", cache.store.add("b"))
    cache.gc()  # a and base: candidates

    class RootBeforeTheMark(_Wrapped):
        rooted = False

        def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
            if key.startswith(RUNS) and not self.rooted:
                self.rooted = True  # the survey is done; the mark is next
                RootWriter(cache.target, "late").start([a])
            self.inner.put_bytes(key, data, content_type)

    wrapped = RootBeforeTheMark(cache.target)
    collect(wrapped, TIGHT, delete=True, jobs=4)  # type: ignore[arg-type]
    assert wrapped.rooted
    assert cache.has(a) and cache.has(base)
    assert cache.clean()
