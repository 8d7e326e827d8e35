"""The attestation: one builder's signed claim about one store path it built.

Version 1 is a JSON object (docs/quorum-format.md has the field list)::

    {"version": 1, "builder": "ci-a-1", "storePath": "/nix/store/…-hello",
     "narHash": "sha256:<nix32>", "narSize": 1234, "references": ["/nix/store/…"],
     "deriver": "/nix/store/….drv", "ca": null,
     "nar": {"url": "quorum/v1/staging/ci-a-1/<nix32>.nar.zst", "compression": "zstd",
             "fileHash": "sha256:<nix32>", "fileSize": 567},
     "attestedAt": 1700000000, "signature": "ci-a-1:<base64>"}

The signature is the builder key's Ed25519 signature over Nix's narinfo
fingerprint (``1;<path>;<narhash>;<narsize>;<refs>``): exactly what the
quorum counts.  The other fields need no signature: the NAR's location and
file hash are checked against the signed NarHash when the NAR is published,
a CA claim is checked against the store path itself, and the deriver is as
unsigned as it is in any narinfo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from uploader.narinfo import fingerprint
from uploader.nixbase32 import format_hash, parse_hash
from uploader.quorum.layout import check_builder_name
from uploader.signing import PublicKey, SecretKey
from uploader.storepath import parse_store_path

__all__ = ["VERSION", "Attestation", "Claim", "StagedNar"]

VERSION = 1
# Far above any real attestation (a path with thousands of references).
MAX_SIZE = 4 << 20


@dataclass(frozen=True)
class StagedNar:
    """Where a builder put the compressed NAR, and what that file hashes to."""

    url: str
    compression: str
    file_hash: str  # sha256:<nix32>
    file_size: int


@dataclass(frozen=True)
class Claim:
    """What builders must agree on for a path to be published."""

    nar_hash: str
    nar_size: int
    references: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Attestation:
    builder: str
    store_path: str
    nar_hash: str  # sha256:<nix32>
    nar_size: int
    references: tuple[str, ...]  # full store paths, sorted
    nar: StagedNar
    deriver: str | None = None
    ca: str | None = None
    attested_at: int = 0
    signature: str = field(default="", compare=False)

    @property
    def claim(self) -> Claim:
        return Claim(self.nar_hash, self.nar_size, self.references)

    def fingerprint(self) -> bytes:
        return fingerprint(self.store_path, self.nar_hash, self.nar_size, self.references)

    def signed(self, key: SecretKey) -> Attestation:
        """This attestation signed by ``key`` (whose name must be the builder's)."""
        if key.name != self.builder:
            raise ValueError(f"key {key.name!r} cannot sign for builder {self.builder!r}")
        return _replace(self, signature=key.sign(self.fingerprint()))

    def verify(self, key: PublicKey) -> bool:
        """Whether the signature is ``key``'s over this attestation's claim."""
        return key.name == self.builder and key.verify(self.fingerprint(), self.signature)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "version": VERSION,
            "builder": self.builder,
            "storePath": self.store_path,
            "narHash": self.nar_hash,
            "narSize": self.nar_size,
            "references": list(self.references),
            "deriver": self.deriver,
            "ca": self.ca,
            "nar": {
                "url": self.nar.url,
                "compression": self.nar.compression,
                "fileHash": self.nar.file_hash,
                "fileSize": self.nar.file_size,
            },
            "attestedAt": self.attested_at,
            "signature": self.signature,
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> Attestation:
        """Read an attestation; ValueError says what is wrong with it."""
        if len(data) > MAX_SIZE:
            raise ValueError(f"attestation is too large (over {MAX_SIZE} bytes)")
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"attestation is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError("attestation is not a JSON object")
        if doc.get("version") != VERSION:
            raise ValueError(f"attestation version {doc.get('version')!r} is not {VERSION}")
        try:
            nar = doc["nar"]
            path = parse_store_path(_text(doc, "storePath"))
            refs = doc["references"]
            if not isinstance(refs, list) or not isinstance(nar, dict):
                raise ValueError("references must be a list and nar an object")
            deriver = _optional(doc, "deriver")
            return cls(
                builder=check_builder_name(_text(doc, "builder")),
                store_path=path,
                nar_hash=format_hash(parse_hash(_text(doc, "narHash"))),
                nar_size=_count(doc, "narSize"),
                references=tuple(sorted(parse_store_path(_string(r)) for r in refs)),
                deriver=parse_store_path(deriver) if deriver else None,
                ca=_optional(doc, "ca"),
                nar=StagedNar(
                    url=_text(nar, "url"),
                    compression=_text(nar, "compression"),
                    file_hash=format_hash(parse_hash(_text(nar, "fileHash"))),
                    file_size=_count(nar, "fileSize"),
                ),
                attested_at=_count(doc, "attestedAt", least=0),
                signature=_text(doc, "signature"),
            )
        except KeyError as e:
            raise ValueError(f"attestation has no {e.args[0]}") from None
        except Exception as e:  # InvalidPathError, ConfigError: all mean "malformed"
            raise ValueError(f"attestation is malformed: {e}") from None


def _replace(a: Attestation, **changes: Any) -> Attestation:
    return Attestation(**{**a.__dict__, **changes})


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _text(doc: dict[str, Any], key: str) -> str:
    value = _string(doc[key])
    if not value:
        raise ValueError(f"{key} is empty")
    return value


def _optional(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return None if value is None else _text(doc, key)


def _count(doc: dict[str, Any], key: str, *, least: int = 1) -> int:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{key} must be an integer ≥ {least}, not {value!r}")
    return value
