"""Binary cache targets: where NARs and narinfos go.

A target stores opaque objects by key (``nix-cache-info``, ``<hash>.narinfo``,
``nar/<filehash>.nar.zst``).  Each ``put`` makes the object visible whole or
not at all, which is what lets the engine order NAR before narinfo.  Targets
are synchronous and thread-safe; the engine calls them from worker threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Protocol

from uploader.targets.url import StoreUrl, parse_store_url

__all__ = [
    "KeyPage",
    "ObjectPage",
    "StoreUrl",
    "Target",
    "Upload",
    "open_target",
    "parse_store_url",
]


@dataclass(frozen=True)
class KeyPage:
    """One page of a listing of the cache's top-level keys (narinfos,
    ``nix-cache-info``; ``nar/`` counts as one key), in byte order.

    Every key after the listing's start up to and including ``last`` is in
    ``keys``; ``last`` is None when the listing reached the end of the cache."""

    keys: frozenset[str]
    last: str | None

    def covers(self, key: str) -> bool:
        """Whether this page tells if ``key`` (sorting after its start) exists."""
        return self.last is None or key <= self.last


@dataclass(frozen=True)
class ObjectPage:
    """One page of a listing of the objects directly under a prefix (the
    top level, ``nar/``), ``(key, size in bytes, last modified as Unix
    time)`` in byte order of key, and the sub-prefixes (``nar/``, each
    ending in ``/``) that sort in the same range.

    ``last`` is where the next page starts; None when the listing reached
    the end."""

    objects: tuple[tuple[str, int, float], ...]
    last: str | None
    prefixes: tuple[str, ...] = ()


class Upload(Protocol):
    """An object uploaded in numbered parts, invisible until completed."""

    key: str

    def put_part(self, number: int, data: bytes | bytearray) -> None:
        """Send part ``number`` (from 1); parts may be sent from several
        threads.  ``data`` is lent: the caller refills it once this returns."""
        ...

    def complete(self) -> None:
        """Make the object visible, made of every part sent, in number order."""
        ...

    def abort(self) -> None:
        """Give the upload up: the parts are deleted, no object appears."""
        ...


class Target(Protocol):
    """A binary cache, seen as a flat key/value store."""

    url: StoreUrl
    # Whether ``start_upload`` begins uploads in parts (else it returns None).
    takes_parts: bool

    def exists(self, key: str) -> bool:
        """Whether an object with this key is visible."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        ...

    def put(self, key: str, body: IO[bytes], size: int, content_type: str) -> None:
        """Store ``size`` bytes read from ``body`` (at its current position)."""
        ...

    def put_file(self, key: str, filename: str, size: int, content_type: str) -> None:
        """Store the contents of a local file (large NARs: read in parallel parts)."""
        ...

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        """Store a small object held in memory."""
        ...

    def start_upload(self, key: str, content_type: str) -> Upload | None:
        """Begin an upload in parts (large NARs, sent while compressed);
        None when this target stores whole files better (``file://``)."""
        ...

    def list_keys(self, start_after: str) -> KeyPage | None:
        """A page (about 1000) of the top-level keys that sort after
        ``start_after``; None when this target does not list (not allowed, or
        asking key by key is as cheap), and the engine calls ``exists``."""
        ...

    def list_objects(self, prefix: str, start_after: str) -> ObjectPage:
        """A page of the objects directly under ``prefix`` that sort after
        ``start_after``, with their sizes and times: what auditing and
        collecting the whole cache need.  Raises TargetError when the cache
        cannot be listed."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object; removing one that is not there is no error."""
        ...

    def open_object(self, key: str) -> IO[bytes] | None:
        """The object as a stream to read piece by piece (a NAR of any
        size), or None when it does not exist; the caller closes it."""
        ...


def open_target(url: str | StoreUrl, *, max_connections: int = 16) -> Target:
    """The target a store URL names (``s3://…`` or ``file://…``)."""
    parsed = parse_store_url(url) if isinstance(url, str) else url
    if parsed.scheme == "file":
        from uploader.targets.file import FileTarget

        return FileTarget(parsed)
    from uploader.targets.s3 import S3Target

    return S3Target(parsed, max_connections=max_connections)
