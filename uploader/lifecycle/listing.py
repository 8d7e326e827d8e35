"""Walking a binary cache: which narinfos and NARs it holds, and what each
narinfo says, kept small enough for hundreds of thousands of paths.

Listing costs a request per 1000 keys; the narinfos are then fetched many at
a time (one GET each, the only way to read them).  What is kept of each
narinfo is a :class:`PathRecord`, not its text: store path names are
interned, so a path referenced by thousands of others is held once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from uploader.narinfo import NarInfo
from uploader.nixbase32 import ALPHABET
from uploader.storepath import HASH_LENGTH, basename
from uploader.targets import Target

__all__ = [
    "NAR_PREFIX",
    "PathRecord",
    "fetch_narinfos",
    "list_narinfos",
    "list_nars",
    "narinfo_key",
    "to_record",
    "walk",
]

NAR_PREFIX = "nar/"
_NARINFO = ".narinfo"
# Requests in flight per worker thread: enough to keep them busy, few
# enough that unread answers never pile up in memory.
_AHEAD = 4


def narinfo_key(hash_part: str) -> str:
    return hash_part + _NARINFO


@dataclass(slots=True)
class PathRecord:
    """What one narinfo says, without its text.  ``name`` and ``references``
    are store path basenames (``<hash>-<name>``)."""

    name: str
    url: str
    compression: str
    file_hash: str | None
    file_size: int | None
    nar_hash: str
    nar_size: int
    references: tuple[str, ...]


def to_record(info: NarInfo) -> PathRecord:
    return PathRecord(
        name=sys.intern(basename(info.store_path)),
        url=info.url,
        compression=sys.intern(info.compression),
        file_hash=info.file_hash,
        file_size=info.file_size,
        nar_hash=info.nar_hash,
        nar_size=info.nar_size,
        references=tuple(sys.intern(r) for r in info.references),
    )


def walk(target: Target, prefix: str) -> Iterator[tuple[str, int, float]]:
    """Every object directly under ``prefix``: ``(key, size, last modified)``."""
    start = ""
    while True:
        page = target.list_objects(prefix, start)
        yield from page.objects
        if page.last is None:
            return
        start = page.last


def _is_hash(s: str) -> bool:
    return len(s) == HASH_LENGTH and all(c in ALPHABET for c in s)


def list_narinfos(target: Target) -> set[str]:
    """The hash parts of every ``<hash>.narinfo`` at the top of the cache."""
    found: set[str] = set()
    for key, _, _ in walk(target, ""):
        hash_part = key.removesuffix(_NARINFO)
        if key.endswith(_NARINFO) and _is_hash(hash_part):
            found.add(sys.intern(hash_part))
    return found


def list_nars(target: Target) -> dict[str, int]:
    """Every object under ``nar/``, with its size in bytes."""
    return {key: size for key, size, _ in walk(target, NAR_PREFIX)}


def fetch_narinfos(
    target: Target, hash_parts: Iterable[str], *, jobs: int
) -> Iterator[tuple[str, bytes | None]]:
    """``(hash part, narinfo bytes or None when it is gone)`` for each hash
    part, in the order the answers arrive, ``jobs`` GETs at a time.  A
    failed request (after the target's own retries) raises its TargetError."""
    todo = iter(hash_parts)
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="narinfo") as pool:
        pending: dict[Future[bytes | None], str] = {}

        def fill() -> None:
            for hash_part in todo:
                pending[pool.submit(target.get, narinfo_key(hash_part))] = hash_part
                if len(pending) >= jobs * _AHEAD:
                    return

        fill()
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    hash_part = pending.pop(future)
                    yield hash_part, future.result()
                fill()
        finally:
            for future in pending:
                future.cancel()
