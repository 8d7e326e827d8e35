"""`gc`: delete what no pin, kept root or recent upload needs, beside
uploaders running anywhere (docs/lifecycle.md says why it is safe).

``--delete``, under the lock: read the previous mark; survey the bucket;
read the roots and pins; write this run's record (the new mark) before
deleting anything; look at the roots and pins again; delete narinfos (then
their listings and logs), then NARs unreferenced for long enough; complete
the record.  Without ``--delete`` it only reads, and plans against the
current mark.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from uploader.lifecycle.gclock import GcLock
from uploader.lifecycle.layout import JSON_TYPE, RUNS, check_layout, encode, key_time, timed_key
from uploader.lifecycle.listing import narinfo_key
from uploader.lifecycle.marks import COMPLETE, MARKED, RunRecord, read_run, run_keys
from uploader.lifecycle.plan import Plan, closure, live_set, plan, unreferenced_nars
from uploader.lifecycle.roots import RootRef
from uploader.lifecycle.survey import Bucket, Policy, Seeds, changed_seeds, read_seeds, survey
from uploader.lifecycle.verify import Progress
from uploader.progress import utc_time
from uploader.targets import Target

__all__ = ["GcResult", "OnDeleted", "collect", "reasons", "referrers_first"]

log = logging.getLogger(__name__)

# Run records are kept this long (and the newest two always): longer than
# the daemon remembers a path (7 days), so it always learns of a deletion.
RUNS_KEPT_FOR = 14 * 86400.0

# Told of each object as it is deleted: its key and why it went.
OnDeleted = Callable[[str, str], None]


@dataclass
class GcResult:
    bucket: Bucket
    seeds: Seeds
    plan: Plan
    previous: RunRecord | None
    deleting: bool
    record: str | None = None  # this run's record (with --delete)
    lapsed_roots: list[RootRef] = field(default_factory=list)
    pruned_runs: list[str] = field(default_factory=list)

    def freed(self) -> tuple[int, int]:
        """Objects and bytes the run deletes: the plan's, its lapsed roots and
        old run records (whose few bytes are not counted)."""
        objects, nbytes = self.plan.freed(self.bucket)
        return objects + len(self.lapsed_roots) + len(self.pruned_runs), nbytes


def reasons(result: GcResult) -> dict[str, str]:
    """Why each object the run deletes (or would) goes, by key, in the
    order they go: narinfos, listings, logs, NARs, roots, run records."""
    bucket, done = result.bucket, result.plan
    since = f"a candidate since {utc_time(result.previous.time)}" if result.previous else ""
    why: dict[str, str] = {}
    for h in done.narinfos:
        why[narinfo_key(h)] = f"{bucket.narinfos[h].name} unreachable, {since}"
    why.update(dict.fromkeys(done.listings, "the listing of a deleted narinfo"))
    why.update(dict.fromkeys(done.logs, "the build log of deleted narinfos only"))
    why.update(dict.fromkeys(done.nars, "no narinfo names it (for longer than --nar-delay)"))
    for r in result.lapsed_roots:
        why[r.key] = f"root {r.name!r} no longer kept"
    why.update(dict.fromkeys(result.pruned_runs, "the record of a gc run over 14 days old"))
    return why


def collect(
    target: Target,
    policy: Policy,
    *,
    delete: bool,
    jobs: int = 32,
    progress: Callable[[str], Progress] | None = None,
    lock: GcLock | None = None,
    deleted: dict[str, int] | None = None,
    on_deleted: OnDeleted | None = None,
) -> GcResult:
    """A gc run; with ``delete``, ``lock`` is taken and held throughout.
    ``deleted`` counts the objects deleted by kind as they go, and
    ``on_deleted`` is told of each (from the deleting threads, one at a
    time): what the caller can report of a run stopped part way."""
    check_layout(target, write=delete)
    if delete:
        lock = lock or GcLock(target)
        lock.acquire()
    try:
        counts = {} if deleted is None else deleted
        return _run(target, policy, delete, jobs, progress, lock, counts, on_deleted)
    finally:
        if lock is not None and delete:
            lock.release()


def _run(
    target: Target,
    policy: Policy,
    delete: bool,
    jobs: int,
    progress: Callable[[str], Progress] | None,
    lock: GcLock | None,
    deleted: dict[str, int],
    on_deleted: OnDeleted | None,
) -> GcResult:
    keys = run_keys(target)
    previous = read_run(target, keys[-1]) if keys else None
    bucket = survey(target, jobs, progress("narinfos") if progress else None)
    # With --delete, times are the server's (the lock knows its clock): they
    # are compared with LastModified, and written as the mark.
    clock = lock.now if lock is not None and delete else time.time
    now = clock()
    seeds = read_seeds(target, policy, now)
    live = live_set(bucket, seeds.paths, policy, now)
    if not delete:
        result = GcResult(bucket, seeds, plan(bucket, live, policy, previous, now), previous, False)
        if not result.plan.unreadable:
            result.lapsed_roots = seeds.lapsed
            result.pruned_runs = _old_runs(keys, now)
        return result
    # The new mark, before anything is deleted: uploaders from now on see
    # these candidates and wait for this run before relying on one.
    now = clock()
    marked = unreferenced_nars(bucket, set(), previous, now)
    candidates = set(bucket.narinfos) - live
    record = timed_key(RUNS, now)
    _write_record(target, record, now, MARKED, candidates, set(), marked)
    # Roots and pins written or grown while the bucket was read.
    live |= closure(bucket, changed_seeds(target, seeds.settled))
    result = GcResult(
        bucket, seeds, plan(bucket, live, policy, previous, now, marked=marked), previous, True
    )
    result.record = record
    assert lock is not None
    done = result.plan
    why = reasons(result)
    _delete = _Deleter(target, lock, jobs, deleted, on_deleted, why)
    # Referrers before what they reference: a run stopped part way leaves a
    # bucket whose every narinfo still has its closure.
    for level in referrers_first(bucket, done.narinfos):
        _delete([narinfo_key(h) for h in level], "narinfo")
    _delete(done.listings + done.logs + done.nars)
    _write_record(target, record, now, COMPLETE, candidates, set(done.narinfos), done.unreferenced)
    if done.unreadable:
        return result  # nothing at all is deleted (docs/lifecycle.md)
    result.lapsed_roots = seeds.lapsed
    result.pruned_runs = _old_runs(keys, now)
    why.update(reasons(result))
    _delete([r.key for r in seeds.lapsed])
    _delete(result.pruned_runs)
    return result


def _old_runs(keys: list[str], now: float) -> list[str]:
    """Run records to delete: older than RUNS_KEPT_FOR, except the newest
    (the next run's second-to-last mark, once this run has written its own)."""
    return [k for k in keys[:-1] if (key_time(k) or 0.0) < now - RUNS_KEPT_FOR]


def _write_record(
    target: Target,
    key: str,
    now: float,
    state: str,
    candidates: set[str],
    deleted: set[str],
    unreferenced: dict[str, float],
) -> None:
    record = {
        "time": now,
        "state": state,
        "candidates": sorted(candidates),
        "deleted": sorted(deleted),
        "unreferenced_nars": dict(sorted(unreferenced.items())),
    }
    target.put_bytes(key, encode(record), JSON_TYPE)


def referrers_first(bucket: Bucket, doomed: Iterable[str]) -> list[list[str]]:
    """``doomed`` (hash parts) in levels: each holds the paths all of whose
    doomed referrers are in earlier levels.  Deleted level by level, what
    remains is closed under references at every moment."""
    doomed = set(doomed)
    # Each doomed path's doomed references (a self-reference is no edge).
    refs = {
        h: {r for r in bucket.narinfos[h].refs if r in doomed and r != h}
        if h in bucket.narinfos
        else set()
        for h in doomed
    }
    referrers: dict[str, int] = dict.fromkeys(doomed, 0)
    for targets in refs.values():
        for ref in targets:
            referrers[ref] += 1
    levels: list[list[str]] = []
    ready = sorted(h for h, n in referrers.items() if n == 0)
    placed = 0
    while ready:
        levels.append(ready)
        placed += len(ready)
        nxt = []
        for h in ready:
            for ref in refs[h]:
                referrers[ref] -= 1
                if referrers[ref] == 0:
                    nxt.append(ref)
        ready = sorted(nxt)
    if placed < len(doomed):  # a cycle (no store paths make one): last, together
        levels.append(sorted(h for h, n in referrers.items() if n > 0))
    return levels


class _Deleter:
    """Deletes keys ``jobs`` at a time, each only while the lock is surely
    ours, counts what went by kind in ``counts``, and tells ``on_deleted``
    of each key with its reason from ``why``."""

    def __init__(
        self,
        target: Target,
        lock: GcLock,
        jobs: int,
        counts: dict[str, int],
        on_deleted: OnDeleted | None,
        why: dict[str, str],
    ) -> None:
        self._target, self._lock, self._jobs = target, lock, jobs
        self._counts, self._on_deleted, self._why = counts, on_deleted, why
        self._counting = threading.Lock()

    def __call__(self, keys: list[str], what: str = "other object") -> None:
        def one(key: str) -> None:
            self._lock.check()
            self._target.delete(key)
            with self._counting:
                self._counts[what] = self._counts.get(what, 0) + 1
                if self._on_deleted is not None:
                    self._on_deleted(key, self._why.get(key, ""))
            log.debug("deleted %s", key)

        pool = ThreadPoolExecutor(max_workers=self._jobs, thread_name_prefix="delete")
        try:
            list(pool.map(one, keys))
        finally:
            # Stopped (an error, Ctrl-C, SIGTERM): what has not begun is not
            # deleted; what is under way finishes and is reported.
            pool.shutdown(wait=True, cancel_futures=True)
