"""Counting attestations: is a path ready, still waiting, or disputed?

Pure functions over attestations already read from the bucket, so that the
rules can be read (and tested) in one place:

- an attestation counts only if it parses, is stored under the name of the
  builder it claims to be from, names the path it is stored under, comes
  from a key the publisher was given, its signature is valid, and its staged
  NAR was not found to differ from what it claims (``excluded``);
- counted attestations that claim different (NarHash, NarSize, references)
  make the path disputed: it is never signed;
- otherwise it is ready when ``quorum`` distinct builders agree, or one
  trusted builder attests it, or its content address gives its store path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from uploader.quorum.attestation import Attestation, Claim
from uploader.quorum.ca import ca_gives_path
from uploader.quorum.layout import parse_attestation_key
from uploader.signing import PublicKey
from uploader.storepath import hash_part

__all__ = ["CONFLICT", "READY", "WAITING", "Rejected", "Verdict", "judge"]

READY = "ready"
WAITING = "waiting"
CONFLICT = "conflict"


@dataclass(frozen=True)
class Rejected:
    """An attestation that does not count, and why."""

    key: str
    builder: str
    reason: str


@dataclass
class Verdict:
    hashpart: str
    state: str
    store_path: str | None = None
    needed: int = 0
    # The counted attestations, by the claim they make (one claim unless disputed).
    claims: dict[Claim, list[Attestation]] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)
    ca: str | None = None  # a content address that gives the path, if any

    @property
    def support(self) -> list[Attestation]:
        """The agreeing attestations of an undisputed path."""
        return next(iter(self.claims.values())) if len(self.claims) == 1 else []


def judge(
    hashpart: str,
    found: Iterable[tuple[str, bytes]],
    keys: Mapping[str, PublicKey],
    *,
    quorum: int,
    trusted: Iterable[str] = (),
    excluded: Mapping[str, str] | None = None,
) -> Verdict:
    """The verdict on one path from its attestation objects ``(key, bytes)``.
    ``excluded`` maps object keys to the reason they were found bad since."""
    verdict = Verdict(hashpart, WAITING, needed=quorum)
    excluded = excluded or {}
    for key, data in found:
        attestation, reason = _check(hashpart, key, data, keys)
        if attestation is not None and key in excluded:
            reason = excluded[key]
        if attestation is None or reason:
            parsed = parse_attestation_key(key)
            builder = parsed[1] if parsed else "?"
            verdict.rejected.append(Rejected(key, builder, reason or "unreadable"))
            continue
        verdict.store_path = verdict.store_path or attestation.store_path
        verdict.claims.setdefault(attestation.claim, []).append(attestation)
    if len(verdict.claims) > 1:
        verdict.state = CONFLICT
        return verdict
    support = verdict.support
    verdict.ca = next(
        (
            a.ca
            for a in support
            if a.ca and ca_gives_path(a.store_path, a.ca, a.references) and _ca_agrees(a)
        ),
        None,
    )
    builders = {a.builder for a in support}
    if verdict.ca is not None or builders & set(trusted):
        verdict.needed = 1
    if support and len(builders) >= verdict.needed:
        verdict.state = READY
    return verdict


def _check(
    hashpart: str, key: str, data: bytes, keys: Mapping[str, PublicKey]
) -> tuple[Attestation | None, str]:
    """The attestation in ``data`` and, if it does not count, why."""
    parsed = parse_attestation_key(key)
    if parsed is None or parsed[0] != hashpart:
        return None, f"{key} is not an attestation key for {hashpart}"
    try:
        attestation = Attestation.parse(data)
    except ValueError as e:
        return None, str(e)
    if attestation.builder != parsed[1]:
        claimed = attestation.builder
        return attestation, f"claims to be from {claimed} but is stored as {parsed[1]}'s"
    if hash_part(attestation.store_path) != hashpart:
        return attestation, f"is about {attestation.store_path}, not a path with hash {hashpart}"
    key_ = keys.get(attestation.builder)
    if key_ is None:
        return attestation, f"builder {attestation.builder} is not one of the --builder-key keys"
    if not attestation.verify(key_):
        return attestation, f"bad signature: not {attestation.builder}'s key over this claim"
    return attestation, ""


def _ca_agrees(a: Attestation) -> bool:
    """A recursive sha256 content address is the NarHash itself: a claim
    whose NarHash differs from it cannot be right.  (Other content addresses
    hash the file inside the NAR; Nix checks those when it substitutes.)"""
    if a.ca is None or not a.ca.startswith("fixed:r:sha256:"):
        return True
    return a.ca.removeprefix("fixed:r:") == a.nar_hash
