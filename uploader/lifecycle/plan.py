"""gc's decisions, computed from what it read; no requests here.

Live: the closure (through the narinfos' references) of the pins, the kept
roots, the narinfos younger than the grace period and the damaged ones.
Candidates: the narinfos that are not live.  A narinfo is deleted when it is
a candidate now and in the previous mark, was last written before that
mark, and nothing that stays references it: the closure of every narinfo
that stays is kept, whatever keeps it.  While a narinfo cannot be read
(its references are unknown), nothing is deleted.  A NAR is deleted when no narinfo
names it, the previous mark already said so, it has been unreferenced for
``nar_delay`` and was last written longer ago than that.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from uploader.lifecycle.marks import RunRecord
from uploader.lifecycle.survey import Bucket, Policy

__all__ = ["Plan", "closure", "plan", "unreferenced_nars"]


def closure(bucket: Bucket, seeds: Iterable[str]) -> set[str]:
    """The hash parts reachable from ``seeds`` among the bucket's narinfos."""
    found: set[str] = set()
    todo = [h for h in seeds if h in bucket.narinfos]
    while todo:
        h = todo.pop()
        if h in found:
            continue
        found.add(h)
        todo.extend(r for r in bucket.narinfos[h].refs if r in bucket.narinfos and r not in found)
    return found


@dataclass
class Plan:
    live: set[str]
    candidates: set[str]
    narinfos: list[str]  # hash parts to delete
    nars: list[str]  # NAR keys to delete
    listings: list[str]  # .ls keys to delete
    logs: list[str]  # log keys to delete
    unreferenced: dict[str, float]  # NAR key -> since, after this run
    damaged: set[str] = field(default_factory=set)
    unreadable: bool = False  # then nothing is deleted

    def freed(self, bucket: Bucket) -> tuple[int, int]:
        """Objects and bytes deleted (each NAR once)."""
        sizes = [bucket.narinfos[h].size for h in self.narinfos]
        sizes += [bucket.nars[k][0] for k in self.nars]
        sizes += [bucket.listings[k.removesuffix(".ls")] for k in self.listings]
        sizes += [bucket.logs[k] for k in self.logs]
        return len(sizes), sum(max(0, s) for s in sizes)


def live_set(bucket: Bucket, seeds: set[str], policy: Policy, now: float) -> set[str]:
    young = {h for h, e in bucket.narinfos.items() if e.mtime >= now - policy.grace}
    return closure(bucket, seeds | young | bucket.damaged())


def unreferenced_nars(
    bucket: Bucket, gone: set[str], before: RunRecord | None, now: float
) -> dict[str, float]:
    """NARs that no narinfo but those in ``gone`` names, since when."""
    named = {e.url for h, e in bucket.narinfos.items() if h not in gone}
    since = before.unreferenced_nars if before is not None else {}
    return {k: since.get(k, now) for k in bucket.nars if k not in named}


def plan(
    bucket: Bucket,
    live: set[str],
    policy: Policy,
    previous: RunRecord | None,
    now: float,
    *,
    marked: dict[str, float] | None = None,
) -> Plan:
    """What to delete, given the live set and the previous mark.  ``marked``
    is the unreferenced NARs this run's own record said (None: a dry run,
    which writes none)."""
    candidates = set(bucket.narinfos) - live
    # An unreadable narinfo's references are unknown: anything may be one.
    unreadable = any(e.url is None for e in bucket.narinfos.values())
    doomed: set[str] = set()
    if previous is not None and not unreadable:
        doomed = {
            h for h in candidates & previous.candidates if bucket.narinfos[h].mtime < previous.time
        }
        doomed -= closure(bucket, set(bucket.narinfos) - doomed)
    unreferenced = unreferenced_nars(bucket, doomed, previous, now)
    nars: list[str] = []
    if previous is not None and not unreadable:
        now_marked = marked if marked is not None else unreferenced
        nars = sorted(
            k
            for k, since in unreferenced.items()
            if k in previous.unreferenced_nars
            and k in now_marked
            and since <= now - policy.nar_delay
            and bucket.nars[k][1] < now - policy.nar_delay
        )
    for k in nars:
        del unreferenced[k]
    kept_derivers = {e.deriver for h, e in bucket.narinfos.items() if h not in doomed and e.deriver}
    logs = {
        f"log/{e.deriver}"
        for h in doomed
        if (e := bucket.narinfos[h]).deriver and e.deriver not in kept_derivers
    }
    return Plan(
        live=live,
        candidates=candidates,
        narinfos=sorted(doomed),
        nars=nars,
        listings=sorted(f"{h}.ls" for h in doomed if h in bucket.listings),
        logs=sorted(k for k in logs if k in bucket.logs),
        unreferenced=unreferenced,
        damaged=bucket.damaged(),
        unreadable=unreadable,
    )
