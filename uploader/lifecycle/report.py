"""What `verify` found: the kinds of damage, each finding, and the report
(as text lines by the CLI, or as JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "Problem", "Report"]

# Every kind of damage, with what it means for a client.
KINDS = {
    "unreadable-narinfo": "the narinfo does not parse: clients fail on it",
    "bad-signature": "no signature verifies with the given keys: clients refuse the path",
    "missing-nar": "the NAR its URL names is not in the cache: substitution fails",
    "wrong-nar-size": "the NAR is not FileSize bytes (truncated?): substitution fails",
    "missing-reference": "a referenced path has no narinfo here or upstream: its closure breaks",
    "corrupt-nar": "(--deep) the NAR's bytes differ from FileHash, NarHash or NarSize",
}


@dataclass(frozen=True)
class Problem:
    """One finding.  ``key`` is the narinfo's key; ``store_path`` the path it
    is about (for a missing reference, the missing path), None when an
    unreadable narinfo does not say."""

    kind: str
    key: str
    store_path: str | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "store_path": self.store_path,
            "detail": self.detail,
        }


@dataclass
class Report:
    store_url: str
    deep: bool
    signatures_checked: bool
    narinfos: int = 0
    nars: int = 0
    nar_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    orphans: dict[str, int] = field(default_factory=dict)
    upstream_references: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(KINDS, 0)
        for p in self.problems:
            counts[p.kind] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "store_url": self.store_url,
            "deep": self.deep,
            "signatures": "checked" if self.signatures_checked else "unchecked",
            "narinfos": self.narinfos,
            "nars": self.nars,
            "nar_bytes": self.nar_bytes,
            "clean": self.clean,
            "counts": self.counts(),
            "problems": [p.to_json() for p in self.problems],
            "orphans": [{"key": k, "bytes": n} for k, n in sorted(self.orphans.items())],
            "orphan_bytes": sum(self.orphans.values()),
            "upstream_references": self.upstream_references,
        }
