"""The uploader daemon behind `nix-cache-uploader run`.

Phases: startup (start watching the spool, then scan it, so no entry is
missed whether it came while the daemon was down or up) → main loop (take
the entries that are due, in batches, and upload their closures with the
shared engine) → shutdown (stop taking work, let the running batch finish
within a grace period, then cancel; unfinished entries stay in the spool).

An entry leaves the spool only when every output it names is in the cache,
or when it is quarantined with a reason (malformed, paths not valid in the
store, contents that differ from the Nix database).  Failures of the cache or
of the local Nix are retried forever with capped, jittered exponential
backoff; the entry is never dropped for them.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import heapq
import logging
import os
import random
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from uploader import __version__
from uploader._exceptions import (
    CredentialsError,
    IncompleteEntryError,
    InvalidPathError,
    NarError,
    NoBucketError,
    SpoolError,
    StoreError,
    TargetError,
    TransientTargetError,
    UploaderError,
    VerificationError,
)
from uploader.buildlogs import LOG_TYPE, log_key, read_build_log
from uploader.config import Settings
from uploader.engine import DependencyFailed, Engine, PushResult
from uploader.fdlimit import ran_out
from uploader.gcroots import GcRoots
from uploader.metrics import Metrics
from uploader.progress import plural
from uploader.spool import Spool
from uploader.spoolentry import Entry
from uploader.state import snapshot_settled, spool_snapshot, touch_status, write_status
from uploader.store import NixStore, PathInfo

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

# The spool is scanned again this often, in case an inotify event was lost.
_RESCAN_EVERY = 10.0
_STATUS_EVERY = 1.0
# A malformed entry younger than this is read again before it is quarantined.
_SETTLE = 2.0
# Written this often even when nothing changed: `wait` run by a user who
# cannot read the spool needs a status newer than its own start, and `status`
# calls a daemon silent for 15 s "not responding".
_HEARTBEAT_EVERY = 5.0
# Retrying entries listed in the status, the oldest first (with the count of
# all): during an outage every entry retries, and 5,000 of them made a 1.2 MB
# file rewritten every few seconds.
RETRYING_LISTED = 100
# Entries that arrive during a batch are rooted together this long after the
# first of them, unless a batch has taken them meanwhile (it roots its own):
# a symlink each costs up to a millisecond on a busy disk.
_ARRIVAL_WINDOW = 0.25


@dataclass
class _Pending:
    name: str
    attempts: int = 0
    next_try: float = 0.0  # time.monotonic()
    last_error: str | None = None
    retry_after: float | None = None


class Daemon:
    """Drains the spool into the cache until asked to stop."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: NixStore,
        engine: Engine,
        spool: Spool,
        roots: GcRoots | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.spool = spool
        self.roots = roots
        self.metrics = metrics
        if metrics is not None:
            metrics.watch(
                queue_depth=lambda: len(self._pending),
                in_flight=self._uploading,
                oldest_age=lambda: self._oldest_age() or 0.0,
                cache_usable=lambda: 0.0 if self._cache_problem else 1.0,
            )
        self._pending: dict[str, _Pending] = {}
        self._in_flight: set[str] = set()
        # GC roots held for entries: name -> outputs, and a count per output.
        self._entry_roots: dict[str, list[str]] = {}
        self._root_refs: collections.Counter[str] = collections.Counter()
        # Roots the thread skipped, the cache having been found to hold their
        # paths, that entries still count: made if a batch reads them after all.
        self._skipped: set[str] = set()
        # Roots being made for the batch, and what the batch found in the cache.
        self._rooting: list[asyncio.Future[None]] = []
        self._answered: set[str] = set()
        # Symlinks are made and removed on one thread, in the order asked
        # (a root removed and then needed again ends up there), never on the
        # event loop.
        self._roots_thread = concurrent.futures.ThreadPoolExecutor(1, "gc-roots")
        # Entries that arrived during a batch, to be rooted ahead of theirs.
        self._arrived: set[str] = set()
        self._arrival_task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._forced = False
        self._dirty = True
        self._started = time.time()
        # Counted as each path lands, not when its batch settles: a batch
        # that fails later still uploaded them.
        self._uploaded_paths = 0
        self._uploaded_bytes = 0
        self._status_failing = False
        # Reasons of quarantined entries that a full disk kept from being
        # written beside them: tried again with each status.
        self._unwritten_reasons: dict[str, str] = {}
        engine.on_uploaded = self._count_upload
        self._failures: collections.Counter[str] = collections.Counter()
        self._last_errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        # Set while the cache cannot be used at all (no credentials, or
        # rejected ones): entries wait, and it is asked again with backoff.
        # An unreachable cache is not this: its batches fail and retry.
        self._cache_problem: str | None = None
        self._cache_checked = False
        self._cache_attempts = 0
        self._cache_retry_at = 0.0
        # After a batch failed as a whole (the cache refused or did not
        # answer, the local Nix failed), no batch starts before this: the
        # entries that arrive meanwhile wait to be tried with the failed
        # ones, as one batch and one log line, instead of each trying (and
        # failing, and saying so) on its own.
        self._held_until = 0.0
        self._batch_failures = 0  # in a row
        # Halved by each such failure for want of a resource, back to
        # batch-size on a success: a batch may fail for its size (too few
        # open files for the Nix queries of a thousand entries), and then
        # succeeds in parts.
        self._batch_limit: int | None = None

    # -- control -------------------------------------------------------

    @property
    def forced(self) -> bool:
        """Whether a second stop request cut the drain short."""
        return self._forced

    def request_stop(self) -> None:
        """First call: drain and stop.  Second call: stop now."""
        if self._stopping.is_set():
            self._forced = True
            log.warning("second stop request: cancelling in-flight uploads")
        else:
            log.info(
                "stopping: finishing in-flight uploads (up to %ss)", self.settings.drain_timeout
            )
        self._stopping.set()
        self._wakeup.set()

    def retry_now(self) -> None:
        """Forget backoff delays (SIGUSR1, sent by `nix-cache-uploader retry`)."""
        self._rescan()  # entries `retry` moved back from quarantine
        for p in self._pending.values():
            p.next_try = 0.0
        self._held_until, self._batch_limit = 0.0, None
        log.info("retrying every waiting entry now")
        self._wakeup.set()

    def hangup(self) -> None:
        """SIGHUP, which operators send out of habit: no reload, but not a death either."""
        log.warning(
            "SIGHUP: rescanning the spool; settings are read at start only, "
            "restart the service to change them"
        )
        self._rescan()
        self._wakeup.set()

    def _discover(self, name: str) -> None:
        if name not in self._pending:
            self._pending[name] = _Pending(name)
            self._dirty = True
            if self._in_flight or time.monotonic() < self._held_until:
                # It waits for the batch in flight, which can take minutes
                # (a slow cache), or for the retry of one that failed as a
                # whole (an outage): its outputs are rooted now, not then.
                self._root_ahead([name])
        self._wakeup.set()

    def _root_ahead(self, names: Iterable[str]) -> None:
        """Root these waiting entries' outputs ahead of their batch."""
        if self.roots is None:
            return
        self._arrived.update(names)
        if self._arrived and self._arrival_task is None:
            loop = asyncio.get_running_loop()
            self._arrival_task = loop.create_task(self._root_arrivals())

    async def _root_arrivals(self) -> None:
        """Root the outputs of the entries that arrived during a batch and
        still wait for one (read from the entry, or from its .drv: no Nix
        query), unless the cache is remembered to hold them.  Those arriving
        together are rooted together; anything amiss is left to their batch."""
        try:
            while self._arrived:
                await asyncio.sleep(_ARRIVAL_WINDOW)
                names = sorted(n for n in self._arrived if self._waiting(n))
                self._arrived.clear()
                if not names:
                    continue
                read = await asyncio.to_thread(self._entry_outputs, names)
                outputs = {n: outs for n, outs in read.items() if outs and self._waiting(n)}
                present = self.engine.known_present(
                    sorted({p for outs in outputs.values() for p in outs})
                )
                missing = {n: outs for n, outs in outputs.items() if not present.issuperset(outs)}
                if (rooting := self._root(missing, present)) is not None:
                    await self._settled_roots([rooting])
        except Exception as e:  # their batches root them
            log.warning("rooting the builds that arrived: %r", e)
        finally:
            self._arrival_task = None

    def _waiting(self, name: str) -> bool:
        """Whether an entry waits for a batch, not rooted yet."""
        return (
            name in self._pending and name not in self._in_flight and name not in self._entry_roots
        )

    def _entry_outputs(self, names: list[str]) -> dict[str, list[str]]:
        """(On a thread.) The outputs each entry names, or its .drv lists."""
        found: dict[str, list[str]] = {}
        for name in names:
            try:
                entry = self.spool.read(name)
                if entry.outputs or entry.drv is None:
                    found[name] = list(entry.outputs)
                else:
                    drv = entry.drv
                    found[name] = self.store.read_derivation_outputs([drv]).get(drv, [])
            except (OSError, UploaderError):
                continue
        return found

    def _rescan(self) -> None:
        try:
            names = self.spool.pending()
        except OSError as e:
            log.error("cannot list the spool %s: %s", self.spool.path, e)
            return
        for name in names:
            self._discover(name)
        # Entries removed behind our back (e.g. by hand) are forgotten.
        for gone in set(self._pending) - set(names) - self._in_flight:
            del self._pending[gone]
            self._unroot(gone)

    # -- phases --------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGUSR1, self.retry_now)
        loop.add_signal_handler(signal.SIGHUP, self.hangup)
        stale = self.spool.remove_stale_temp_files()
        if stale:
            log.warning("removed %s from the spool", plural(len(stale), "stale hook temp file"))
        try:
            requeued = self.spool.requeue_formats_read_now()
        except OSError as e:
            log.warning("cannot look into %s: %s", self.spool.quarantine_path, e)
        else:
            if requeued:
                log.warning(
                    "requeued %s quarantined by an older uploader for a format this one "
                    "reads", plural(len(requeued), "entry", "entries"),
                )  # fmt: skip

        def on_entry(name: str) -> None:  # on watchdog's thread
            loop.call_soon_threadsafe(self._discover, name)

        watch = self.spool.watch(on_entry)
        self._rescan()
        if self.roots is not None and (dropped := await self._keep_roots_only()):
            log.warning(
                "removed %s in %s that no entry in %s names (left by a crash, by entries "
                "removed by hand, or by a spool moved without its entries: move those here, "
                "they are uploaded from here only)",
                plural(dropped, "GC root"), self.roots.directory, self.spool.path,
            )  # fmt: skip
        log.info(
            "nix-cache-uploader %s serving %s → %s (%s waiting)",
            __version__,
            self.spool.path,
            self.engine.target.url,
            plural(len(self._pending), "entry", "entries"),
        )
        status = asyncio.create_task(self._status_loop())
        try:
            await self._main_loop()
        finally:
            watch.stop()
            status.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await status
            if self._arrival_task is not None:
                self._arrival_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._arrival_task
            # The roots of entries done are removed before the daemon ends.
            await asyncio.wrap_future(self._roots_thread.submit(lambda: None))
            self._roots_thread.shutdown()
            self._write_status(running=False)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info(
                "stopped; %s left in the spool", plural(len(self._pending), "entry", "entries")
            )

    async def _main_loop(self) -> None:
        # The cache is first asked while the first batch is read and its
        # outputs resolved: a batch that needs an answer waits for it (the
        # engine's cache-info lock), or fails with it the same way.
        first_check = asyncio.create_task(self._check_cache())
        try:
            await self._serve()
        finally:
            if not first_check.done():
                first_check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first_check

    async def _serve(self) -> None:
        last_scan = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            if now - last_scan > _RESCAN_EVERY:
                self._rescan()
                last_scan = now
            if self._cache_problem is not None and now >= self._cache_retry_at:
                await self._check_cache()
            batch = self._due(now)
            if not batch:
                await self._sleep_until_due(now)
                continue
            work = asyncio.create_task(self._process(batch))
            stop = asyncio.create_task(self._stopping.wait())
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not work.done():
                await self._drain(work)
            elif work.exception() is not None:
                raise work.exception()  # type: ignore[misc]

    async def _drain(self, work: asyncio.Task[None]) -> None:
        """Give the running batch its grace period, then cancel it."""
        deadline = time.monotonic() + self.settings.drain_timeout
        while not work.done() and not self._forced and time.monotonic() < deadline:
            await asyncio.wait({work}, timeout=0.2)
        if not work.done():
            log.warning("in-flight uploads cancelled; their entries stay queued")
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work

    def _due(self, now: float) -> list[str]:
        if now < self._held_until:
            return []
        due = [p for p in self._pending.values() if p.next_try <= now]
        due.sort(key=lambda p: (p.attempts, p.name))
        return [p.name for p in due[: self._batch_limit or self.settings.batch_size]]

    async def _sleep_until_due(self, now: float) -> None:
        waits = [self._next_try(p) - now for p in self._pending.values()]
        if self._cache_problem is not None:
            waits.append(self._cache_retry_at - now)
        await self._sleep(min([_RESCAN_EVERY, *waits]))

    async def _sleep(self, timeout: float) -> None:
        """Until ``timeout`` passes or something wakes the loop (an entry, a signal)."""
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=max(timeout, 0.01))

    # -- the cache as a whole ------------------------------------------

    async def _check_cache(self) -> None:
        """Ask the cache whether it takes our credentials (at start, and with
        backoff while it does not), so that the problem shows before any
        build is queued and clears even when none is."""
        try:
            await self.engine.probe()
        except CredentialsError as e:
            self._cache_down(e, [])
            return
        except TargetError as e:
            # Unreachable, or no such bucket: batches retry with their own
            # backoff and say so; said here too, before any build is queued.
            if not self._cache_checked:
                log.warning("%s; builds queued meanwhile are retried with backoff", e)
            self._cache_checked = True
            return
        self._cache_checked = True
        self._cache_up()

    def _batch_failed(self, names: list[str], error: UploaderError) -> None:
        """A failure before any path (the cache unusable, unreachable, or a
        Nix query) concerns the whole batch: no credentials wait for them,
        anything else is retried with backoff."""
        if isinstance(error, CredentialsError):
            self._cache_down(error, names)
            return
        if isinstance(error, NoBucketError):
            self.engine.bucket_gone()
        # Counted once per batch (an unreachable endpoint, a missing bucket):
        # what monitoring alerts on while every upload fails.
        self._count_failure(_kind(error))
        retry_after = error.retry_after if isinstance(error, TransientTargetError) else None
        self._hold(names, str(error), retry_after=retry_after or 0.0, smaller=ran_out(error))

    def _hold(
        self, names: list[str], error: str, *, retry_after: float = 0.0, smaller: bool = False
    ) -> None:
        """The batch failed as a whole: every entry, those that arrive
        meanwhile too, waits for its retry (with backoff on failures in a
        row); with ``smaller`` (the machine ran out), the next batch is at
        most half as large."""
        self._batch_failures += 1
        if smaller:
            self._batch_limit = max(1, len(names) // 2)
        delay = min(
            self.settings.retry_max, self.settings.retry_min * 2 ** (self._batch_failures - 1)
        )
        delay = max(delay * random.uniform(0.5, 1.0), retry_after)
        self._held_until = time.monotonic() + delay
        self._retry_later(names, error, delay=delay)
        # The whole queue waits now: those not rooted yet (this batch's when
        # it failed before rooting, the rest of a queue larger than a batch)
        # are rooted as the entries that arrive during the hold are.
        self._root_ahead(n for n in self._pending if n not in self._entry_roots)

    def _next_try(self, p: _Pending) -> float:
        return max(p.next_try, self._held_until)

    def _cache_up(self) -> None:
        if self._cache_problem is not None:
            log.warning("the cache takes the requests again; uploading the waiting entries")
            self._cache_problem = None
            self._dirty = True
            self._wakeup.set()

    def _cache_down(self, error: CredentialsError, names: Iterable[str]) -> None:
        """No entry can be uploaded: they wait (no attempt counted against
        them) until the cache is asked again, with backoff; one log line."""
        if self._cache_problem is None:
            log.warning("%s; entries stay queued, asking again with backoff", error)
            self._count_failure(_kind(error))
            self._note_error(None, error)
            self._cache_attempts = 0
        self._cache_attempts += 1
        delay = min(
            self.settings.retry_max, self.settings.retry_min * 2 ** (self._cache_attempts - 1)
        )
        if isinstance(error, TransientTargetError) and error.retry_after:
            delay = max(delay, error.retry_after)
        log.debug("cache still unusable (attempt %d): %s", self._cache_attempts, error)
        self._cache_problem = str(error)
        self._cache_retry_at = time.monotonic() + delay
        for name in names:
            if name in self._pending:
                self._pending[name].next_try = self._cache_retry_at
        self._dirty = True

    # -- one batch -----------------------------------------------------

    async def _process(self, names: list[str]) -> None:
        self._in_flight = set(names)
        self._dirty = True
        try:
            entries = self._read(names)
            if entries:
                await self._upload(entries)
        except Exception as e:
            # A bug must not end the service: log it, keep the entries, back off.
            log.exception("unexpected error while uploading a batch")
            self._retry_later([n for n in names if n in self._pending], f"internal error: {e!r}")
        finally:
            self._in_flight = set()
            # Written now, not on the next tick: `wait` and `status` read it.
            self._write_status(running=True)

    def _read(self, names: list[str]) -> list[Entry]:
        entries = []
        for name in names:
            try:
                entries.append(self.spool.read(name))
            except FileNotFoundError:  # removed by hand
                self._pending.pop(name, None)
                self._unroot(name)
            except IncompleteEntryError:
                # Its hook is still writing it: the watch reports it again
                # when the hook closes it, a rescan if that event is lost.
                self._pending.pop(name, None)
            except SpoolError as e:
                if self._maybe_still_written(name):
                    self._pending[name].next_try = time.monotonic() + _SETTLE
                else:
                    self._quarantine(name, str(e))
            except OSError as e:
                self._retry_later([name], f"reading spool entry {name}: {e}")
        return entries

    async def _upload(self, entries: list[Entry]) -> None:
        # The batch's small requests go out from this loop, on connections
        # opened for it (no thread each, nor a hand-off to one).
        async with self.engine.requests_here():
            await self._upload_batch(entries)

    async def _upload_batch(self, entries: list[Entry]) -> None:
        started = time.monotonic()
        try:
            outputs, unusable = await asyncio.to_thread(self._resolve_outputs, entries)
        except StoreError as e:
            self._hold([n.name for n in entries], f"asking the local Nix: {e}", smaller=ran_out(e))
            return
        for name, reason in unusable:
            self._quarantine(name, reason)
        ready = {name: outs for name, outs in outputs.items() if outs}
        if not ready:
            return
        all_outputs = sorted({p for outs in ready.values() for p in outs})
        guard = self.engine.guard
        # Outputs the cache has need no closure from Nix: a re-enqueued build
        # costs one listing, or nothing when remembered.  The others are
        # rooted (locally) before the cache is asked, which may take long:
        # on a thread, skipping what the cache is meanwhile found to hold;
        # done before anything else happens to the batch.
        self._answered = set()
        try:
            found = await self._find_present(ready, all_outputs)
        finally:
            await self._rooted()
        if found is None:
            return
        present = found
        if self.engine.recorder is not None and present:
            await self._compare_rebuilt(sorted(present))
        todo = [p for p in all_outputs if p not in present]
        infos: dict[str, PathInfo] = {}
        result = PushResult(present=sorted(present))
        if todo:
            # Nothing is read before its root is there (a batch that only
            # finds its outputs in the cache does not wait).
            await self._roots_asked_made(todo)
            try:
                infos = await asyncio.to_thread(
                    self.store.path_infos, todo, closure=True, checked=True
                )
            except StoreError as e:
                # Includes a path collected since the validity check: the
                # next attempt quarantines its entry.
                self._hold(list(ready), f"asking the local Nix: {e}", smaller=ran_out(e))
                return
            queried = time.monotonic()
            try:
                if guard is not None:
                    await asyncio.to_thread(guard.extend, infos)
                result = await self.engine.push_infos(todo, infos, absent=todo)
            except UploaderError as e:
                self._batch_failed(list(ready), e)
                return
            log.debug(
                "batch of %s: Nix queries %.2fs, upload of %s %.2fs",
                plural(len(entries), "entry", "entries"),
                queried - started,
                plural(len(result.uploaded), "path"),
                time.monotonic() - queried,
            )
        if guard is not None and result.ok:
            try:
                await asyncio.to_thread(guard.complete)
            except UploaderError as e:
                log.warning("completing this batch's root in the cache: %s", e)
        result.present = sorted(present.union(result.present))
        self._batch_failures, self._batch_limit = 0, None  # the cache and Nix answered
        self._settle(ready, infos, result)
        if self.settings.upload_logs and result.uploaded:
            await asyncio.to_thread(self._upload_logs, entries, ready, set(result.uploaded))

    async def _compare_rebuilt(self, outputs: list[str]) -> None:
        """In attest mode, outputs attested already were built again (after
        a garbage collection, or with --check): say so when the result
        differs from the attestation, which stays."""
        assert self.engine.recorder is not None
        try:
            infos = await asyncio.to_thread(self.store.path_infos, outputs, checked=True)
            await asyncio.to_thread(self.engine.recorder.rebuilt_differently, list(infos.values()))
        except UploaderError as e:
            log.warning("comparing rebuilt outputs with their attestations: %s", e)

    async def _find_present(
        self, ready: dict[str, list[str]], all_outputs: list[str]
    ) -> set[str] | None:
        """Those of the outputs the cache holds; None when the batch failed."""
        guard = self.engine.guard
        self._root_missing(ready, self.engine.known_present(all_outputs))
        try:
            # The batch's root in the cache, before anything is taken as there
            # (it also forgets what gc deleted: memory is asked again after).
            if guard is not None:
                await asyncio.to_thread(guard.begin, all_outputs)
            present = await self.engine.confirm_present(self.engine.known_present(all_outputs))
        except UploaderError as e:
            self._batch_failed(list(ready), e)
            return None
        self._answered.update(present)
        self._root_missing(ready, present)
        unknown = [p for p in all_outputs if p not in present]
        try:
            present |= await self.engine.find_present(unknown)
        except UploaderError as e:
            self._batch_failed(list(ready), e)
            return None
        self._answered.update(present)
        if unknown:
            self._cache_up()  # it answered
        return present

    async def _rooted(self) -> None:
        """Wait for the batch's GC roots being made."""
        rooting, self._rooting = self._rooting, []
        await self._settled_roots(rooting)

    async def _roots_asked_made(self, reading: list[str]) -> None:
        """Wait for every root asked for so far (those of entries that arrived
        during the batch before too): the roots' thread does them in order.
        The outputs about to be read get the roots skipped because the cache
        was found to hold them: their entries still count them, so nothing
        else would make them."""
        roots = self.roots
        if roots is None:
            return

        def made() -> None:
            if lacking := sorted(self._skipped.intersection(reading)):
                self._skipped.difference_update(lacking)
                roots.add(lacking)

        await asyncio.wrap_future(self._roots_thread.submit(made))

    @staticmethod
    async def _settled_roots(rooting: list[asyncio.Future[None]]) -> None:
        for outcome in await asyncio.gather(*rooting, return_exceptions=True):
            if isinstance(outcome, BaseException):
                log.warning("making GC roots: %r", outcome)

    def _upload_logs(
        self, entries: list[Entry], ready: dict[str, list[str]], uploaded: set[str]
    ) -> None:
        """The build logs of the entries this batch uploaded outputs of.  A
        log is an extra: failing to publish it is said, and costs no entry."""
        for entry in entries:
            if entry.drv is None or not uploaded.intersection(ready.get(entry.name, ())):
                continue
            text = read_build_log(entry.drv)
            if text is None:
                log.debug("%s: no build log to upload", entry.drv)
                continue
            try:
                self.engine.target.put_bytes(log_key(entry.drv), text, LOG_TYPE)
            except TargetError as e:
                log.warning("%s: build log not uploaded: %s", entry.drv, e)
                continue
            log.info("uploaded the build log of %s", entry.drv)

    def _resolve_outputs(
        self, entries: list[Entry]
    ) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
        """Each entry's outputs that are valid in the store, and the entries
        that have none, with why (quarantined by the caller, on the loop:
        this runs in a thread, and the daemon's state is the loop's).
        Outputs that vanished are dropped with a warning.  One validity
        check covers the derivations and all their outputs."""
        drvs = sorted({e.drv for e in entries if not e.outputs and e.drv})
        from_drv = self.store.read_derivation_outputs(drvs)
        unread = [d for d in drvs if d not in from_drv]
        named_outputs = {p for e in entries for p in e.outputs}
        read_outputs = {p for outs in from_drv.values() for p in outs}
        invalid = self.store.invalid_paths([*drvs, *named_outputs, *read_outputs])
        if any(d not in invalid for d in unread):
            # Rare: a .drv this process could not read or parse; Nix can.
            asked = self.store.derivation_outputs([d for d in unread if d not in invalid])
            from_drv.update(asked)
            invalid |= self.store.invalid_paths(p for outs in asked.values() for p in outs)
        named: dict[str, list[str]] = {}
        unusable: list[tuple[str, str]] = []
        for e in entries:
            if e.outputs:
                named[e.name] = list(e.outputs)
            elif e.drv is None or e.drv in invalid:
                unusable.append((
                    e.name,
                    f"derivation {e.drv} is not valid in the store and the entry names no "
                    "outputs (garbage-collected before upload?)",
                ))  # fmt: skip
            else:
                named[e.name] = from_drv.get(e.drv, [])
        result: dict[str, list[str]] = {}
        for name, outs in named.items():
            valid = [p for p in outs if p not in invalid]
            gone = [p for p in outs if p in invalid]
            if not valid:
                unusable.append((
                    name,
                    f"{', '.join(gone) or 'no output'} not valid in the local Nix store: "
                    "never built here, or garbage-collected before it could be uploaded",
                ))  # fmt: skip
                continue
            for p in gone:
                log.warning("%s: dropping %s: it is no longer valid in the store", name, p)
            result[name] = valid
        return result, unusable

    def _settle(
        self, ready: dict[str, list[str]], infos: dict[str, PathInfo], result: PushResult
    ) -> None:
        """Acknowledge, quarantine or reschedule each entry after a push."""
        # Entries to retry, each with its own error; one line for them all.
        retries: dict[str, str] = {}
        retry_after = 0.0
        for path, error in result.failed.items():
            self._count_failure(_kind(error))
            if not isinstance(error, DependencyFailed):
                self._note_error(path, error)
        served_upstream = set(result.skipped_upstream)
        for name, outputs in ready.items():
            failed = _failures_in_closure(outputs, infos, result.failed) if result.failed else []
            if not failed:
                try:
                    self.spool.ack(name)
                except OSError as e:
                    # Uploaded, but it stays to be read again: retried with
                    # backoff (the cache has it by now), not an internal error.
                    retries[name] = (
                        f"uploaded, but the entry cannot be removed from the spool "
                        f"({e.strerror or e}): the spool must be writable by this user "
                        f"(see `lsattr -d {self.spool.path}` and its owner and mode)"
                    )
                    continue
                self._pending.pop(name, None)
                self._unroot(name)
                upstream = len(served_upstream.intersection(outputs))
                where = "in the cache"
                if upstream == len(outputs):
                    where = "served upstream"
                elif upstream:
                    where = f"in the cache ({upstream} served upstream)"
                if self.engine.recorder is not None:
                    where = _attested(outputs, result)
                log.info("%s: %s %s", name, plural(len(outputs), "output"), where)
                continue
            root_causes = [_root_cause(e) for e in failed]
            # A NAR that cannot be read (a path the database lists but the
            # disk lacks, a fifo) stays unreadable: retrying cannot help.
            permanent = [
                e
                for e in root_causes
                if isinstance(e, VerificationError | InvalidPathError | NarError)
            ]
            if permanent:
                self._quarantine(name, str(permanent[0]))
            else:
                retries[name] = str(root_causes[0])
                for cause in root_causes:
                    if isinstance(cause, TransientTargetError) and cause.retry_after:
                        retry_after = max(retry_after, cause.retry_after)
        if retries:
            first = next(iter(retries.values()))
            self._retry_later(list(retries), first, retry_after=retry_after, errors=retries)

    # -- bookkeeping ---------------------------------------------------

    def _count_upload(self, info: PathInfo, seconds: float, file_size: int) -> None:
        self._uploaded_paths += 1
        self._uploaded_bytes += file_size
        if self.metrics is not None:
            self.metrics.uploaded(seconds, info.nar_size, file_size)

    def _maybe_still_written(self, name: str) -> bool:
        """Whether a malformed entry is so fresh that a writer that does not
        rename (a person, a script) may not have finished it yet."""
        try:
            age = time.time() - os.lstat(os.path.join(self.spool.path, name)).st_mtime
        except OSError:
            return False
        return age < _SETTLE and name in self._pending

    def _root_missing(self, ready: dict[str, list[str]], present: set[str]) -> None:
        """Root the entries not rooted yet that have outputs not in ``present``."""
        held = self._entry_roots
        missing = {
            n: outs
            for n, outs in ready.items()
            if any(p not in present and p not in held.get(n, ()) for p in outs)
        }
        if missing and (rooting := self._root(missing, present)) is not None:
            self._rooting.append(rooting)

    def _root(
        self, outputs: dict[str, list[str]], present: set[str]
    ) -> asyncio.Future[None] | None:
        """Make the outputs of these entries that the cache lacks GC roots
        until the entries are done; the symlinks being made, if any."""
        if self.roots is None:
            return None
        new: set[str] = set()
        for name, outs in outputs.items():
            # Those it has (rooted on arrival, or kept at a restart) and more.
            held = self._entry_roots.setdefault(name, [])
            needed = [p for p in outs if p not in present and p not in held]
            held.extend(needed)
            new.update(p for p in needed if not self._root_refs[p])
            self._root_refs.update(needed)
        if not new:
            return None
        # A symlink each: a second for thousands on a busy disk.  Paths the
        # cache is found to hold meanwhile are skipped (nothing else may
        # happen to the batch before it is done).
        answered = self._answered

        def skip(path: str) -> bool:  # on the roots' thread
            if path in answered:
                self._skipped.add(path)
                return True
            return False

        add = functools.partial(self.roots.add, sorted(new), skip=skip)
        return asyncio.wrap_future(self._roots_thread.submit(add))

    def _unroot(self, name: str) -> None:
        """Drop the roots of a finished entry that no other entry needs."""
        outs = self._entry_roots.pop(name, [])
        self._root_refs.subtract(outs)
        unused = [p for p in outs if self._root_refs[p] <= 0]
        for p in unused:
            del self._root_refs[p]
        self._skipped.difference_update(unused)
        if self.roots is not None and unused:
            self._roots_thread.submit(self.roots.remove, unused)

    async def _keep_roots_only(self) -> int:
        """Drop the roots no waiting entry needs (left by a crash, or by
        entries removed by hand); how many.  The outputs of an entry that
        names only its .drv, as Nix 2.8's hook writes it, are read from the
        .drv: they may have been rooted before the restart.  The roots kept
        become the entries' own, removed as each entry is done (also when
        the cache turns out to hold its outputs already)."""
        roots = self.roots
        assert roots is not None
        names = list(self._pending)

        def keep() -> tuple[int, dict[str, list[str]]]:
            outputs = self._entry_outputs(names)
            dropped, kept = roots.keep_only(p for outs in outputs.values() for p in outs)
            return dropped, {n: [p for p in outs if p in kept] for n, outs in outputs.items()}

        dropped, rooted = await asyncio.wrap_future(self._roots_thread.submit(keep))
        for name, outs in rooted.items():
            if outs and name in self._pending and name not in self._entry_roots:
                self._entry_roots[name] = outs
                self._root_refs.update(outs)
        return dropped

    def _quarantine(self, name: str, reason: str) -> None:
        log.warning("quarantined spool entry %s: %s", name, reason)
        try:
            unwritten = self.spool.quarantine(name, reason)
        except OSError as e:
            log.error("cannot quarantine %s (%s); it will be retried", name, e)
            self._retry_later([name], reason)
            return
        if unwritten is not None:
            self._unwritten_reasons[name] = unwritten  # written once there is room
        self._pending.pop(name, None)
        self._unroot(name)
        self._count_failure("quarantined")
        self._note_error(name, reason)
        self._dirty = True

    def _retry_later(
        self,
        names: Iterable[str],
        error: str,
        *,
        retry_after: float = 0.0,
        delay: float | None = None,
        errors: Mapping[str, str] | None = None,
    ) -> None:
        """Each entry again after its own backoff (at least ``retry_after``),
        or after ``delay`` for all of them; ``error`` is why, or ``errors``
        each one's."""
        now = time.monotonic()
        delays = []
        # One jitter for the entries that failed together: they stay one
        # batch when retried (one attempt, one line), not one each.
        jitter = random.uniform(0.5, 1.0)
        for name in names:
            p = self._pending.setdefault(name, _Pending(name))
            p.attempts += 1
            if delay is None:
                wait = min(self.settings.retry_max, self.settings.retry_min * 2 ** (p.attempts - 1))
                wait = max(wait * jitter, retry_after)
            else:
                wait = delay
            p.next_try = now + wait
            p.last_error = error if errors is None else errors[name]
            delays.append(wait)
            log.debug("%s: attempt %d failed, retrying in %.0fs", name, p.attempts, wait)
        # One warning per failure, however many entries it holds back.
        if len(delays) == 1:
            log.warning(
                "%s: attempt %d failed, retrying in %.0fs: %s",
                name, p.attempts, wait, p.last_error,
            )  # fmt: skip
        elif delays:
            low, high = f"{min(delays):.0f}s", f"{max(delays):.0f}s"
            when = low if low == high else f"{low} to {high}"
            others = len(set(errors.values()) - {error}) if errors else 0
            if others:
                more = plural(others, "other error")
                error = f"{error} (and {more}: `nix-cache-uploader status` lists them)"
            log.warning("%d entries failed, retrying in %s: %s", len(delays), when, error)
        self._note_error(None, error)
        self._dirty = True

    def _count_failure(self, kind: str) -> None:
        self._failures[kind] += 1
        if self.metrics is not None:
            self.metrics.failures.labels(kind).inc()

    def _oldest_age(self) -> float | None:
        queued_at = self._queued_at()
        return time.time() - min(queued_at.values()) if queued_at else None

    def _queued_at(self) -> dict[str, float]:
        """When each waiting entry was written (its file's time), as far as
        the spool still has it."""
        mtimes = {}
        for name in list(self._pending):
            with contextlib.suppress(OSError):
                mtimes[name] = os.lstat(os.path.join(self.spool.path, name)).st_mtime
        return mtimes

    def _note_error(self, subject: str | None, error: object) -> None:
        self._last_errors.append({"time": time.time(), "subject": subject, "error": str(error)})

    # -- status --------------------------------------------------------

    async def _status_loop(self) -> None:
        written = 0.0
        while True:
            if self._dirty or time.monotonic() - written >= _HEARTBEAT_EVERY:
                self._dirty = False
                written = time.monotonic()
                try:
                    await asyncio.to_thread(self._write_status, running=True)
                    if self._unwritten_reasons:
                        await asyncio.to_thread(self._write_reasons)
                except Exception:
                    # A failed tick must not end the heartbeat: `status`
                    # would call a working daemon "not responding".
                    log.exception("internal error writing the status; trying again")
            await asyncio.sleep(_STATUS_EVERY)

    def _write_reasons(self) -> None:
        for name, line in list(self._unwritten_reasons.items()):
            try:
                recorded = self.spool.record_reason(name, line)
            except OSError:
                return  # still no room; the next status tries again
            del self._unwritten_reasons[name]
            if recorded:
                log.info("%s: its quarantine reason is recorded now", name)

    def _uploading(self) -> int:
        """Entries of the running batch still in the spool (an entry acked or
        quarantined before its batch ends is no longer in flight)."""
        return len(self._in_flight & self._pending.keys())

    def status(self, *, running: bool) -> dict[str, Any]:
        now_wall = time.time()
        now = time.monotonic()
        queued_at = self._queued_at()
        oldest = now_wall - min(queued_at.values()) if queued_at else None
        # Written from a thread while the loop changes the queue: iterated
        # over a copy (taken at once, under the GIL), never the dict itself.
        retrying = [p for p in list(self._pending.values()) if p.attempts]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "running": running,
            "started_at": self._started,
            "updated_at": now_wall,
            "target": str(self.engine.target.url),
            "spool": self.spool.path,
            "pending": len(self._pending),
            "in_flight": self._uploading(),
            "oldest_pending_age": oldest,
            "retrying": [
                {
                    "entry": p.name,
                    "attempts": p.attempts,
                    "next_try_in": max(0.0, self._next_try(p) - now),
                    "error": p.last_error,
                }
                # The oldest first: the builds held back longest.
                for p in heapq.nsmallest(
                    RETRYING_LISTED,
                    retrying,
                    key=lambda p: (queued_at.get(p.name, now_wall), p.name),
                )
            ],
            "retrying_count": len(retrying),
            # Attest mode: paths are staged and attested, not in the cache yet.
            "attest": self.engine.recorder is not None,
            "uploaded_paths": self._uploaded_paths,
            "uploaded_bytes": self._uploaded_bytes,
            "failures": dict(self._failures),
            "last_errors": list(self._last_errors),
            "cache_problem": self._cache_problem,
            **spool_snapshot(self.spool.path, lambda: len(self.spool.pending())),
        }

    def _write_status(self, *, running: bool) -> None:
        try:
            status = self.status(running=running)
            # A snapshot too close to the spool's last change is one a CI
            # user's `wait` cannot trust: another follows on the next tick.
            if running and not snapshot_settled(status):
                self._dirty = True
            write_status(self.settings.state_dir, status)
        except OSError as e:
            # The file's time still says the daemon is alive (see `status`).
            with contextlib.suppress(OSError):
                touch_status(self.settings.state_dir)
            # Said once until it works again: a full disk stays full a while.
            if not self._status_failing:
                log.error(
                    "cannot write status to %s: %s; `status` and `wait` show what was "
                    "last written until it can",
                    self.settings.state_dir, e,
                )  # fmt: skip
            self._status_failing = True
            return
        if self._status_failing:
            self._status_failing = False
            log.warning("status written again to %s", self.settings.state_dir)


def _kind(error: UploaderError) -> str:
    return type(_root_cause(error)).__name__


def _root_cause(error: UploaderError) -> UploaderError:
    while isinstance(error, DependencyFailed):
        error = error.cause
    return error


def _failures_in_closure(
    outputs: list[str], infos: dict[str, PathInfo], failed: dict[str, UploaderError]
) -> list[UploaderError]:
    """The failures among the closure of ``outputs``."""
    seen: set[str] = set()
    stack = list(outputs)
    found = []
    while stack:
        path = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        if path in failed:
            found.append(failed[path])
        if path in infos:
            stack.extend(infos[path].references)
    return found


def _attested(outputs: list[str], result: PushResult) -> str:
    """What attest mode did for an entry's outputs, for its log line."""
    if not set(outputs).isdisjoint(result.uploaded):
        return "staged and attested"
    if set(outputs).issubset(result.present):
        return "attested before"
    return "not attested here (published already, served upstream, or built elsewhere)"
