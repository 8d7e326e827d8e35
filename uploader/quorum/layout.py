"""Where the quorum keeps things in the bucket, beside the cache itself.

Everything lives under ``quorum/v1/`` so that a substituter, which only reads
``<hash>.narinfo`` and ``nar/…``, never sees it, and so that the layout can
change in a ``v2`` without confusing an old publisher:

    quorum/v1/staging/<builder>/<filehash>.nar<ext>     a builder's compressed NAR
    quorum/v1/attestations/<hashpart>/<builder>.json    a builder's signed claim
    quorum/v1/conflicts/<hashpart>.json                 builders that disagree
    quorum/v1/published/<hashpart>.json                 what the publisher signed, and why

Each builder writes only below its own name, so the bucket's access policy
can confine a builder's credentials to ``staging/<builder>/*`` and
``attestations/*/<builder>.json``: no builder can touch another's NARs or
claims.  A builder also reads its own attestations (to keep them
write-once), and checks that it can with one object of its own that is no
attestation, ``attestations/read-check/<builder>.json``: "read-check" is no
hash part (``e`` and ``-`` are not in Nix's base-32).  See
docs/quorum-format.md.
"""

from __future__ import annotations

import re

from uploader._exceptions import ConfigError
from uploader.nixbase32 import encode as nix32
from uploader.storepath import hash_part

__all__ = [
    "ATTESTATIONS",
    "CONFLICTS",
    "PREFIX",
    "PUBLISHED",
    "STAGING",
    "attestation_key",
    "check_builder_name",
    "conflict_key",
    "is_read_check",
    "parse_attestation_key",
    "published_key",
    "read_check_key",
    "staging_key",
]

PREFIX = "quorum/v1/"
STAGING = PREFIX + "staging/"
ATTESTATIONS = PREFIX + "attestations/"
CONFLICTS = PREFIX + "conflicts/"
PUBLISHED = PREFIX + "published/"

# A builder's name (its key's name) is a path component of object keys.
_BUILDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
# Cannot be a hash part: "e" and "-" are not in Nix's base-32 alphabet.
_READ_CHECK = "read-check"


def check_builder_name(name: str) -> str:
    """``name`` if it can name a builder (letters, digits, ``._+-``), else ConfigError."""
    if not _BUILDER_NAME.fullmatch(name):
        raise ConfigError(
            f"builder key name {name!r} cannot name a builder: use letters, digits and "
            "'.', '_', '+', '-' only (it becomes part of object keys in the bucket)"
        )
    return name


def staging_key(builder: str, file_hash: bytes, extension: str) -> str:
    """Where a builder stages a compressed NAR (named by its sha256, as under nar/)."""
    check_builder_name(builder)
    return f"{STAGING}{builder}/{nix32(file_hash)}.nar{extension}"


def attestation_key(store_path: str, builder: str) -> str:
    check_builder_name(builder)
    return f"{ATTESTATIONS}{hash_part(store_path)}/{builder}.json"


def read_check_key(builder: str) -> str:
    """The object by which a builder checks that it can read its own attestations."""
    check_builder_name(builder)
    return f"{ATTESTATIONS}{_READ_CHECK}/{builder}.json"


def is_read_check(key: str) -> bool:
    return key.startswith(f"{ATTESTATIONS}{_READ_CHECK}/")


def parse_attestation_key(key: str) -> tuple[str, str] | None:
    """(hash part, builder) of an attestation's key; None for any other key."""
    rest = key.removeprefix(ATTESTATIONS)
    if rest == key or rest.count("/") != 1 or not rest.endswith(".json"):
        return None
    hashpart, builder = rest[: -len(".json")].split("/")
    return (hashpart, builder) if hashpart and builder else None


def conflict_key(hashpart: str) -> str:
    return f"{CONFLICTS}{hashpart}.json"


def published_key(hashpart: str) -> str:
    return f"{PUBLISHED}{hashpart}.json"
