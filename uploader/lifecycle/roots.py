"""Roots and pins: the objects that say which store paths are live.

A root (``lifecycle/v1/roots/NAME/TIME-RANDOM.json``) is written by every
push and every daemon batch *before* it decides that a path is already in
the cache, lists every path it may rely on, and is marked complete at the
end.  A pin (``lifecycle/v1/pins/NAME.json``) keeps the closure of its paths
until it is removed.  Both list store path basenames; gc follows their
closure through the narinfos' references.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from uploader.lifecycle.layout import (
    JSON_TYPE,
    PINS,
    ROOTS,
    LayoutError,
    check_layout,
    check_name,
    decode,
    encode,
    key_time,
    listing,
    timed_key,
)
from uploader.storepath import basename
from uploader.targets import Target

__all__ = [
    "IN_PROGRESS",
    "Pin",
    "Root",
    "RootRef",
    "RootWriter",
    "list_pins",
    "list_roots",
    "read_pin",
    "read_root",
    "remove_pin",
    "restore_pin",
    "write_pin",
]

IN_PROGRESS = "in-progress"
COMPLETE = "complete"


@dataclass(frozen=True)
class RootRef:
    """A root as its key tells it: without reading it."""

    key: str
    name: str
    created: float


@dataclass(frozen=True)
class Root:
    key: str
    name: str
    host: str
    created: float
    state: str
    paths: tuple[str, ...]  # store path basenames


@dataclass(frozen=True)
class Pin:
    name: str
    created: float
    paths: tuple[str, ...]


class RootWriter:
    """One uploader's root: written in progress, grown, then completed."""

    def __init__(self, target: Target, name: str, *, host: str | None = None) -> None:
        self.target = target
        self.name = check_name(name, "root")
        self.host = host or socket.gethostname()
        self.created = time.time()
        self.key = timed_key(f"{ROOTS}{self.name}/", self.created)
        self._paths: set[str] = set()

    def start(self, paths: Iterable[str]) -> None:
        """Write the root, in progress, listing ``paths`` (store paths).  The
        caller has checked the bucket's layout (once, not per root)."""
        self._paths.update(basename(p) for p in paths)
        self._write(IN_PROGRESS)

    def extend(self, paths: Iterable[str]) -> bool:
        """Add paths (a closure learnt later); rewritten, and True, only when it grew."""
        more = {basename(p) for p in paths} - self._paths
        if more:
            self._paths |= more
            self._write(IN_PROGRESS)
        return bool(more)

    def complete(self) -> None:
        self._write(COMPLETE)

    def _write(self, state: str) -> None:
        record = {
            "name": self.name,
            "host": self.host,
            "created": self.created,
            "state": state,
            "paths": sorted(self._paths),
        }
        self.target.put_bytes(self.key, encode(record), JSON_TYPE)


def _names(target: Target, prefix: str) -> Iterator[str]:
    start = ""
    while True:
        page = target.list_objects(prefix, start)
        yield from (p[len(prefix) : -1] for p in page.prefixes)
        if page.last is None:
            return
        start = page.last


def list_roots(target: Target) -> list[RootRef]:
    """Every root in the bucket, by name and time (one LIST per name)."""
    found = []
    for name in _names(target, ROOTS):
        for key, mtime in listing(target, f"{ROOTS}{name}/"):
            found.append(RootRef(key, name, key_time(key) or mtime))
    return found


def read_root(target: Target, key: str) -> Root | None:
    """The root, or None when it is gone (removed by gc meanwhile)."""
    data = target.get(key)
    if data is None:
        return None
    r = decode(data, key)
    try:
        return Root(
            key,
            str(r["name"]),
            str(r.get("host", "")),
            float(r["created"]),
            str(r["state"]),
            tuple(str(p) for p in r["paths"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise LayoutError(f"{key}: unreadable root ({e!r})") from e


def _pin_key(name: str) -> str:
    return f"{PINS}{check_name(name, 'pin')}.json"


def write_pin(target: Target, name: str, paths: Iterable[str]) -> bytes | None:
    """Write (or replace) a pin; returns what it replaced."""
    check_layout(target, write=True)
    key = _pin_key(name)
    before = target.get(key)
    record = {"name": name, "created": time.time(), "paths": sorted({basename(p) for p in paths})}
    target.put_bytes(key, encode(record), JSON_TYPE)
    return before


def restore_pin(target: Target, name: str, before: bytes | None) -> None:
    """Undo write_pin: put back what it replaced, or remove the new pin."""
    if before is None:
        target.delete(_pin_key(name))
    else:
        target.put_bytes(_pin_key(name), before, JSON_TYPE)


def remove_pin(target: Target, name: str) -> bool:
    """Remove a pin; False when there is none of that name."""
    check_layout(target, write=False)
    key = _pin_key(name)
    if target.get(key) is None:
        return False
    target.delete(key)
    return True


def read_pin(target: Target, key: str) -> Pin | None:
    data = target.get(key)
    if data is None:
        return None
    r = decode(data, key)
    try:
        return Pin(str(r["name"]), float(r["created"]), tuple(str(p) for p in r["paths"]))
    except (KeyError, TypeError, ValueError) as e:
        raise LayoutError(f"{key}: unreadable pin ({e!r})") from e


def list_pins(target: Target) -> list[Pin]:
    check_layout(target, write=False)
    pins = (read_pin(target, key) for key, _ in listing(target, PINS) if key.endswith(".json"))
    return sorted((p for p in pins if p is not None), key=lambda p: p.name)
