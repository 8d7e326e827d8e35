"""Checking a content-address claim against the store path it is about.

A content-addressed path's name is computed from its contents (Nix's
``makeFixedOutputPath`` and ``makeTextPath``), and Nix checks the contents
against the claim when it substitutes.  Such a path needs no quorum, but
only if the claim really gives the path: a builder that put a ``CA`` field
on an input-addressed path would otherwise skip the quorum.
"""

from __future__ import annotations

import hashlib
import os

from uploader.nixbase32 import encode as nix32
from uploader.nixbase32 import parse_hash
from uploader.storepath import name_part

__all__ = ["ca_gives_path"]


def ca_gives_path(store_path: str, ca: str, references: tuple[str, ...]) -> bool:
    """Whether ``ca`` (``text:sha256:…``, ``fixed:[r:]sha256:…``) and the
    references compute ``store_path``.  Other hash types are not accepted."""
    store_dir = os.path.dirname(store_path)
    name = name_part(store_path)
    others = sorted(r for r in references if r != store_path)
    self_reference = store_path in references
    kind, _, rest = ca.partition(":")
    recursive = rest.startswith("r:")
    algo, _, encoded = rest.removeprefix("r:").partition(":")
    if algo != "sha256":
        return False
    try:
        digest = parse_hash(f"sha256:{encoded}")
    except ValueError:
        return False
    if kind == "text" and not recursive and not self_reference:
        return _make_path(_type("text", others, False), digest, store_dir, name) == store_path
    if kind != "fixed":
        return False
    if recursive:
        kind_text = _type("source", others, self_reference)
        return _make_path(kind_text, digest, store_dir, name) == store_path
    if references:
        return False  # flat fixed outputs cannot reference anything
    inner = hashlib.sha256(f"fixed:out:sha256:{digest.hex()}:".encode()).digest()
    return _make_path("output:out", inner, store_dir, name) == store_path


def _type(kind: str, references: list[str], self_reference: bool) -> str:
    return ":".join([kind, *references, *(["self"] if self_reference else [])])


def _make_path(kind: str, digest: bytes, store_dir: str, name: str) -> str:
    text = f"{kind}:sha256:{digest.hex()}:{store_dir}:{name}"
    full = hashlib.sha256(text.encode()).digest()
    folded = bytearray(20)
    for i, byte in enumerate(full):
        folded[i % 20] ^= byte
    return f"{store_dir}/{nix32(bytes(folded))}-{name}"
