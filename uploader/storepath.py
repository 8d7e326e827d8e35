"""Store path syntax: validating ``/nix/store/<hash>-<name>`` and taking it apart.

Everything that arrives from outside (the post-build hook, the spool, the
command line) is checked here before it is used to build object keys or
file names, so a malformed or hostile path never reaches the cache.  Whether
a path is *valid in the Nix database* is the store module's question, not
this one's.
"""

from __future__ import annotations

import functools
import os
import re

from uploader._exceptions import InvalidPathError
from uploader.nixbase32 import ALPHABET

__all__ = [
    "HASH_LENGTH",
    "MAX_NAME_LENGTH",
    "STORE_DIR",
    "basename",
    "hash_part",
    "is_store_path",
    "name_part",
    "parse_store_path",
    "to_store_path",
]

STORE_DIR = "/nix/store"
HASH_LENGTH = 32
MAX_NAME_LENGTH = 211

_HASH_RE = re.compile(f"[{ALPHABET}]{{{HASH_LENGTH}}}")
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")
# Mirrors the kernel's limit, so a symlink loop is an error rather than a hang.
_MAX_SYMLINK_HOPS = 40


# Remembered: the engine asks about the same few thousand paths many times
# over a batch (keys, references, logs), and the checks below are pure.
@functools.lru_cache(maxsize=1 << 16)
def parse_store_path(s: str, store_dir: str = STORE_DIR) -> str:
    """Return ``s`` if it is exactly a top-level store path, else raise InvalidPathError."""

    def bad(reason: str) -> InvalidPathError:
        return InvalidPathError(f"not a store path: {s!r}: {reason}", store_path=s)

    if "\0" in s:
        raise bad("contains a NUL byte")
    if any(c.isspace() for c in s):
        raise bad("contains whitespace")
    # Checked on the whole path: with a store directory derived from a path
    # (as for narinfo files), /nix/store/../x must not pass as x in /nix/store/..
    if ".." in s.split("/"):
        raise bad("contains a '..' component")
    prefix = store_dir + "/"
    if not s.startswith(prefix):
        raise bad(f"not under {store_dir}/")
    base = s[len(prefix) :]
    if "/" in base:
        raise bad("has a subpath or trailing slash (expected <hash>-<name> only)")
    if len(base) < HASH_LENGTH + 2 or base[HASH_LENGTH] != "-":
        raise bad("expected <32-char hash>-<name> after the store directory")
    if not _HASH_RE.fullmatch(base[:HASH_LENGTH]):
        raise bad("hash part is not 32 nix base-32 characters")
    name = base[HASH_LENGTH + 1 :]
    if len(name) > MAX_NAME_LENGTH:
        raise bad(f"name is {len(name)} characters, the limit is {MAX_NAME_LENGTH}")
    if not _NAME_RE.fullmatch(name):
        raise bad("name may only contain A-Z a-z 0-9 and +-._?=")
    # As Nix since 2.4 (and officially since NixOS/nix#912): a leading '.'
    # is allowed, but not the names '.' and '..', nor a first dash-separated
    # component that is one of them.
    first = name.split("-", 1)[0]
    if name in (".", ".."):
        raise bad(f"name must not be '{name}'")
    if first in (".", ".."):
        raise bad(f"the name's first dash-separated part must not be '{first}'")
    return s


def is_store_path(s: str, store_dir: str = STORE_DIR) -> bool:
    """Whether ``s`` is exactly a top-level store path."""
    try:
        parse_store_path(s, store_dir)
    except InvalidPathError:
        return False
    return True


def basename(path: str, store_dir: str = STORE_DIR) -> str:
    """``<hash>-<name>``: how narinfo References and Deriver name a path."""
    return parse_store_path(path, store_dir)[len(store_dir) + 1 :]


def hash_part(path: str, store_dir: str = STORE_DIR) -> str:
    """The 32-character hash, which names the path's ``.narinfo`` in the cache."""
    return basename(path, store_dir)[:HASH_LENGTH]


def name_part(path: str, store_dir: str = STORE_DIR) -> str:
    """The name after ``<hash>-``."""
    return basename(path, store_dir)[HASH_LENGTH + 1 :]


def to_store_path(p: str, store_dir: str = STORE_DIR) -> str:
    """Map ``./result``-style links and paths inside a store path to that store path.

    Symlinks are resolved like :func:`os.path.realpath`, except that resolution
    stops at the first component inside the store: a store path may itself be
    a symlink (to another store path), and the user means the link, as with
    ``nix path-info ./result``.
    """
    pending = os.path.abspath(p).split("/")
    current = "/"
    hops = 0
    while pending:
        component = pending.pop(0)
        if component in ("", "."):
            continue
        if component == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, component)
        if os.path.dirname(candidate) == store_dir:
            inside = [c for c in pending if c not in ("", ".")]
            if inside and os.path.lexists(candidate) and not os.path.lexists(p):
                raise InvalidPathError(f"{p!r}: no such file or directory")
            return parse_store_path(candidate, store_dir)
        # The store directory's own ancestors are taken as written, so a
        # symlinked /nix still names paths as /nix/store/...
        if (store_dir + "/").startswith(candidate + "/") or not os.path.islink(candidate):
            current = candidate
            continue
        hops += 1
        if hops > _MAX_SYMLINK_HOPS:
            raise InvalidPathError(f"{p!r}: too many levels of symbolic links")
        target = os.readlink(candidate)
        if target.startswith("/"):
            current = "/"
        pending[:0] = target.split("/")
    if not os.path.lexists(current):
        raise InvalidPathError(f"{p!r}: no such file or directory (resolved to {current!r})")
    if current == store_dir:
        raise InvalidPathError(f"{p!r} is the store directory itself: give a store path in it")
    raise InvalidPathError(f"{p!r} does not lead into {store_dir} (resolved to {current!r})")
