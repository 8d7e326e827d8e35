"""Large NARs go out in parts while they are read and compressed; the upload
completes only once the NAR is verified, and is aborted otherwise."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import re
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.fakes import FakeStore, MiB, RecordingTarget
from tests.unit.test_engine import KEY, assert_signed_as_registered, decompress, push
from uploader import narstream
from uploader._exceptions import TransientTargetError, UploaderError, VerificationError
from uploader.engine import Engine, narinfo_key
from uploader.narstream import PART_SIZE, PARTS_IN_FLIGHT, STREAM_ABOVE, NarStreamer
from uploader.nixbase32 import format_hash
from uploader.store import PathInfo


class DumpRecorded(FakeStore):
    """A store that says in the target's events when it has read a NAR whole."""

    def __init__(self, root: Path, target: RecordingTarget) -> None:
        super().__init__(root)
        self.target = target

    def dump(self, path: str) -> Iterator[bytes]:
        yield from super().dump(path)
        self.target.events.append(("dumped", path))


def big(store: FakeStore, name: str = "big") -> str:
    # Random bytes do not compress: six parts of the compressed NAR, more
    # than zstd's worker threads hold back (a few of its 2 MiB jobs).
    size = 6 * PART_SIZE
    assert size > STREAM_ABOVE
    return store.add(name, contents=os.urandom(size - 4096))


def test_parts_go_out_before_the_nar_is_read_and_the_narinfo_after_it_is_complete(
    tmp_path: Path,
) -> None:
    target = RecordingTarget()
    store = DumpRecorded(tmp_path, target)
    path = big(store)

    result = push(store, target, [path])

    assert result.ok, result.failed
    info = target.narinfo(path)
    assert info is not None
    events = target.events
    first_part = events.index(("part", info.url))
    assert first_part < events.index(("dumped", path)), "no part went out while compressing"
    assert events.index(("put", info.url)) < events.index(("put", f"{path[11:43]}.narinfo"))
    assert [e for e, k in events if k == info.url].count("part") == 6
    nar_hash = store.registered(path).nar_hash.split(":")[1]
    assert re.fullmatch(rf"nar/{nar_hash}-[0-9a-f]{{16}}\.nar\.zst", info.url)
    data = target.objects[info.url]
    assert decompress(info.url, data) == store.nar(path)
    assert info.file_size == len(data)
    assert_signed_as_registered(store, target, path)
    assert not target.incomplete


def test_a_nar_that_differs_from_the_database_is_aborted_and_nothing_is_visible(
    tmp_path: Path,
) -> None:
    target = RecordingTarget()
    store = FakeStore(tmp_path)
    path = big(store)
    store.lie(path, nar_hash="sha256:" + "0" * 52)

    result = push(store, target, [path])

    assert isinstance(result.failed[path], VerificationError)
    assert not [k for k in target.objects if k.startswith("nar/") or k.endswith(".narinfo")]
    begun = [k for e, k in target.events if e == "begin" and k.startswith("nar/")]
    assert len(begun) == 1
    assert ("abort", begun[0]) in target.events
    assert ("part", begun[0]) in target.events, "the parts went out before the check"
    assert not target.incomplete


def test_a_failed_part_aborts_the_upload(tmp_path: Path) -> None:
    target = RecordingTarget()
    target.fail_part = 2
    store = FakeStore(tmp_path)
    path = big(store)

    result = push(store, target, [path])

    assert "injected failure" in str(result.failed[path])
    assert not [k for k in target.objects if k.startswith("nar/") or k.endswith(".narinfo")]
    assert [e for e, _ in target.events].count("abort") == 1
    assert not target.incomplete


def test_a_failed_upload_leaves_nothing_of_its_compression_behind(tmp_path: Path) -> None:
    """zstd's writer, a C object the cycle collector cannot see into, holds
    the parts it writes to; a failed part's traceback leads back to it.  A
    daemon retrying such an upload kept two zstd threads and some 50 MiB per
    attempt (a soak trial: 200 to 900 MiB in two minutes)."""
    target = RecordingTarget()
    target.fail_part = 3
    store = FakeStore(tmp_path)
    path = big(store)
    engine = Engine(store, target, KEY, jobs=1)
    infos = store.path_infos([path], closure=True)
    try:
        threads = []
        for _ in range(4):
            result = asyncio.run(engine.push_infos([path], infos, absent=[path]))
            assert "injected failure" in str(result.failed[path])
            del result
            gc.collect()
            # Threads Python did not start: zstd's.
            threads.append(len(os.listdir("/proc/self/task")) - threading.active_count())
        assert threads[-1] == threads[0], threads
    finally:
        engine.close()


def _part_buffers_reachable() -> int:
    """Part-sized buffers any object the garbage collector tracks refers to."""
    found: set[int] = set()
    for o in gc.get_objects():
        refs = list(o.f_locals.values()) if isinstance(o, types.FrameType) else gc.get_referents(o)
        for v in refs:
            if isinstance(v, memoryview):
                v = v.obj
            if isinstance(v, bytes | bytearray) and len(v) >= PART_SIZE:
                found.add(id(v))
    return len(found)


def test_the_errors_of_a_failed_upload_hold_none_of_its_parts(tmp_path: Path) -> None:
    """A part's error kept the part (6 MiB) in its traceback's frames, and
    the errors of a failed upload formed cycles only a garbage collection
    pass frees: a daemon whose uploads kept failing held some 80 MiB more
    until one ran."""
    target = RecordingTarget()
    target.fail_part = 3
    store = FakeStore(tmp_path)
    paths = [big(store, f"big{i}") for i in range(3)]
    engine = Engine(store, target, KEY, jobs=4)
    infos = store.path_infos(paths, closure=True)
    gc.collect()
    gc.disable()
    try:
        result = asyncio.run(engine.push_infos(paths, infos, absent=paths))
        assert len(result.failed) == 3
        assert _part_buffers_reachable() == 0
        del result
        assert _part_buffers_reachable() == 0  # not waiting for a collection
    finally:
        gc.enable()
        engine.close()


def test_racing_uploads_never_share_a_name(tmp_path: Path) -> None:
    """Two uploaders pushing the same path each complete their own object:
    the one the first narinfo points to is never replaced."""
    target = RecordingTarget()
    store = FakeStore(tmp_path)
    path = big(store)
    assert push(store, target, [path]).ok
    first = target.narinfo(path)
    assert first is not None
    kept = target.objects[first.url]

    # A second uploader that found no narinfo a moment before the first wrote it.
    engine = Engine(store, target, KEY)
    try:
        assert asyncio.run(engine.push([], force=[path])).ok
    finally:
        engine.close()

    second = target.narinfo(path)
    assert second is not None and second.url != first.url
    assert target.objects[first.url] == kept


class KeptParts:
    """An upload that keeps what it was lent: the buffers themselves (so
    none is freed and its address reused) and copies of their bytes."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.lent: list[tuple[bytes | bytearray, int]] = []  # and its length then
        self.parts: dict[int, bytes] = {}
        self.completed = False

    def put_part(self, number: int, data: bytes | bytearray) -> None:
        self.lent.append((data, len(data)))
        self.parts[number] = bytes(data)

    def complete(self) -> None:
        self.completed = True

    def abort(self) -> None:
        raise AssertionError("aborted")


def test_part_buffers_are_reused_and_let_go_when_no_nar_streams(tmp_path: Path) -> None:
    store = FakeStore(tmp_path)
    paths = [store.add(name, contents=os.urandom(10 * PART_SIZE)) for name in ("one", "two")]
    streamer = NarStreamer("zstd", None)
    try:
        for path in paths:
            upload = KeptParts(f"nar/{path[11:43]}")
            streamer.upload(store.registered(path), upload, store.dump(path))
            assert upload.completed
            data = b"".join(upload.parts[n] for n in sorted(upload.parts))
            assert decompress("x.nar.zst", data) == store.nar(path)
            full = [d for d, length in upload.lent if length == PART_SIZE]
            assert len(full) == 10 and all(isinstance(d, bytearray) for d in full)
            # Ten full parts through at most one buffer per part in flight
            # plus the one being filled.
            assert len({id(d) for d in full}) <= PARTS_IN_FLIGHT + 1
            # The last, shorter part goes in the buffer it was filled in, cut
            # to its length, not copied out of it.
            (last,) = [d for d, length in upload.lent if length < PART_SIZE]
            assert isinstance(last, bytearray)
            assert not streamer.buffers._free, "an idle streamer keeps no buffer"
    finally:
        streamer.close()


def test_no_more_part_buffers_are_kept_than_one_per_part_in_flight_and_one() -> None:
    """xz compresses a NAR per core, each filling a buffer of its own, so
    more buffers can be in use at once than the streamer keeps.  Given back
    while NARs still stream, those beyond one per part in flight plus the
    one being filled are let go, not held until the last NAR ends."""
    streamer = NarStreamer("xz", None)
    buffers = streamer.buffers
    buffers.use()  # a NAR is streaming
    try:
        lent = [buffers.take(PART_SIZE) for _ in range(PARTS_IN_FLIGHT + 3)]
        for buffer in lent:
            buffers.give(buffer)
        assert len(buffers._free) == PARTS_IN_FLIGHT + 1
    finally:
        buffers.done()
        streamer.close()


class GatedParts(KeptParts):
    """Parts wait at a gate: a link slower than compression."""

    def __init__(self, key: str, gate: threading.Event) -> None:
        super().__init__(key)
        self._gate = gate

    def put_part(self, number: int, data: bytes | bytearray) -> None:
        assert self._gate.wait(30)
        super().put_part(number, data)


def test_the_next_nar_waits_until_the_last_part_of_the_previous_is_on_its_way(
    tmp_path: Path,
) -> None:
    # With parts slower than compression, the next NAR must not fill a buffer
    # while the previous one's last part still waits for room: memory stays
    # at one buffer per part in flight plus the one being filled.
    store = FakeStore(tmp_path)
    # Incompressible: as many full parts as there is room, and a short last one.
    first = store.add("first", contents=os.urandom(PARTS_IN_FLIGHT * PART_SIZE + MiB))
    second = store.add("second", contents=os.urandom(2 * MiB))
    gate, second_read = threading.Event(), threading.Event()

    def second_chunks() -> Iterator[bytes]:
        second_read.set()
        yield from store.dump(second)

    streamer = NarStreamer("zstd", None)
    uploads = [GatedParts("nar/first", gate), GatedParts("nar/second", gate)]
    try:
        with ThreadPoolExecutor(2) as pool:
            done = [pool.submit(streamer.upload, store.registered(first), uploads[0],
                                store.dump(first))]  # fmt: skip
            # The first NAR's full parts all wait at the gate; its last part waits for room.
            deadline = time.monotonic() + 30
            while streamer.room._value and time.monotonic() < deadline:  # type: ignore[attr-defined]
                time.sleep(0.01)
            done.append(pool.submit(streamer.upload, store.registered(second), uploads[1],
                                    second_chunks()))  # fmt: skip
            assert not second_read.wait(0.5), "the second NAR started before the first's last part"
            gate.set()
            for future in done:
                future.result(timeout=60)
        assert second_read.is_set()
        for upload, path in zip(uploads, (first, second), strict=True):
            assert upload.completed
            data = b"".join(upload.parts[n] for n in sorted(upload.parts))
            assert decompress("x.nar.zst", data) == store.nar(path)
        assert len(uploads[0].parts) == PARTS_IN_FLIGHT + 1
    finally:
        streamer.close()


class ReadCounted(FakeStore):
    """A store that counts the NAR bytes read, and says when reading began."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.read = 0
        self.reading = threading.Event()

    def dump(self, path: str) -> Iterator[bytes]:
        for chunk in super().dump(path):
            self.read += len(chunk)
            self.reading.set()
            yield chunk


def _read_when_asked(store: ReadCounted, seen: list[int], wait: float) -> Callable[[], None]:
    """An existence check that answers once reading began (or ``wait`` passed)
    and notes how much was read by then."""

    def asked() -> None:
        store.reading.wait(wait)
        seen.append(store.read)

    return asked


def test_the_largest_nar_is_read_and_compressed_while_the_cache_is_asked(
    tmp_path: Path,
) -> None:
    target = RecordingTarget()
    store = ReadCounted(tmp_path)
    small = store.add("small", contents=b"x" * 1000)
    path = store.add("large", [small], contents=os.urandom(STREAM_ABOVE + 8 * MiB))
    seen: list[int] = []
    ask = _read_when_asked(store, seen, 30)
    events_then: list[int] = []

    def asked() -> None:
        ask()
        events_then.append(len(target.events))

    target.before_exists[narinfo_key(path)] = asked

    result = push(store, target, [path])

    assert result.ok, result.failed
    assert seen and seen[0] > 0, "nothing was read before the cache answered"
    info = target.narinfo(path)
    assert info is not None
    assert decompress(info.url, target.objects[info.url]) == store.nar(path)
    assert_signed_as_registered(store, target, path)
    # Its parts waited for the answer: nothing was begun before it.
    assert all(not k.startswith("nar/") for _, k in target.events[: events_then[0]])
    assert not target.incomplete


def test_a_nar_the_cache_has_is_compressed_ahead_only_so_far_and_never_sent(
    tmp_path: Path,
) -> None:
    target = RecordingTarget()
    store = ReadCounted(tmp_path)
    size = 16 * PART_SIZE  # random: sixteen parts, more than may wait
    path = store.add("large", contents=os.urandom(size))
    target.objects[narinfo_key(path)] = b"present"
    seen: list[int] = []

    def asked() -> None:
        # Answered once compressing ahead has stopped for want of room.
        assert store.reading.wait(30)
        last, deadline = -1, time.monotonic() + 30
        while store.read != last and time.monotonic() < deadline:
            last = store.read
            time.sleep(0.3)
        seen.append(store.read)

    target.before_exists[narinfo_key(path)] = asked

    result = push(store, target, [path])

    assert result.ok and result.present == [path] and not result.uploaded
    # The parts that may wait, the one waiting for room, and what zstd's
    # jobs hold (about 25 MiB of random bytes): far from the whole NAR.
    assert 0 < seen[0] <= (PARTS_IN_FLIGHT + 1) * PART_SIZE + 24 * MiB < size
    assert store.read < size, "the NAR was read on after it was not wanted"
    assert not [k for _, k in target.events if k.startswith("nar/")]
    assert not target.incomplete


def test_no_head_start_for_a_target_that_stores_whole_files(tmp_path: Path) -> None:
    target = RecordingTarget(parts=False)
    store = ReadCounted(tmp_path)
    path = store.add("large", contents=os.urandom(STREAM_ABOVE + MiB))
    seen: list[int] = []
    target.before_exists[narinfo_key(path)] = _read_when_asked(store, seen, 0.5)

    result = push(store, target, [path])

    assert result.ok, result.failed
    assert seen == [0]
    assert_signed_as_registered(store, target, path)


def test_no_head_start_for_a_signed_path(tmp_path: Path) -> None:
    # Substituted from a binary cache: most likely not to be uploaded.
    target = RecordingTarget()
    store = ReadCounted(tmp_path)
    path = store.add("large", contents=os.urandom(STREAM_ABOVE + MiB))
    store.lie(path, sigs=("cache.nixos.org-1:" + "A" * 86 + "==",))
    seen: list[int] = []
    target.before_exists[narinfo_key(path)] = _read_when_asked(store, seen, 0.5)

    result = push(store, target, [path])

    assert result.ok, result.failed
    assert seen == [0]
    assert target.narinfo(path) is not None


def test_concurrent_pushes_share_a_head_start_without_waiting_on_each_other(
    tmp_path: Path,
) -> None:
    # The first push compresses its largest NAR ahead; the second, asked
    # meanwhile for a closure holding that NAR and another large one, waits
    # for neither forever: each large NAR is uploaded once.
    target = RecordingTarget(delay=0.01)
    store = FakeStore(tmp_path)
    shared = store.add("shared", contents=os.urandom(STREAM_ABOVE + 4 * MiB))
    other = store.add("other", [shared], contents=os.urandom(STREAM_ABOVE + 2 * MiB))
    infos = store.path_infos([other], closure=True)
    engine = Engine(store, target, KEY)

    async def both() -> None:
        await asyncio.wait_for(
            asyncio.gather(engine.push_infos([shared], infos), engine.push_infos([other], infos)),
            timeout=120,
        )

    try:
        asyncio.run(both())
    finally:
        engine.close()
    for path in (shared, other):
        assert_signed_as_registered(store, target, path)
    completed = [k for e, k in target.events if e == "put" and k.startswith("nar/")]
    assert len(completed) == 2
    assert not target.incomplete


def test_a_push_that_fails_before_its_plan_leaves_no_head_start_behind(tmp_path: Path) -> None:
    # The cache stops answering while the largest NAR is compressed ahead:
    # the push fails, its waiting parts are dropped and the engine closes.
    target = RecordingTarget()
    store = ReadCounted(tmp_path)
    path = store.add("large", contents=os.urandom(16 * PART_SIZE))

    def asked() -> None:
        assert store.reading.wait(30)
        target.refuse = TransientTargetError("the cache went away")
        raise target.refuse

    target.before_exists[narinfo_key(path)] = asked
    engine = Engine(store, target, KEY)
    outcome: list[BaseException | None] = []

    def push_and_close() -> None:
        try:
            asyncio.run(engine.push([path]))
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)
        finally:
            engine.close()

    worker = threading.Thread(target=push_and_close, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the push or the engine's close hung"
    assert isinstance(outcome[0], TransientTargetError)
    assert store.read < 16 * PART_SIZE, "the NAR was read on after the push failed"
    assert not [k for _, k in target.events if k.startswith("nar/")]
    assert engine._head is None


def test_a_nar_larger_than_registered_is_said_so_without_a_hash_of_part_of_it() -> None:
    """Reading stops once past the registered size: the hash of what was
    read is no hash of the NAR, so the message gives none."""
    from uploader.narstream import compress_checked
    from uploader.store import PathInfo

    path = "/nix/store/" + "a" * 32 + "-grown"
    info = PathInfo(path, "sha256:" + "0" * 52, 100, ())
    with pytest.raises(VerificationError) as raised:
        compress_checked(
            info, iter([b"x" * 64, b"y" * 64, b"z" * 64]), lambda b: None, "zstd", None
        )
    message = str(raised.value)
    assert f"(database: sha256:{'0' * 52}, 100 bytes; on disk: more than 100 bytes)" in message
    short = PathInfo(path, "sha256:" + "0" * 52, 200, ())
    with pytest.raises(VerificationError, match=r"on disk: sha256:[0-9a-z]{52}, 128 bytes\)"):
        compress_checked(short, iter([b"x" * 64, b"y" * 64]), lambda b: None, "zstd", None)


class _CountedXz:
    """How many xz encoders were open at once, at most; each, once open,
    waits a moment for the others to open theirs, were they not held back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from uploader import compression, narstream

        monkeypatch.setattr(
            narstream, "encoders", compression._EncoderGate(compression.ENCODER_BUDGET, 2)
        )
        self.live = self.most = 0
        lock = threading.Lock()
        opened, closed = compression._Xz.__init__, compression._Xz.close
        counter = self

        def counted_open(self: compression._Xz, *args: Any) -> None:
            opened(self, *args)
            with lock:
                counter.live += 1
                counter.most = max(counter.most, counter.live)
            time.sleep(0.05)

        def counted_close(self: compression._Xz) -> None:
            closed(self)
            with lock:
                counter.live -= 1

        monkeypatch.setattr(compression._Xz, "__init__", counted_open)
        monkeypatch.setattr(compression._Xz, "close", counted_close)


def _pushed_as_xz(store: FakeStore, target: RecordingTarget, paths: list[str]) -> None:
    for path in paths:
        assert_signed_as_registered(store, target, path)
        info = target.narinfo(path)
        assert info is not None and info.compression == "xz"
        assert decompress(info.url, target.objects[info.url]) == store.nar(path)


def test_xz_encoders_take_turns_however_many_nars_are_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An xz encoder takes 94 MiB.  Medium NARs (up to ``jobs`` at once) and
    small ones (as many as the round trips ask for) each opened one at once:
    300 paths of 150 KiB took a push to 437 MiB."""
    counted = _CountedXz(monkeypatch)
    store = FakeStore(tmp_path)
    text = b"".join(b"line %d of a library\n" % i for i in range(20000))  # 420 KiB
    paths = [store.add(f"medium-{i}", contents=text + b"%d" % i) for i in range(8)]
    paths += [store.add(f"small-{i}", contents=text[:150_000] + b"%d" % i) for i in range(8)]
    target = RecordingTarget()
    assert push(store, target, paths, compression="xz", jobs=4).ok
    assert counted.most == 2
    _pushed_as_xz(store, target, paths)


@pytest.mark.parametrize("size", [6 * MiB, STREAM_ABOVE + MiB], ids=["in-one-piece", "streamed"])
def test_large_nars_compress_with_xz_one_per_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """xz compresses on one core: large NARs took turns as zstd's do (which
    uses every core for one), and a push with xz used half the machine."""
    counted = _CountedXz(monkeypatch)
    store = FakeStore(tmp_path)
    paths = [store.add(f"large-{i}", contents=bytes(size - i)) for i in range(3)]
    target = RecordingTarget()
    assert push(store, target, paths, compression="xz", jobs=4).ok
    assert counted.most == 2
    _pushed_as_xz(store, target, paths)


def test_a_nar_never_needs_more_parts_than_s3_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The part size grows with the NAR, so that it fits in 9,000 parts (of
    S3's 10,000).  Broken, every NAR over about 58 GiB compressed fails at
    part 10,001, at every attempt."""
    monkeypatch.setattr(narstream, "_MAX_PARTS", 2)  # 2 of at most 3
    target = RecordingTarget()
    store = FakeStore(tmp_path)
    path = big(store)  # six parts of PART_SIZE at the default part size
    assert push(store, target, [path]).ok
    info = target.narinfo(path)
    assert info is not None
    assert 0 < [e for e, k in target.events if k == info.url].count("part") <= 3


def _registered(data: Iterable[bytes]) -> PathInfo:
    digest = hashlib.sha256()
    size = 0
    for chunk in data:
        digest.update(chunk)
        size += len(chunk)
    return PathInfo("/nix/store/" + "1" * 32 + "-x", format_hash(digest.digest()), size, ())


class HeldParts:
    """A multipart upload whose parts are held by the server until
    ``release`` is set; ``entered`` counts the parts handed over."""

    key = "nar/x.nar"

    def __init__(self) -> None:
        self.events: list[str] = []
        self.entered = 0
        self.handed_over = threading.Condition()
        self.release = threading.Event()

    def put_part(self, number: int, data: bytes | bytearray) -> None:
        with self.handed_over:
            self.entered += 1
            self.handed_over.notify_all()
        assert self.release.wait(20), "never released"
        self.events.append("part")

    def complete(self) -> None:
        self.events.append("complete")

    def abort(self) -> None:
        self.events.append("abort")


def test_a_stop_while_the_last_parts_are_sent_aborts_the_upload() -> None:
    """A stop that comes once the NAR was read whole, while its parts are
    still on their way, aborts the upload instead of completing it (no
    narinfo will name it).  Broken, a daemon stopped past its drain timeout
    leaves complete NAR objects that nothing names, until gc removes them."""
    data = os.urandom(3 * PART_SIZE)
    streamer = NarStreamer("none", None)
    upload = HeldParts()
    try:
        with ThreadPoolExecutor(1) as pool:
            uploading = pool.submit(streamer.upload, _registered([data]), upload, iter([data]))
            with upload.handed_over:
                assert upload.handed_over.wait_for(lambda: upload.entered == 3, timeout=20)
            streamer.stop()
            upload.release.set()
            with pytest.raises(UploaderError, match="stopping"):
                uploading.result(timeout=20)
    finally:
        upload.release.set()
        streamer.close()
    assert upload.events == ["part"] * 3 + ["abort"]


def test_a_stop_while_the_nar_is_read_stops_reading() -> None:
    """A stop ends the reading and compressing of a NAR at once, not after
    the whole NAR.  Broken, stopping the daemon during a large NAR waits for
    all of it to be read, and systemd may kill the daemon meanwhile."""
    piece = b"x" * MiB
    streamer = NarStreamer("none", None)
    upload = HeldParts()
    upload.release.set()
    read: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(64):
            if i == 2:
                streamer.stop()
            read.append(i)
            yield piece

    try:
        with pytest.raises(UploaderError, match="stopping"):
            streamer.upload(_registered([piece] * 64), upload, chunks())
    finally:
        streamer.close()
    assert len(read) < 64, "the whole NAR was read after the stop"
    assert "abort" in upload.events and "complete" not in upload.events
