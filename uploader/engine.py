"""The upload engine shared by `push` and the daemon.

For a set of store paths it takes their closure, skips what the cache (or an
upstream cache) already has, and uploads the rest:

    for each missing path, references first, at most ``jobs`` at a time:
        stream the NAR from disk ▸ hash it ▸ compress (large NARs: into the
        parts of an upload, sent meanwhile, narstream.py; tiny ones: in one
        call on the event loop; others: in memory or a temp file)
        ▸ verify NarHash/NarSize against the Nix database  (else: refuse,
          and abort the upload in parts)
        ▸ upload the NAR (complete the upload in parts)
        ▸ wait until every reference has its narinfo in the cache
        ▸ sign and upload the narinfo

so a narinfo never becomes visible before its NAR or before its references'
narinfos, and nothing is signed that differs from what Nix registered.
Small requests (existence checks, narinfos, small NARs) are awaited on the
event loop where the target can (the S3 target's direct route), so
thousands in flight cost no thread each; the rest runs on worker threads.  The
store and the target are passed in, so tests can hand in plain objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import tempfile
import threading
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Any, Protocol, TypeVar

from uploader._exceptions import NoBucketError, TargetError, UploaderError
from uploader.compression import THREADED_ABOVE, extension
from uploader.narinfo import NarInfo
from uploader.narlisting import NarListing
from uploader.narstream import (
    PART_SIZE,
    PARTS_IN_FLIGHT,
    STREAM_ABOVE,
    Compressed,
    LateUpload,
    NarStreamer,
    compress_checked,
    compress_whole,
    stream_key,
)
from uploader.nixbase32 import ALPHABET, format_hash
from uploader.nixbase32 import encode as nix32
from uploader.progress import PATH_EVENTS, human_bytes
from uploader.roundtrips import MAX_WIDTH, RoundTrips
from uploader.signing import SecretKey
from uploader.store import PathInfo
from uploader.storepath import basename, hash_part
from uploader.targets import Target
from uploader.targets.file import FileTarget

__all__ = [
    "DependencyFailed",
    "Engine",
    "Progress",
    "PushResult",
    "Recorder",
    "StoreView",
    "StoredNar",
    "discard_temporary",
    "narinfo_key",
    "worker_threads",
]

log = logging.getLogger(__name__)
path_log = logging.getLogger(PATH_EVENTS)
T = TypeVar("T")

NAR_TYPE = "application/x-nix-nar"
# NARs up to this size are uploaded as many at a time as the round-trip
# time asks for (roundtrips.py), besides the ``jobs`` larger ones.
_SMALL_NAR = 256 << 10
# NARs up to this size are read and compressed on the event loop, in one
# call (about 0.2 ms here): less than handing them to a thread costs.
_INLINE_NAR = 64 << 10
# NARs up to this size are compressed in memory; larger ones into a file.
_IN_MEMORY = 8 << 20
# Skipping an existing NAR costs a HEAD; only worth it when the PUT is large.
_HEAD_NAR_ABOVE = 4 << 20
# How ``_schedule`` weighs a round trip against the bytes of a NAR left to
# send once it is prepared: an upload rate (only its order of magnitude
# matters), and what a streamed NAR has left (its parts in flight).
_UPLOAD_RATE = 100 << 20
_LEFT_TO_SEND = (PARTS_IN_FLIGHT + 1) * PART_SIZE
# Asking about at least this many narinfos, the engine lists the cache's keys
# (a page of 1000 per request) instead of sending a HEAD for each...
_LIST_FROM = 48
# ...in up to this many ranges at once, each given up (the rest asked by
# HEAD) after a page that settled fewer than _LIST_MIN_SETTLED of them: in a
# cache much larger than the batch, a page spans too few of them to pay.
_LIST_STREAMS = 4
_LIST_MIN_SETTLED = 24


def worker_threads(jobs: int) -> int:
    """Threads the engine runs target requests on: ``jobs`` NARs at once, the
    small requests (small NARs, narinfos, existence checks: as many as the
    round-trip time asks for, so threads are only started far from S3), and
    a few more.  The target's connection pool must be at least this large,
    or connections are thrown away and redone."""
    return max(1, jobs) + MAX_WIDTH + 4


def narinfo_key(store_path: str) -> str:
    return f"{hash_part(store_path)}.narinfo"


class StoreView(Protocol):
    """What the engine needs from the local Nix store."""

    def path_infos(
        self, paths: Iterable[str], *, closure: bool = False, checked: bool = False
    ) -> dict[str, PathInfo]: ...

    def dump(self, path: str) -> Iterator[bytes]: ...


class KnownPaths(Protocol):
    """A local memory of which narinfos the cache holds (saves HEAD requests)."""

    def known(self, hash_parts: Iterable[str]) -> set[str]: ...

    def remember(self, hash_parts: Iterable[str]) -> None: ...


@dataclass(frozen=True)
class StoredNar:
    """A verified NAR, compressed and stored in the target under ``url``."""

    url: str
    compression: str
    file_hash: str  # sha256:<nix32>
    file_size: int


class Recorder(Protocol):
    """What the engine writes for a path once its NAR is verified and stored,
    instead of a narinfo signed with the cache key: attest mode (see
    uploader.quorum) writes a builder's attestation."""

    def done_key(self, path: str) -> str:
        """The object whose presence means the path (and its closure) is done."""
        ...

    def nar_key(self, file_hash: bytes, extension: str) -> str:
        """Where the compressed NAR with this sha256 goes."""
        ...

    def record(self, info: PathInfo, nar: StoredNar) -> None: ...

    def rebuilt_differently(self, infos: list[PathInfo]) -> set[str]:
        """Those of ``infos``, done before, whose result now differs from
        what was recorded then (said in the log; the first record stays)."""
        ...


class CacheGuard(Protocol):
    """The uploader's side of the gc protocol (uploader/lifecycle/protect.py):
    a root written before any "already in the cache" decision, and the
    mark consulted for each."""

    def prepare(self) -> None: ...

    def forget_layout(self) -> None: ...

    def begin(self, paths: Iterable[str]) -> None: ...

    def extend(self, paths: Iterable[str]) -> None: ...

    def complete(self) -> None: ...

    def gone(self, paths: Iterable[str]) -> set[str]: ...

    def nar_unreferenced(self, key: str) -> bool: ...

    def settle_nar(self, key: str, write: Callable[[], None]) -> None: ...


class Progress(Protocol):
    def start(self, total_paths: int, total_bytes: int) -> None: ...

    def advance(self, info: PathInfo, uploaded: bool) -> None: ...


@dataclass
class PushResult:
    """What one push did, path by path."""

    uploaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    skipped_upstream: list[str] = field(default_factory=list)
    failed: dict[str, UploaderError] = field(default_factory=dict)
    nar_bytes: int = 0
    file_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class _Prepared:
    # In memory, or a named temporary file for large NARs; None once streamed.
    body: IO[bytes] | None
    file_hash: bytes
    file_size: int
    filename: str | None = None
    listing: bytes | None = None  # the .ls JSON, with write_nar_listing


class DependencyFailed(UploaderError):
    """A path was held back because one of its references failed (``cause``)."""

    def __init__(self, message: str, *, store_path: str, cause: UploaderError) -> None:
        super().__init__(message, store_path=store_path)
        self.cause = cause


_Outcome = asyncio.Future[UploaderError | None]


@dataclass
class _HeadStart:
    """The largest NAR a push may need, read and compressed while the cache
    is still being asked whether it has it (``Engine._head_start``)."""

    info: PathInfo
    upload: LateUpload
    done: Future[tuple[Compressed, NarListing | None]]
    attached: bool = False


@dataclass
class _Push:
    """The state of one push_infos call."""

    infos: Mapping[str, PathInfo]
    hint: frozenset[str]  # roots the caller just found absent
    # Uploaded again even though the cache has them (repairs): NAR first,
    # then the narinfo replaced.
    force: frozenset[str] = frozenset()
    result: PushResult = field(default_factory=PushResult)
    # Paths this call uploads (claimed in _inflight before their existence
    # check, so no other call uploads them too), and paths another call had
    # claimed first, whose outcome this call waits for.
    claimed: dict[str, _Outcome] = field(default_factory=dict)
    foreign: dict[str, _Outcome] = field(default_factory=dict)


class Engine:
    """Uploads closures from a store view to a target, signing narinfos."""

    def __init__(
        self,
        store: StoreView,
        target: Target,
        key: SecretKey | None,
        *,
        compression: str = "zstd",
        compression_level: int | None = None,
        jobs: int = 4,
        tmp_dir: str | None = None,
        known: KnownPaths | None = None,
        is_upstream: Callable[[list[PathInfo]], set[str]] | None = None,
        on_uploaded: Callable[[PathInfo, float, int], None] | None = None,
        recorder: Recorder | None = None,
        write_nar_listing: bool = False,
        guard: CacheGuard | None = None,
    ) -> None:
        extension(compression)  # validates the method early
        if (key is None) == (recorder is None):
            raise ValueError("an engine signs narinfos with a key or hands NARs to a recorder")
        self.store = store
        self.target = target
        self._key = key
        self.recorder = recorder
        self.compression = compression
        self.compression_level = compression_level
        self.jobs = max(1, jobs)
        self.tmp_dir = tmp_dir
        self.known = known
        self.is_upstream = is_upstream
        # A <hash>.ls beside each narinfo, as Nix's write-nar-listing.
        self.write_nar_listing = write_nar_listing
        # Told (path, seconds, compressed size) after each upload: metrics.
        self.on_uploaded = on_uploaded
        self.guard = guard
        self._streamer = NarStreamer(compression, compression_level)
        self._pool = ThreadPoolExecutor(
            max_workers=worker_threads(self.jobs), thread_name_prefix="upload"
        )
        self._cache_info_checked = False
        self._cache_info_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(self.jobs)
        # Small requests cost round trips, not CPU or memory: as many at once
        # as the distance to the cache asks for.
        self._round_trips = RoundTrips()
        self._cpu = asyncio.Semaphore(1)
        # Paths being checked or uploaded right now, by any push_infos call,
        # with their outcome (None, or the error) once known.
        self._inflight: dict[str, _Outcome] = {}
        # At most one head start at a time, handed from the call that began
        # it to the worker thread that streams its NAR.
        self._head: _HeadStart | None = None
        self._head_lock = threading.Lock()
        # The share of the hash space one listing page spanned last time
        # (1: the whole cache fits in a page; 0: the target does not list).
        self._page_span = 1.0

    def close(self) -> None:
        if self._head is not None:
            self._drop_head(self._head)
        # Uploads still running have no narinfo to come: aborted, not left
        # complete as orphans.
        self._streamer.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._streamer.close()

    def abort_uploads(self, timeout: float) -> int:
        """For a stop that cannot wait for the uploads under way (close()
        would): abort the multipart uploads being streamed, waiting at most
        ``timeout`` seconds; how many there were."""
        return self._streamer.abort_under_way(timeout)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def probe(self) -> None:
        """Ask the cache (again) for ``nix-cache-info``, writing it when missing:
        raises TargetError while the cache cannot be used."""
        async with self._cache_info_lock:
            self._cache_info_checked = False
            await self._ensure_cache_info()

    async def ensure_cache_info(self) -> None:
        """Write ``nix-cache-info`` unless the cache has one (or this engine attests)."""
        async with self._cache_info_lock:
            await self._ensure_cache_info()

    async def _ensure_cache_info(self) -> None:
        if self._cache_info_checked:
            return
        # Timed like the other small requests: the first measure of the
        # round-trip time, which orders the work (``_schedule``).
        present = await self._round_trips.run(partial(self._exists, "nix-cache-info"))
        unsure = getattr(self.target, "absence_unsure", None)
        why = await self._run(unsure, "nix-cache-info") if not present and unsure else None
        if why == "present":
            present = True
        elif why == "denied":
            # It may be there: an operator's own (Priority, WantMassQuery)
            # is not overwritten on a guess.
            log.warning(
                "cannot tell whether %s has a nix-cache-info: reading it is denied (403); "
                "not writing one. Allow s3:GetObject and s3:ListBucket (docs/s3-providers.md), "
                "or make sure the bucket has one: Nix substitutes only from a cache that does",
                self.target.url,
            )
            present = True
        # In attest mode the publisher writes it: a builder writes only
        # below its own name in quorum/v1/ (docs/fleet.md).
        if not present and self.recorder is None:
            await self._put_bytes(
                "nix-cache-info",
                self.target.url.cache_info().encode(),
                "text/x-nix-cache-info",
            )
            log.info("wrote nix-cache-info to %s", self.target.url)
        self._cache_info_checked = True

    async def push(
        self, paths: Iterable[str], progress: Progress | None = None, *, force: Iterable[str] = ()
    ) -> PushResult:
        """Upload the closure of ``paths``; per-path failures land in the result.
        Paths in ``force`` are uploaded even if the cache has them (a damaged
        NAR or narinfo), and their NAR is written again whatever is there."""
        forced = frozenset(force)
        roots = sorted(set(paths) | forced)
        async with self._pushing() as heads:
            infos = await self._closure_and_root(roots, heads)
            result = await self._push_infos(
                roots, infos, progress, absent=(), force=forced, head=heads
            )
            if self.guard is not None and result.ok:
                await self._run(self.guard.complete)
        return result

    async def _closure_and_root(
        self, roots: list[str], heads: list[_HeadStart]
    ) -> dict[str, PathInfo]:
        """The closure from Nix, with the push's root written in the cache
        (the gc protocol) and nix-cache-info checked.  What needs no store
        path is asked while Nix computes the closure, and nix-cache-info
        while the root is written: far from S3 each question is a round trip.
        The largest NAR starts compressing as soon as the closure is known,
        into ``heads``."""
        guard = self.guard
        early: list[asyncio.Task[Any]] = []

        def ask_early() -> None:
            early.append(asyncio.create_task(self.ensure_cache_info()))
            if guard is not None:
                early.append(asyncio.create_task(self._run(guard.prepare)))

        # A cache directory not made yet is made only for paths Nix has: a
        # push of a typo leaves no empty cache behind.
        fresh_directory = isinstance(self.target, FileTarget) and not os.path.isdir(
            self.target.root
        )
        if not fresh_directory:
            ask_early()
        try:
            infos = await self._run(lambda: self.store.path_infos(roots, closure=True))
            if fresh_directory:
                ask_early()
            head = self._head_start(roots, infos)
            if head is not None:
                heads.append(head)
            if guard is not None:
                await early[-1]  # the bucket's layout, checked before the root
                await self._run(guard.begin, sorted(infos))
            await early[0]
            return infos
        finally:
            # Settled before anything goes on; after a failure, not waited for.
            for task in early:
                task.cancel()
            await asyncio.gather(*early, return_exceptions=True)

    async def find_present(self, paths: Iterable[str]) -> set[str]:
        """Those of ``paths`` the cache holds (so does their closure): known
        from earlier, else asked.  Lets a caller skip the Nix queries for
        work already done."""
        wanted = sorted(set(paths))
        known = await self.confirm_present(self.known_present(wanted))
        return known | await self._ask([p for p in wanted if p not in known])

    def known_present(self, paths: Iterable[str]) -> set[str]:
        """Those of ``paths`` the local memory says the cache holds (no request)."""
        paths = list(paths)
        if self.known is None:
            return set()
        hashes = self.known.known(hash_part(p) for p in paths)
        return {p for p in paths if hash_part(p) in hashes}

    def _done_key(self, path: str) -> str:
        return self.recorder.done_key(path) if self.recorder else narinfo_key(path)

    async def confirm_present(self, present: set[str]) -> set[str]:
        """Those of ``present`` (found or remembered in the cache) that it
        still has by the gc protocol: a gc candidate is asked again."""
        if self.guard is None or not present:
            return present
        return present - await self._run(self.guard.gone, sorted(present))

    async def _ask(self, paths: list[str]) -> set[str]:
        """Those of ``paths`` the cache holds, asked of it (and remembered)."""
        found = await self._lookup([self._done_key(p) for p in paths])
        present = await self.confirm_present({p for p in paths if self._done_key(p) in found})
        if self.known is not None and present:
            self.known.remember(hash_part(p) for p in sorted(present))
        return present

    async def push_infos(
        self,
        roots: Iterable[str],
        infos: Mapping[str, PathInfo],
        progress: Progress | None = None,
        *,
        absent: Iterable[str] = (),
        force: frozenset[str] = frozenset(),
    ) -> PushResult:
        """Upload what the cache lacks of the closure of ``roots`` (``infos``
        must hold that closure).  Paths another call is uploading right now
        are waited for, not uploaded twice.  Paths in ``absent`` were just
        found missing by ``find_present``: they are not asked about again;
        paths in ``force`` are uploaded whatever the cache has (see push)."""
        async with self._pushing() as heads:
            return await self._push_infos(
                roots, infos, progress, absent=absent, force=force, head=heads
            )

    @contextlib.asynccontextmanager
    async def _pushing(self) -> AsyncIterator[list[_HeadStart]]:
        """One push: its small requests from the loop, the head starts it
        begins (dropped at the end), and a bucket found gone noted."""
        async with self.requests_here():
            heads: list[_HeadStart] = []
            try:
                yield heads
            except NoBucketError:
                self.bucket_gone()
                raise
            finally:
                for head in heads:
                    self._drop_head(head)

    def bucket_gone(self) -> None:
        """The bucket was not there: should it be made again, it needs
        nix-cache-info and the layout again, as a new one does."""
        self._cache_info_checked = False
        if self.guard is not None:
            self.guard.forget_layout()

    async def _push_infos(
        self,
        roots: Iterable[str],
        infos: Mapping[str, PathInfo],
        progress: Progress | None,
        *,
        absent: Iterable[str],
        force: frozenset[str],
        head: list[_HeadStart],
    ) -> PushResult:
        """``push_infos``; ``head`` holds the head start the caller began, or
        gets the one begun here (the caller drops it once done)."""
        roots = list(roots)
        if not head:
            started = self._head_start(roots, infos)
            if started is not None:
                head.append(started)
        await self.ensure_cache_info()
        push = _Push(infos, hint=frozenset(absent) | force, force=force)
        result = push.result
        tasks: list[asyncio.Task[None]] = []
        try:
            missing = await self._plan(roots, push)
            mine = [p for p in missing if p in push.claimed]
            for started in head:
                await self._settle_head(started, mine)
            done = {**push.foreign, **push.claimed}
            if progress:
                progress.start(len(mine), sum(infos[p].nar_size for p in mine))
            tasks = [
                asyncio.create_task(
                    self._upload_one(infos[p], done, result, progress, p in push.force)
                )
                for p in _schedule(mine, infos, self._round_trips.rtt)
            ]
            await asyncio.gather(*tasks)
            for path, fut in push.foreign.items():
                error = await asyncio.shield(fut)
                if error is None:
                    result.present.append(path)
                else:
                    result.failed[path] = error
        finally:
            for t in tasks:
                t.cancel()
            for p, fut in push.claimed.items():
                if not fut.done():
                    fut.set_result(UploaderError(f"{p}: upload interrupted", store_path=p))
                if self._inflight.get(p) is fut:
                    del self._inflight[p]
        if any(isinstance(e, NoBucketError) for e in result.failed.values()):
            self.bucket_gone()
        return result

    async def _plan(self, roots: Iterable[str], push: _Push) -> list[str]:
        """Walk the closure from the roots, level by level, and stop at paths
        the cache (or an upstream cache) has: a cache that holds a path holds
        its closure, so nothing below it needs a request."""
        missing: list[str] = []
        seen: set[str] = set()
        frontier = sorted(set(roots))
        while frontier:
            seen.update(frontier)
            absent = await self._absent(frontier, push)
            missing.extend(absent)
            frontier = sorted({r for p in absent for r in push.infos[p].references} - seen)
        return missing

    async def _absent(self, candidates: list[str], push: _Push) -> list[str]:
        """Those of ``candidates`` that neither the cache nor an upstream has."""
        known = await self.confirm_present(self.known_present(candidates) - push.force)
        push.result.present.extend(p for p in candidates if p in known)
        candidates = [p for p in candidates if p not in known]
        others = [p for p in candidates if p in self._inflight]
        push.foreign.update((p, self._inflight[p]) for p in others)
        candidates = [p for p in candidates if p not in self._inflight]
        loop = asyncio.get_running_loop()
        for p in candidates:
            push.claimed[p] = self._inflight[p] = loop.create_future()
        found = await self._ask([p for p in candidates if p not in push.hint])
        present = [p for p in candidates if p in found]
        push.result.present.extend(present)
        absent = [p for p in candidates if p not in found]
        if self.is_upstream is not None and set(absent) - push.force:
            upstream = await self._run(
                self.is_upstream, [push.infos[p] for p in absent if p not in push.force]
            )
            push.result.skipped_upstream.extend(sorted(upstream))
            present += upstream
            absent = [p for p in absent if p not in upstream]
        for p in present:
            self._release(push.claimed.pop(p), p)
        return absent + others

    async def _lookup(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` the cache has: from listings of the cache when
        there are many, else (and for what the listings left) a HEAD each."""
        found: set[str] = set()
        rest = sorted(set(keys))
        # A page spans a share of the hash space; it settles about that share
        # of the keys.  Learnt from the last full page: a cache much larger
        # than the batch is not listed again.  A recorder's keys are not
        # top-level keys, which are all a listing shows.
        if (
            self.recorder is None
            and len(rest) >= _LIST_FROM
            and len(rest) * self._page_span >= _LIST_MIN_SETTLED
        ):
            streams = min(_LIST_STREAMS, len(rest) // _LIST_FROM)
            size = -(-len(rest) // streams)
            ranges = [rest[i : i + size] for i in range(0, len(rest), size)]
            left = await asyncio.gather(*(self._list_range(r, found) for r in ranges))
            rest = [k for r in left for k in r]
        exists = await asyncio.gather(
            *(self._round_trips.run(partial(self._exists, k)) for k in rest)
        )
        found.update(k for k, e in zip(rest, exists, strict=True) if e)
        return found

    async def _list_range(self, keys: list[str], found: set[str]) -> list[str]:
        """Settle the sorted ``keys`` page by page; returns those left unsettled."""
        i = 0
        while i < len(keys):
            # Any string that sorts just before the key will do.
            start = keys[i][:-1]
            asked = time.monotonic()
            page = await self._run(self.target.list_keys, start)
            self._round_trips.observe(time.monotonic() - asked)
            if page is None:
                self._page_span = 0.0
                break
            self._page_span = (
                1.0 if page.last is None else max(0.0, _position(page.last) - _position(start))
            )
            settled = i
            while i < len(keys) and page.covers(keys[i]):
                if keys[i] in page.keys:
                    found.add(keys[i])
                i += 1
            if i - settled < _LIST_MIN_SETTLED:
                break
        return keys[i:]

    def _release(self, fut: _Outcome, path: str) -> None:
        fut.set_result(None)
        if self._inflight.get(path) is fut:
            del self._inflight[path]

    async def _upload_one(
        self,
        info: PathInfo,
        done: Mapping[str, asyncio.Future[UploaderError | None]],
        result: PushResult,
        progress: Progress | None,
        overwrite: bool = False,
    ) -> None:
        path = info.path
        started = time.monotonic()
        try:
            if info.nar_size <= _SMALL_NAR:
                url, prepared = await self._round_trips.run(
                    partial(self._upload_nar, info, overwrite)
                )
            else:
                async with self._slots:
                    url, prepared = await self._upload_nar(info, overwrite)
            # Slot released first: a path waiting on its references must not
            # hold a place its references need.
            for ref in info.references:
                if ref != path and ref in done:
                    error = await asyncio.shield(done[ref])
                    if error is not None:
                        raise DependencyFailed(
                            f"{path} not uploaded: its reference {ref} failed: {error}",
                            store_path=path,
                            cause=error,
                        )
            await self._round_trips.run(partial(self._record, info, url, prepared))
        except UploaderError as e:
            if e.store_path is None:
                e.store_path = path
            result.failed[path] = e
            if not isinstance(e, DependencyFailed):
                # Debug only: the caller says it once (push's report, the
                # daemon's retry line); at ERROR each failure showed twice.
                log.debug("%s", e)
            done[path].set_result(e)
            return
        except BaseException as e:
            if not done[path].done():
                interrupted = UploaderError(f"{path}: interrupted ({e!r})", store_path=path)
                done[path].set_result(interrupted)
            raise
        result.uploaded.append(path)
        result.nar_bytes += info.nar_size
        result.file_bytes += prepared.file_size
        if self.on_uploaded is not None:
            self.on_uploaded(info, time.monotonic() - started, prepared.file_size)
        if self.known is not None:
            self.known.remember([hash_part(path)])
        done[path].set_result(None)
        if progress:
            progress.advance(info, True)

    async def _upload_nar(self, info: PathInfo, overwrite: bool) -> tuple[str, _Prepared]:
        started = time.monotonic()
        if info.nar_size > STREAM_ABOVE:
            streamed = await self._run(self._stream_nar, info)
            if streamed is not None:
                log.debug("%s: NAR streamed in %.2fs", info.path, time.monotonic() - started)
                return streamed
        if info.nar_size <= _SMALL_NAR:
            return await self._upload_small_nar(info, overwrite)
        if info.nar_size > THREADED_ABOVE and self.compression != "xz":
            # zstd compresses a large NAR on every core: one at a time, while
            # the NARs compressed before it upload.  xz uses one core an
            # encoder, and takes turns by its memory (compression.py).
            async with self._cpu:
                prepared = await self._run(self._compress_and_verify, info)
        else:
            prepared = await self._run(self._compress_and_verify, info)
        compressed = time.monotonic()
        try:
            url = self._nar_url(prepared)
            await self._run(self._put_nar, url, prepared, overwrite)
        finally:
            _close(prepared)
        log.debug(
            "%s: NAR read and compressed in %.2fs, uploaded in %.2fs",
            info.path,
            compressed - started,
            time.monotonic() - compressed,
        )
        return url, prepared

    def _nar_url(self, prepared: _Prepared) -> str:
        if self.recorder is not None:
            return self.recorder.nar_key(prepared.file_hash, extension(self.compression))
        return f"nar/{nix32(prepared.file_hash)}.nar{extension(self.compression)}"

    async def _upload_small_nar(self, info: PathInfo, overwrite: bool) -> tuple[str, _Prepared]:
        """Compressed in a worker thread, sent from the event loop: thousands
        of tiny paths in flight cost no thread each."""
        if info.nar_size <= _INLINE_NAR:
            prepared = self._compress_whole(info)
        else:
            prepared = await self._run(self._compress_and_verify, info)
        try:
            url = self._nar_url(prepared)
            if not isinstance(prepared.body, io.BytesIO) or (
                self.guard is not None and self.guard.nar_unreferenced(url)
            ):
                await self._run(self._put_nar, url, prepared, overwrite)
            else:
                # Small: never worth a HEAD first (see _put_nar).
                await self._put_bytes(url, prepared.body.getvalue(), NAR_TYPE)
        finally:
            _close(prepared)
        return url, prepared

    def requests_here(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A block within which the target's small requests go out from the
        running loop itself, where the target can (S3's direct route):
        ``push`` and ``push_infos`` open one; the daemon opens one a batch."""
        here = getattr(self.target, "requests_here", None)
        scope: contextlib.AbstractAsyncContextManager[None] = (
            here() if here is not None else contextlib.nullcontext()
        )
        return scope

    async def _exists(self, key: str) -> bool:
        """``target.exists``, without a thread when the target can."""
        check = getattr(self.target, "exists_async", None)
        if check is None:
            return await self._run(self.target.exists, key)
        found: bool = await check(key)
        return found

    async def _put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        """``target.put_bytes``, without a thread when the target can."""
        put = getattr(self.target, "put_bytes_async", None)
        if put is None:
            await self._run(self.target.put_bytes, key, data, content_type)
        else:
            await put(key, data, content_type)

    def _stream_nar(self, info: PathInfo) -> tuple[str, _Prepared] | None:
        """Compress and upload at once, under a fresh name (narstream.py);
        None when the target stores whole files.  Runs in a worker thread."""
        head = self._take_head(info)
        if head is not None:
            url = head.upload.key
            compressed, listing = head.done.result()
        else:
            url = stream_key(info, self.compression)
            upload = self.target.start_upload(url, NAR_TYPE)
            if upload is None:
                return None
            chunks, listing = self._dump(info)
            compressed = self._streamer.upload(info, upload, chunks)
        return url, _Prepared(
            None,
            compressed.file_hash,
            compressed.file_size,
            listing=listing.json() if listing is not None else None,
        )

    def _head_start(self, roots: Iterable[str], infos: Mapping[str, PathInfo]) -> _HeadStart | None:
        """Begin reading and compressing the first large NAR the push would
        prepare (``_schedule``) of those the cache may lack, before asking
        it, so that the plan's round trips (the root, the mark, the
        existence checks: several round-trip times far from S3) are not
        spent idle.  Its parts wait for the answer (LateUpload): at most the
        parts in flight are compressed ahead, and thrown away, unsent, when
        the cache (or an upstream) has the path."""
        if not self.target.takes_parts or self._head is not None:
            return None
        closure, todo = set(), [p for p in roots if p in infos]
        while todo:
            path = todo.pop()
            if path not in closure:
                closure.add(path)
                todo.extend(r for r in infos[path].references if r in infos)
        # A signed path came from a binary cache (this one, or an upstream
        # one it need not be uploaded to): built here, it has no signature.
        likely = [p for p in closure if not infos[p].sigs and p not in self._inflight]
        if not any(infos[p].nar_size > STREAM_ABOVE for p in likely):
            return None
        order = _schedule(likely, infos, self._round_trips.rtt)
        large = [p for p in order if infos[p].nar_size > STREAM_ABOVE]
        # Asked of the local memory for the large ones only: the plan asks
        # about the rest.
        known = self.known_present(large)
        large = [p for p in large if p not in known]
        if not large:
            return None
        info = infos[large[0]]
        log.debug("%s: compressing its NAR while the cache is asked", info.path)
        upload = LateUpload(stream_key(info, self.compression))
        head = _HeadStart(info, upload, self._pool.submit(self._compress_ahead, info, upload))
        self._head = head
        return head

    def _compress_ahead(
        self, info: PathInfo, upload: LateUpload
    ) -> tuple[Compressed, NarListing | None]:
        chunks, listing = self._dump(info)
        return self._streamer.upload(info, upload, upload.fed(chunks)), listing

    async def _settle_head(self, head: _HeadStart, mine: Collection[str]) -> None:
        """Once the plan is known: begin the head start's upload if this
        push uploads its path, else drop it."""
        if self._head is not head:
            return
        if head.info.path in mine:
            try:
                upload = await self._run(self.target.start_upload, head.upload.key, NAR_TYPE)
            except UploaderError:
                upload = None  # the path's own upload tries again, and says why
            if upload is not None:
                if head.upload.attach(upload):
                    with self._head_lock:
                        head.attached = True
                    return
                with contextlib.suppress(UploaderError):
                    await self._run(upload.abort)
        else:
            log.debug(
                "%s: not uploaded by this push; its NAR compressed ahead is dropped", head.info.path
            )
        self._drop_head(head)

    def _drop_head(self, head: _HeadStart) -> None:
        with self._head_lock:
            if self._head is not head:
                return  # taken by the path's upload, or dropped before
            self._head = None
        head.upload.drop()

    def _take_head(self, info: PathInfo) -> _HeadStart | None:
        """The head start for ``info``, once begun for this push."""
        with self._head_lock:
            head = self._head
            if head is None or head.info != info or not head.attached:
                return None
            self._head = None
        return head

    def _dump(self, info: PathInfo) -> tuple[Iterable[bytes], NarListing | None]:
        """The NAR's chunks; with write_nar_listing, read into a listing on the way."""
        chunks = self.store.dump(info.path)
        if not self.write_nar_listing:
            return chunks, None
        listing = NarListing()

        def fed() -> Iterator[bytes]:
            for chunk in chunks:
                listing.feed(chunk)
                yield chunk

        return fed(), listing

    def _compress_whole(self, info: PathInfo) -> _Prepared:
        """A tiny NAR, read, checked against the database and compressed in
        memory, in one piece."""
        chunks, listing = self._dump(info)
        try:
            data, compressed = compress_whole(
                info, chunks, self.compression, self.compression_level
            )
        except OSError as e:
            raise UploaderError(f"{info.path}: reading its NAR: {e}") from e
        return _Prepared(
            body=io.BytesIO(data),
            file_hash=compressed.file_hash,
            file_size=compressed.file_size,
            listing=listing.json() if listing is not None else None,
        )

    def _compress_and_verify(self, info: PathInfo) -> _Prepared:
        """Stream the NAR through sha256 and the compressor into a temp file,
        then compare with the database.  Runs in a worker thread."""
        # Closed (and so deleted) by the caller once uploaded, or below on
        # failure.  A large NAR goes to a named file so that the target can
        # read it by name, in parallel parts, without buffering it.
        body: IO[bytes]
        try:
            if info.nar_size > _IN_MEMORY:
                body = tempfile.NamedTemporaryFile(dir=self.tmp_dir, prefix="nar-")  # noqa: SIM115
            else:
                body = io.BytesIO()
        except OSError as e:
            raise UploaderError(f"{info.path}: creating a temporary file: {e}") from e
        try:
            chunks, listing = self._dump(info)
            compressed = compress_checked(
                info, chunks, body.write, self.compression, self.compression_level
            )
            body.flush()
            body.seek(0)
            return _Prepared(
                body=body,
                file_hash=compressed.file_hash,
                file_size=compressed.file_size,
                filename=getattr(body, "name", None),
                listing=listing.json() if listing is not None else None,
            )
        except OSError as e:
            discard_temporary(body)
            # A full or missing temporary directory passes; the daemon retries.
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                where = self.tmp_dir or tempfile.gettempdir()
                raise UploaderError(
                    f"{info.path}: no space left in {where} for its compressed NAR "
                    f"({human_bytes(info.nar_size)} before compression): free space there, "
                    "or point the tmp-dir setting (or TMPDIR) at a larger disk"
                ) from e
            raise UploaderError(f"{info.path}: spooling its NAR: {e}") from e
        except BaseException:
            discard_temporary(body)
            raise

    def _put_nar(self, url: str, prepared: _Prepared, overwrite: bool) -> None:
        # A NAR no narinfo names may be deleted by gc: written, and settled.
        reused = self.guard is not None and self.guard.nar_unreferenced(url)
        # An object at this URL may be the damaged NAR being repaired.
        if (
            not overwrite
            and not reused
            and prepared.file_size > _HEAD_NAR_ABOVE
            and self.target.exists(url)
        ):
            return
        self._write_nar(url, prepared)
        if reused and self.guard is not None:
            self.guard.settle_nar(url, lambda: self._write_nar(url, prepared))

    def _write_nar(self, url: str, prepared: _Prepared) -> None:
        if prepared.body is not None:
            prepared.body.seek(0)  # written again when gc took it meanwhile
        if prepared.filename is not None:
            self.target.put_file(url, prepared.filename, prepared.file_size, NAR_TYPE)
        elif prepared.body is not None:
            self.target.put(url, prepared.body, prepared.file_size, NAR_TYPE)

    async def _record(self, info: PathInfo, url: str, prepared: _Prepared) -> None:
        if self.recorder is not None:
            stored = StoredNar(
                url, self.compression, format_hash(prepared.file_hash), prepared.file_size
            )
            await self._run(self.recorder.record, info, stored)
        else:
            await self._put_narinfo(info, url, prepared)

    async def _put_narinfo(self, info: PathInfo, url: str, prepared: _Prepared) -> None:
        assert self._key is not None  # checked in __init__
        unsigned = NarInfo(
            store_path=info.path,
            url=url,
            compression=self.compression,
            file_hash=format_hash(prepared.file_hash),
            file_size=prepared.file_size,
            nar_hash=info.nar_hash,
            nar_size=info.nar_size,
            references=tuple(basename(r) for r in info.references),
            deriver=basename(info.deriver) if info.deriver else None,
            ca=info.ca,
        )
        ours = self._key.sign(unsigned.fingerprint())
        others = tuple(s for s in info.sigs if s.split(":", 1)[0] != self._key.name)
        signed = NarInfo(**{**unsigned.__dict__, "sigs": (*others, ours)})
        try:
            if prepared.listing is not None:
                # Before the narinfo, as Nix does: whoever sees it finds its listing.
                await self._put_bytes(
                    f"{hash_part(info.path)}.ls", prepared.listing, "application/json"
                )
            await self._put_bytes(
                narinfo_key(info.path), signed.render().encode(), "text/x-nix-narinfo"
            )
        except TargetError as e:
            e.store_path = info.path
            raise
        path_log.info(
            "uploaded %s (%s NAR, %s %s)",
            info.path,
            human_bytes(info.nar_size),
            human_bytes(prepared.file_size),
            "uncompressed" if self.compression == "none" else self.compression,
        )


def _close(prepared: _Prepared) -> None:
    if prepared.body is not None:
        prepared.body.close()


def _position(key: str) -> float:
    """Where a key sorts in the space of nix32 hash parts, from 0 to 1."""
    value, scale = 0.0, 1.0
    for c in key[:10]:
        scale /= 32
        value += ALPHABET.find(c) * scale if c in ALPHABET else 0.0
    return value


def _schedule(paths: Iterable[str], infos: Mapping[str, PathInfo], rtt: float = 0.0) -> list[str]:
    """The order in which NARs are prepared.

    Preparing NARs (reading, hashing, compressing) keeps the cores busy;
    what a NAR leaves to do once prepared runs beside the next ones: the
    rest of its upload, then the narinfos standing on it, written one level
    of the closure at a time (a narinfo waits for its references'), one
    round trip each.  The longest such tail first (Jackson's rule) ends the
    push soonest: the bottom of a deep closure starts its chain of narinfos
    early, which then goes on while the rest compresses (100 levels are 2 s
    at 20 ms), and near S3, where round trips cost nothing, this is largest
    first, so the long upload of a big NAR overlaps the many small ones.
    """
    order = sorted(set(paths))
    above: dict[str, list[str]] = {p: [] for p in order}
    for path in order:
        for ref in infos[path].references:
            if ref != path and ref in above:
                above[ref].append(path)
    height = _heights(above)
    # A round trip, in bytes uploaded meanwhile: only the order matters.
    level = rtt * _UPLOAD_RATE

    def tail(path: str) -> tuple[float, int]:
        size = infos[path].nar_size
        return (-(min(size, _LEFT_TO_SEND) + height[path] * level), -size)

    return sorted(order, key=lambda p: (*tail(p), p))


def _heights(above: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """For each path, the narinfos in the longest chain from it up through
    the paths standing on it (``above``), itself included.  Iterative: a
    closure may be thousands of paths deep.  A cycle (never in a valid Nix
    database) is cut where it closes."""
    height: dict[str, int] = {}
    for start in above:
        if start in height:
            continue
        stack = [(start, iter(above[start]))]
        open_ = {start}
        while stack:
            node, rest = stack[-1]
            for nxt in rest:
                if nxt not in height and nxt not in open_:
                    stack.append((nxt, iter(above[nxt])))
                    open_.add(nxt)
                    break
            else:
                stack.pop()
                open_.discard(node)
                height[node] = 1 + max((height.get(n, 0) for n in above[node]), default=0)
    return height


def discard_temporary(body: IO[bytes]) -> None:
    """Close (and so delete) a temporary file whose buffered bytes may not
    fit: on a full disk, closing raises the error again."""
    with contextlib.suppress(OSError):
        body.close()
