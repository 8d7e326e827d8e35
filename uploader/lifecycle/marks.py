"""Run records (``lifecycle/v1/runs/TIME-RANDOM.json``), the newest of which
is the mark.

`gc --delete` writes one before it deletes anything (its candidates: the
narinfos it found unreachable, and the NARs no narinfo names) and completes
it at the end with what it deleted.  Uploaders read the mark for every
decision that a path is already in the cache; the daemon also reads each
completed record once to forget what it remembered of deleted paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uploader.lifecycle.layout import RUNS, LayoutError, decode, key_time, listing
from uploader.targets import Target

__all__ = ["MARKED", "Marks", "RunRecord", "read_run", "run_keys"]

MARKED = "marked"  # written before deleting; "complete" once done
COMPLETE = "complete"


@dataclass(frozen=True)
class RunRecord:
    key: str
    time: float
    state: str
    candidates: frozenset[str]  # hash parts of narinfos found unreachable
    deleted: frozenset[str]  # hash parts of the narinfos it deleted
    # NAR key -> since when no narinfo names it
    unreferenced_nars: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE


def run_keys(target: Target) -> list[str]:
    """Every run record's key, oldest first (one LIST per 1000)."""
    return sorted(key for key, _ in listing(target, RUNS) if key_time(key) is not None)


def read_run(target: Target, key: str) -> RunRecord | None:
    data = target.get(key)
    if data is None:
        return None
    r = decode(data, key)
    try:
        return RunRecord(
            key,
            float(r["time"]),
            str(r["state"]),
            frozenset(str(h) for h in r["candidates"]),
            frozenset(str(h) for h in r.get("deleted", ())),
            {str(k): float(v) for k, v in r.get("unreferenced_nars", {}).items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LayoutError(f"{key}: unreadable run record ({e!r})") from e


class Marks:
    """An uploader's view of the run records, kept up to date cheaply: one
    LIST of ``runs/`` per refresh; a record is read again only while it is
    new or not yet complete (its gc still runs)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.mark: RunRecord | None = None
        self._settled: set[str] = set()  # complete records already read

    def refresh(self) -> set[str]:
        """Read the newest record; returns the hash parts that records not
        seen complete before say were deleted (to be forgotten)."""
        keys = run_keys(self.target)
        if not keys:
            self.mark = None
            return set()
        newest = self.mark if self.mark is not None and self.mark.key == keys[-1] else None
        if newest is not None and not newest.complete:
            newest = None  # its gc still runs: read it again
        deleted: set[str] = set()
        for key in keys:
            if key == keys[-1] and newest is not None:
                continue
            if key in self._settled and key != keys[-1]:
                continue
            record = read_run(self.target, key)
            if record is None:
                continue  # pruned by a gc meanwhile
            if record.complete and key not in self._settled:
                deleted |= record.deleted
                self._settled.add(key)
            if key == keys[-1]:
                newest = record
        # Records pruned by gc are not listed again: forget their keys.
        self._settled &= set(keys)
        self.mark = newest
        return deleted

    def candidate(self, hash_part: str) -> bool:
        return self.mark is not None and hash_part in self.mark.candidates

    def unreferenced_nar(self, key: str) -> bool:
        return self.mark is not None and key in self.mark.unreferenced_nars
