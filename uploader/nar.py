"""Streaming NAR serialisation, byte-identical to ``nix-store --dump``.

The NAR is what NarHash/NarSize describe and what the cache stores
(compressed), so a single differing byte makes every signature we publish
wrong.  :func:`dump` walks a file tree and yields the archive in chunks with
memory bounded by ``chunk_size``, whatever the size of the files in it.

Paths are handled as bytes throughout: store paths may contain file names
that are not valid UTF-8, and Nix orders directory entries by raw bytes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import BinaryIO

from uploader._exceptions import NarError, UploaderError
from uploader.fdlimit import EXHAUSTED, exhausted_hint

__all__ = ["DEFAULT_CHUNK_SIZE", "SINGLE_FILE_END", "SINGLE_FILE_HEADS", "dump", "write_nar"]

DEFAULT_CHUNK_SIZE = 1 << 20


def _str(data: bytes) -> bytes:
    """One NAR string: u64 little-endian length, the bytes, zero padding to 8."""
    return len(data).to_bytes(8, "little") + data + bytes(-len(data) % 8)


_MAGIC = _str(b"nix-archive-1")
_CLOSE = _str(b")")
_NODE_OPEN = _str(b"(") + _str(b"type")
_DIRECTORY = _NODE_OPEN + _str(b"directory")
_SYMLINK = _NODE_OPEN + _str(b"symlink") + _str(b"target")
_REGULAR = _NODE_OPEN + _str(b"regular") + _str(b"contents")
_EXECUTABLE = _NODE_OPEN + _str(b"regular") + _str(b"executable") + _str(b"") + _str(b"contents")
_ENTRY = _str(b"entry") + _str(b"(") + _str(b"name")
# A NAR of one regular file, up to its contents' length (plain, executable),
# and what ends it after the padded contents: what a flat content address
# hashes is in between (quorum/staged.py).
SINGLE_FILE_HEADS = (_MAGIC + _REGULAR, _MAGIC + _EXECUTABLE)
SINGLE_FILE_END = _CLOSE
_NODE = _str(b"node")


def dump(path: str | bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """Yield the NAR serialisation of ``path`` in chunks of about ``chunk_size`` bytes.

    Symlinks are archived, never followed.  Raises NarError for file types a
    NAR cannot hold (fifos, sockets, devices) and for unreadable entries,
    naming the offending path.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    # Header pieces are tiny; batching them keeps consumers (hashers,
    # compressors, uploads) fed with few large writes instead of many small ones.
    buf = bytearray(_MAGIC)
    # Directories being walked, each with its not-yet-archived entries, so
    # deep trees need no recursion.
    open_dirs: list[tuple[bytes, Iterator[bytes]]] = []
    node: bytes | None = os.fsencode(path)
    while node is not None:
        mode = _lstat(node).st_mode
        if stat.S_ISDIR(mode):
            buf += _DIRECTORY
            open_dirs.append((node, iter(sorted(_listdir(node)))))
        else:
            if stat.S_ISREG(mode):
                yield from _regular(node, buf, chunk_size)
            elif stat.S_ISLNK(mode):
                buf += _SYMLINK + _str(_readlink(node)) + _CLOSE
            else:
                raise _unsupported(node, mode)
            if open_dirs:
                buf += _CLOSE  # the entry holding this file or symlink
        node = None
        while open_dirs:
            parent, names = open_dirs[-1]
            name = next(names, None)
            if name is not None:
                buf += _ENTRY + _str(name) + _NODE
                node = parent + b"/" + name
                break
            open_dirs.pop()
            buf += _CLOSE  # the directory itself
            if open_dirs:
                buf += _CLOSE  # the entry holding it
        if len(buf) >= chunk_size:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


def write_nar(path: str | bytes, out: BinaryIO, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Write the NAR of ``path`` to ``out``; return its size (the NarSize)."""
    size = 0
    for chunk in dump(path, chunk_size):
        out.write(chunk)
        size += len(chunk)
    return size


def _regular(path: bytes, buf: bytearray, chunk_size: int) -> Iterator[bytes]:
    """Append a regular file's node to ``buf``, yielding whenever it must flush."""
    # O_NOFOLLOW and O_NONBLOCK: if the entry was swapped for a symlink or a
    # fifo since lstat, fail (below) instead of following it or blocking.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _os_error("opening", path, e) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _unsupported(path, st.st_mode)
        buf += _EXECUTABLE if st.st_mode & stat.S_IXUSR else _REGULAR
        size = st.st_size
        buf += size.to_bytes(8, "little")
        remaining = size
        while remaining:
            try:
                piece = os.read(fd, min(remaining, chunk_size))
            except OSError as e:
                raise _os_error("reading", path, e) from e
            if not piece:
                raise NarError(f"{_show(path)} shrank while it was being archived")
            remaining -= len(piece)
            if len(piece) == chunk_size:
                # Full pieces go out as they are: no copy into the buffer.
                if buf:
                    yield bytes(buf)
                    buf.clear()
                yield piece
            else:
                buf += piece
        buf += bytes(-size % 8) + _CLOSE
    finally:
        os.close(fd)


def _lstat(path: bytes) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as e:
        raise _os_error("inspecting", path, e) from e


def _listdir(path: bytes) -> list[bytes]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise _os_error("listing", path, e) from e


def _readlink(path: bytes) -> bytes:
    try:
        return os.readlink(path)
    except OSError as e:
        raise _os_error("reading symlink", path, e) from e


def _show(path: bytes) -> str:
    # repr of the surrogate-escaped name: readable, and unambiguous for
    # names that are not UTF-8.
    return repr(os.fsdecode(path))


def _os_error(action: str, path: bytes, e: OSError) -> UploaderError:
    text = f"{action} {_show(path)} for the NAR: {e.strerror or e}"
    if e.errno in EXHAUSTED:
        # What the machine ran out of, not what is wrong with the path: an
        # upload that meets one is tried again later, never quarantined.
        return UploaderError(text + exhausted_hint(e))
    return NarError(text)


def _unsupported(path: bytes, mode: int) -> NarError:
    kind = {
        stat.S_IFIFO: "a fifo",
        stat.S_IFSOCK: "a socket",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
    }.get(stat.S_IFMT(mode), f"an unknown file type ({stat.S_IFMT(mode):o})")
    return NarError(f"{_show(path)} is {kind}; a NAR can only hold files, directories, symlinks")
