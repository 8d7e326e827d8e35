"""Nix's base-32 encoding and the sha256 notations Nix prints and accepts.

Nix base-32 is not RFC 4648: it has its own alphabet (no e, o, u, t) and
writes the least significant 5-bit group last, so a digest must go through
this module, never through :mod:`base64`.  Everything the uploader writes
says ``sha256:<nix32>``; everything it reads may use any notation Nix
accepts, and :func:`parse_hash` folds them into raw digest bytes.
"""

from __future__ import annotations

import base64
import binascii

__all__ = [
    "ALPHABET",
    "SHA256_SIZE",
    "decode",
    "encode",
    "encoded_length",
    "format_hash",
    "parse_hash",
]

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
SHA256_SIZE = 32

_VALUES = {c: i for i, c in enumerate(ALPHABET)}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def encoded_length(size: int) -> int:
    """Length of the base-32 text for ``size`` bytes (52 for sha256, 32 for a store hash)."""
    return (8 * size - 1) // 5 + 1


def encode(data: bytes) -> str:
    """Encode bytes in Nix base-32, as in store path hashes and ``sha256:`` hashes."""
    # Character n (counting from the end) holds bits 5n..5n+4 of the digest read
    # as one little-endian integer; big-int shifts avoid per-bit Python loops.
    value = int.from_bytes(data, "little")
    return "".join(
        ALPHABET[(value >> (5 * n)) & 0x1F] for n in range(encoded_length(len(data)) - 1, -1, -1)
    )


def decode(s: str) -> bytes:
    """Decode Nix base-32; raise ValueError on a bad character or an impossible length."""
    size = len(s) * 5 // 8
    if encoded_length(size) != len(s):
        raise ValueError(f"invalid nix base-32 length {len(s)}")
    value = 0
    for c in s:
        digit = _VALUES.get(c)
        if digit is None:
            raise ValueError(f"invalid nix base-32 character {c!r}")
        value = (value << 5) | digit
    # The top character may carry bits past the last byte; Nix rejects those
    # so that every digest has exactly one spelling.
    if value >> (8 * size):
        raise ValueError("invalid nix base-32 string: bits set beyond the last byte")
    return value.to_bytes(size, "little")


def parse_hash(s: str) -> bytes:
    """Return the 32-byte digest of a sha256 written in any notation Nix accepts.

    Accepted: ``sha256:`` followed by nix base-32 (52 chars), base-16 (64) or
    base-64 (44), and SRI ``sha256-<base64>``.
    """
    if s.startswith("sha256-"):
        return _parse_base64(s, s.removeprefix("sha256-"))
    if not s.startswith("sha256:"):
        raise ValueError(f"not a sha256 hash (expected 'sha256:' or 'sha256-' prefix): {s!r}")
    body = s.removeprefix("sha256:")
    if len(body) == encoded_length(SHA256_SIZE):
        try:
            return decode(body)
        except ValueError as e:
            raise ValueError(f"invalid sha256 hash {s!r}: {e}") from None
    if len(body) == 2 * SHA256_SIZE:
        # bytes.fromhex would also skip spaces; Nix accepts only hex digits.
        if not _HEX_DIGITS.issuperset(body):
            raise ValueError(f"invalid base-16 sha256 hash {s!r}")
        return bytes.fromhex(body)
    return _parse_base64(s, body)


def format_hash(digest: bytes) -> str:
    """Render a sha256 digest the way narinfo files and fingerprints need it."""
    if len(digest) != SHA256_SIZE:
        raise ValueError(f"a sha256 digest is {SHA256_SIZE} bytes, got {len(digest)}")
    return "sha256:" + encode(digest)


def _parse_base64(original: str, body: str) -> bytes:
    if len(body) != 4 * ((SHA256_SIZE + 2) // 3):
        raise ValueError(f"invalid sha256 hash {original!r}: wrong length {len(body)}")
    try:
        digest = base64.b64decode(body, validate=True)
    except binascii.Error:
        raise ValueError(f"invalid base-64 sha256 hash {original!r}") from None
    if len(digest) != SHA256_SIZE:
        raise ValueError(f"invalid base-64 sha256 hash {original!r}")
    return digest
