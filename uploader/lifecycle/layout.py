"""The bucket layout of roots, pins, run records and locks (version 1).

Everything lives under ``lifecycle/``, JSON throughout; ``lifecycle/layout.json``
says which version wrote it, and a program that knows only an older one
refuses to act on the bucket rather than misread it.  Keys carry the UTC time
first (``YYYYMMDDTHHMMSS.ffffffZ``), so they sort by time.  See
docs/lifecycle.md.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Iterator
from typing import Any

from uploader._exceptions import UploaderError
from uploader.lifecycle.listing import walk
from uploader.targets import Target

__all__ = [
    "LOCKS",
    "PINS",
    "ROOTS",
    "RUNS",
    "VERSION",
    "LayoutError",
    "check_layout",
    "check_name",
    "decode",
    "encode",
    "key_time",
    "listing",
    "time_key",
    "timed_key",
]

VERSION = 1
LAYOUT = "lifecycle/layout.json"
_BASE = f"lifecycle/v{VERSION}/"
ROOTS = _BASE + "roots/"
PINS = _BASE + "pins/"
RUNS = _BASE + "runs/"
LOCKS = _BASE + "locks/"
JSON_TYPE = "application/json"
_TIME = "%Y%m%dT%H%M%S.%fZ"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class LayoutError(UploaderError):
    """The bucket's lifecycle objects cannot be used: written by a newer
    version, or unreadable."""


def time_key(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime(_TIME)


def timed_key(prefix: str, t: float) -> str:
    """``prefix`` + TIME-RANDOM.json: unique, and sorting by time."""
    return f"{prefix}{time_key(t)}-{os.urandom(4).hex()}.json"


def key_time(key: str) -> float | None:
    """The time a timed key was made, or None when it is not one."""
    stamp = key.rsplit("/", 1)[-1].split("-", 1)[0]
    try:
        parsed = datetime.datetime.strptime(stamp, _TIME)
    except ValueError:
        return None
    return parsed.replace(tzinfo=datetime.UTC).timestamp()


def check_name(name: str, what: str) -> str:
    """A root or pin name: it becomes part of object keys."""
    if not _NAME.fullmatch(name):
        raise UploaderError(
            f"{what} name {name!r}: use letters, digits, '.', '_' and '-' "
            "(up to 128, not starting with a punctuation mark)"
        )
    return name


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps({"version": VERSION, **record}, sort_keys=True).encode()


def decode(data: bytes, key: str) -> dict[str, Any]:
    """A record's fields; refuses one written by a newer layout."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayoutError(f"{key}: unreadable ({e})") from e
    if not isinstance(record, dict):
        raise LayoutError(f"{key}: not a JSON object")
    _check_version(record.get("version"), key)
    return record


def _check_version(version: object, key: str) -> None:
    if not isinstance(version, int) or version < 1:
        raise LayoutError(f"{key}: no valid layout version ({version!r})")
    if version > VERSION:
        raise LayoutError(
            f"{key} says layout version {version}, newer than the {VERSION} this "
            "nix-cache-uploader knows: upgrade it before it touches this bucket's roots, "
            "pins or gc"
        )


def check_layout(target: Target, *, write: bool) -> None:
    """Refuse a bucket laid out by a newer version; with ``write``, mark a
    bucket that has no layout yet as version 1."""
    data = target.get(LAYOUT)
    if data is None:
        if write:
            target.put_bytes(LAYOUT, encode({}), JSON_TYPE)
        return
    decode(data, LAYOUT)


def listing(target: Target, prefix: str) -> Iterator[tuple[str, float]]:
    """``(key, last modified)`` of each object directly under ``prefix``."""
    for key, _, mtime in walk(target, prefix):
        yield key, mtime
