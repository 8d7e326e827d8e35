"""NAR listings: the JSON a binary cache keeps beside a narinfo as
``<hash>.ls`` (``write-nar-listing``), the same as Nix writes.

``{"version": 1, "root": NODE}`` where a NODE is a directory
(``{"type": "directory", "entries": {NAME: NODE}}``), a symlink
(``{"type": "symlink", "target": T}``) or a regular file
(``{"type": "regular", "size": N, "executable": true, "narOffset": OFFSET}``,
``executable`` only when set; ``narOffset`` is where its contents start in
the NAR).  It is read off the NAR as it streams past, so the listing
describes exactly the bytes that were hashed and uploaded; file contents
are skipped, never held.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator
from typing import Any

from uploader._exceptions import NarError

__all__ = ["NarListing"]

# Names and symlink targets are short; anything longer is not a NAR we made.
_MAX_STRING = 1 << 16

# What the parser asks of the byte stream: ("read", n) → n bytes back,
# ("skip", n) → nothing back, ("offset", 0) → how many bytes came so far.
_Step = Generator[tuple[str, int], bytes | int | None, Any]
_Parser = Generator[tuple[str, int], bytes | int | None, dict[str, Any]]


class NarListing:
    """Feed it a NAR in chunks; ``json()`` is the listing once the NAR ended."""

    def __init__(self) -> None:
        self._parser = _archive()
        self._offset = 0  # NAR bytes consumed by the parser so far
        self._request: tuple[str, int] | None = self._advance(None)
        self._buffer = bytearray()
        self._root: dict[str, Any] | None = None

    def feed(self, chunk: bytes | memoryview) -> None:
        data = memoryview(chunk)
        while data and self._request is not None:
            kind, n = self._request
            if kind == "skip":
                taken = min(n, len(data))
                data = data[taken:]
                self._offset += taken
                self._request = (kind, n - taken) if taken < n else self._advance(None)
                continue
            wanted = n - len(self._buffer)
            self._buffer += data[:wanted]
            data = data[wanted:]
            if len(self._buffer) == n:
                piece = bytes(self._buffer)
                self._buffer.clear()
                self._offset += n
                self._request = self._advance(piece)
        if data:
            raise NarError("the NAR goes on after its root node ended")

    def _advance(self, value: bytes | int | None) -> tuple[str, int] | None:
        """Answer the parser and return its next request; requests that need
        no bytes (where the stream is, an empty skip) are answered here."""
        try:
            request = self._parser.send(value)
            while request[0] == "offset" or request == ("skip", 0):
                request = self._parser.send(self._offset if request[0] == "offset" else None)
        except StopIteration as done:
            self._root = done.value
            return None
        return request

    @property
    def offset(self) -> int:
        return self._offset

    def json(self) -> bytes:
        """The listing, serialised as Nix does (compact, keys in Nix's order)."""
        if self._root is None:
            raise NarError("the NAR ended before its root node did")
        text = json.dumps(
            {"version": 1, "root": self._root}, separators=(",", ":"), ensure_ascii=False
        )
        # Nix 2.8 writes backspace and form feed as \u0008 and \u000c (newer
        # Nix as \b and \f, as Python does); every reader takes either.
        # Bytes of names and targets that are not UTF-8 go out as they are,
        # as Nix writes them: replacing them would merge two names into one.
        return _SHORT_ESCAPE.sub(_long_escape, text).encode(errors="surrogateescape")


# An escape sequence of a backslash or of a character Nix writes as \u00XX.
_SHORT_ESCAPE = re.compile(r"\\([\\bf])")


def _long_escape(match: re.Match[str]) -> str:
    char = match.group(1)
    return match.group(0) if char == "\\" else {"b": "\\u0008", "f": "\\u000c"}[char]


def _archive() -> _Parser:
    """The whole NAR: magic, then the root node."""
    if (yield from _string()) != b"nix-archive-1":
        raise NarError("not a NAR: the magic string is missing")
    return (yield from _node())


def _node() -> _Parser:
    yield from _expect(b"(")
    yield from _expect(b"type")
    kind = yield from _string()
    if kind == b"regular":
        node: dict[str, Any] = {"type": "regular"}
        tag = yield from _string()
        executable = tag == b"executable"
        if executable:
            yield from _expect(b"")
            tag = yield from _string()
        if tag != b"contents":
            raise NarError(f"expected 'contents' in a regular file node, got {tag!r}")
        size = yield from _u64()
        node["size"] = size
        if executable:
            node["executable"] = True
        node["narOffset"] = yield ("offset", 0)
        yield ("skip", size + (-size % 8))
        yield from _expect(b")")
        return node
    if kind == b"symlink":
        yield from _expect(b"target")
        target = yield from _string()
        yield from _expect(b")")
        return {"type": "symlink", "target": target.decode(errors="surrogateescape")}
    if kind == b"directory":
        entries: dict[str, Any] = {}
        while True:
            tag = yield from _string()
            if tag == b")":
                return {"type": "directory", "entries": entries}
            if tag != b"entry":
                raise NarError(f"expected 'entry' or ')' in a directory node, got {tag!r}")
            yield from _expect(b"(")
            yield from _expect(b"name")
            name = (yield from _string()).decode(errors="surrogateescape")
            yield from _expect(b"node")
            entries[name] = yield from _node()
            yield from _expect(b")")
    raise NarError(f"unknown NAR node type {kind!r}")


def _u64() -> _Step:
    raw = yield ("read", 8)
    assert isinstance(raw, bytes)
    return int.from_bytes(raw, "little")


def _string() -> _Step:
    n = yield from _u64()
    if n > _MAX_STRING:
        raise NarError(f"a NAR string of {n} bytes where a short one belongs")
    padded = n + (-n % 8)
    raw = (yield ("read", padded)) if padded else b""
    assert isinstance(raw, bytes)
    return raw[:n]


def _expect(token: bytes) -> _Step:
    got = yield from _string()
    if got != token:
        raise NarError(f"expected {token!r} in the NAR, got {got!r}")
