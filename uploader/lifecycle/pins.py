"""`pin add`: a pin keeps the closure of its paths, so that closure must be
in the cache when the pin is written.

The pin is written first and the closure checked after, through the
narinfos' references, like an uploader that writes its root before it takes
anything as there: a gc running meanwhile either sees the pin or has marked
what it would delete, and marked paths are asked again once it finished.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from uploader._exceptions import UploaderError
from uploader.lifecycle.listing import fetch_narinfos
from uploader.lifecycle.protect import Protection
from uploader.lifecycle.roots import restore_pin, write_pin
from uploader.narinfo import NarInfo
from uploader.storepath import HASH_LENGTH, STORE_DIR, hash_part
from uploader.targets import Target

__all__ = ["PinAdded", "PinRefused", "add_pin"]


class PinRefused(UploaderError):
    """Part of the pin's closure is not in the cache."""


class PinAdded(NamedTuple):
    """A pin written: how many paths of its closure this cache keeps, and
    how many it leaves to an upstream cache that serves them."""

    cached: int
    upstream: int


def add_pin(
    target: Target,
    name: str,
    paths: Iterable[str],
    *,
    jobs: int = 32,
    upstream: Callable[[list[str]], set[str]] | None = None,
) -> PinAdded:
    """Write the pin; returns the size of its closure.  Raises PinRefused
    (the pin left as it was) when a path of the closure is not in the cache,
    nor, given ``upstream`` (store path basenames -> those an upstream cache
    serves), in an upstream cache."""
    paths = sorted(set(paths))
    before = write_pin(target, name, paths)
    try:
        guard = Protection(target)
        guard.marks.refresh()
        found, missing = _closure(target, paths, jobs)
        elsewhere = 0
        if missing and upstream is not None:
            # Served elsewhere, as `run --upstream` leaves them: not this
            # cache's to keep, so not followed further either.
            served = upstream(sorted(p.removeprefix(f"{STORE_DIR}/") for p in missing))
            elsewhere = len(missing)
            missing = {p for p in missing if p.removeprefix(f"{STORE_DIR}/") not in served}
            elsewhere -= len(missing)
        missing |= guard.gone(sorted(found))
    except UploaderError as e:
        _restore(target, name, before, e)
        raise
    except BaseException:
        restore_pin(target, name, before)
        raise
    if missing:
        _restore(target, name, before, None)
        shown = sorted(missing)
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        raise PinRefused(
            f"pin {name!r} not written: its closure is not all in the cache; missing "
            f"{', '.join(shown[:5])}{more} (push them first"
            f"{'' if upstream else ', or give the --upstream cache that serves them'})"
        )
    return PinAdded(len(found), elsewhere)


def _restore(target: Target, name: str, before: bytes | None, why: UploaderError | None) -> None:
    """Put the pin back as it was; if that fails, say so with what went
    wrong first (the pin written keeps its closure until removed)."""
    try:
        restore_pin(target, name, before)
    except UploaderError as e:
        first = (
            f"its closure could not be checked: {why}"
            if why is not None
            else "its closure is not all in the cache"
        )
        raise UploaderError(
            f"pin {name!r} was written, but {first}; undoing it failed too ({e}): "
            f"remove it with `pin rm {name}` once that works"
        ) from e


def _closure(target: Target, paths: list[str], jobs: int) -> tuple[set[str], set[str]]:
    """The closure of ``paths`` in the cache (store paths), and the paths
    of it that have no narinfo there."""
    by_hash = {hash_part(p): p for p in paths}
    found: set[str] = set()
    missing: set[str] = set()
    frontier = sorted(by_hash)
    seen = set(frontier)
    while frontier:
        nxt: list[str] = []
        for h, data in fetch_narinfos(target, frontier, jobs=jobs):
            if data is None:
                missing.add(by_hash[h])
                continue
            try:
                info = NarInfo.parse(data.decode())
            except (ValueError, UnicodeDecodeError):
                missing.add(by_hash[h])  # unreadable: of no use to a client
                continue
            found.add(info.store_path)
            for ref in info.references:
                r = ref[:HASH_LENGTH]
                if r not in seen:
                    seen.add(r)
                    by_hash[r] = f"{STORE_DIR}/{ref}"
                    nxt.append(r)
        frontier = sorted(nxt)
    return found, missing
