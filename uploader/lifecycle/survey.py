"""What gc needs to know of a bucket: every narinfo (what it references and
names, when it was last written), every NAR, listing and build log, and the
roots and pins with the paths they keep.

Narinfos are listed before NARs, as in verify: an upload running meanwhile
(NAR first, narinfo last) never makes a narinfo look damaged.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from uploader.lifecycle.layout import PINS, listing
from uploader.lifecycle.listing import NAR_PREFIX, fetch_narinfos, narinfo_key, walk
from uploader.lifecycle.roots import (
    COMPLETE,
    IN_PROGRESS,
    Pin,
    RootRef,
    list_roots,
    read_pin,
    read_root,
)
from uploader.lifecycle.verify import Progress
from uploader.narinfo import NarInfo
from uploader.storepath import HASH_LENGTH, STORE_DIR
from uploader.targets import Target

__all__ = ["Bucket", "Entry", "Policy", "Seeds", "changed_seeds", "read_seeds", "survey"]

LOG_PREFIX = "log/"
_LS = ".ls"
_DAY = 86400.0


@dataclass(slots=True)
class Entry:
    """One narinfo: ``refs`` are hash parts, ``deriver`` a basename.
    ``url`` is None when it could not be read (it is kept, with everything
    it might name)."""

    name: str
    size: int
    mtime: float
    url: str | None = None
    refs: tuple[str, ...] = ()
    deriver: str | None = None


@dataclass
class Bucket:
    narinfos: dict[str, Entry] = field(default_factory=dict)
    nars: dict[str, tuple[int, float]] = field(default_factory=dict)  # key -> size, mtime
    listings: dict[str, int] = field(default_factory=dict)  # hash part -> size of its .ls
    logs: dict[str, int] = field(default_factory=dict)  # log/<drv basename> -> size

    def damaged(self) -> set[str]:
        """Narinfos that cannot be followed safely: unreadable, or whose NAR is missing."""
        return {h for h, e in self.narinfos.items() if e.url is None or e.url not in self.nars}


@dataclass(frozen=True)
class Policy:
    keep_days: float = 30
    keep_last: int = 1
    grace: float = _DAY
    nar_delay: float = 31 * _DAY


def survey(target: Target, jobs: int, progress: Progress | None = None) -> Bucket:
    bucket = Bucket()
    sizes: dict[str, tuple[int, float]] = {}
    for key, size, mtime in walk(target, ""):
        stem = key.removesuffix(".narinfo")
        if key.endswith(".narinfo") and len(stem) == HASH_LENGTH:
            sizes[sys.intern(stem)] = (size, mtime)
        elif key.endswith(_LS) and len(key) == HASH_LENGTH + len(_LS):
            bucket.listings[key[:HASH_LENGTH]] = size
    if progress:
        progress.start(len(sizes), 0)
    for hash_part, data in fetch_narinfos(target, sorted(sizes), jobs=jobs):
        if progress:
            progress.step(1, 0)
        if data is not None:  # else deleted since it was listed
            bucket.narinfos[hash_part] = _entry(hash_part, data, *sizes[hash_part])
    if progress:
        progress.finish()
    bucket.nars = {k: (size, mtime) for k, size, mtime in walk(target, NAR_PREFIX)}
    bucket.logs = {k: size for k, size, _ in walk(target, LOG_PREFIX)}
    return bucket


def _entry(hash_part: str, data: bytes, size: int, mtime: float) -> Entry:
    try:
        info = NarInfo.parse(data.decode())
        if not info.store_path.startswith(f"{STORE_DIR}/{hash_part}-"):
            raise ValueError("for another store path")
    except (ValueError, UnicodeDecodeError):
        return Entry(narinfo_key(hash_part), size, mtime)
    return Entry(
        sys.intern(info.store_path),
        size,
        mtime,
        info.url,
        tuple(sys.intern(r[:HASH_LENGTH]) for r in info.references),
        info.deriver,
    )


@dataclass
class Seeds:
    """What the roots and pins keep (hash parts), and the roots that lapsed."""

    paths: set[str] = field(default_factory=set)
    # Roots that cannot change any more: complete, or lapsed.
    settled: set[str] = field(default_factory=set)
    lapsed: list[RootRef] = field(default_factory=list)
    kept_roots: int = 0
    pins: int = 0


def read_seeds(target: Target, policy: Policy, now: float) -> Seeds:
    """Read the pins and the kept roots.  Kept: roots younger than
    keep_days, the newest keep_last complete ones of each name, and roots in
    progress for a day (an uploader that crashed leaves one behind)."""
    seeds = Seeds()
    for pin in _pins(target):
        seeds.pins += 1
        seeds.paths.update(p[:HASH_LENGTH] for p in pin.paths)
    by_name: dict[str, list[RootRef]] = {}
    for ref in list_roots(target):
        by_name.setdefault(ref.name, []).append(ref)
    young = now - max(policy.keep_days * _DAY, _DAY)
    for refs in by_name.values():
        complete = 0
        for ref in sorted(refs, key=lambda r: r.key, reverse=True):
            if ref.created < young and complete >= policy.keep_last:
                seeds.lapsed.append(ref)  # old, and enough newer complete ones
                seeds.settled.add(ref.key)
                continue
            root = read_root(target, ref.key)
            if root is None:
                continue
            counted = root.state == COMPLETE and complete < policy.keep_last
            complete += root.state == COMPLETE
            if root.state == COMPLETE:
                seeds.settled.add(ref.key)
            if (
                counted
                or root.created >= now - policy.keep_days * _DAY
                or (root.state == IN_PROGRESS and root.created >= now - _DAY)
            ):
                seeds.kept_roots += 1
                seeds.paths.update(p[:HASH_LENGTH] for p in root.paths)
            else:
                seeds.lapsed.append(ref)
                seeds.settled.add(ref.key)
    return seeds


def changed_seeds(target: Target, settled: set[str]) -> set[str]:
    """What the pins, and the roots written or grown since ``read_seeds``
    (every root not settled then), keep now: gc's second look."""
    paths: set[str] = set()
    for pin in _pins(target):
        paths.update(p[:HASH_LENGTH] for p in pin.paths)
    for ref in list_roots(target):
        root = None if ref.key in settled else read_root(target, ref.key)
        if root is not None:
            paths.update(p[:HASH_LENGTH] for p in root.paths)
    return paths


def _pins(target: Target) -> Iterator[Pin]:
    for key, _ in listing(target, PINS):
        pin = read_pin(target, key) if key.endswith(".json") else None
        if pin is not None:
            yield pin
