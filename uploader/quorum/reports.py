"""The JSON documents the publisher leaves in the bucket besides the cache:
conflict reports, publication records and its own status (docs/quorum-format.md)."""

from __future__ import annotations

import json
import os
from typing import Any

from uploader.quorum.attestation import VERSION, Attestation
from uploader.quorum.layout import PREFIX
from uploader.quorum.tally import Verdict

__all__ = [
    "STATUS_KEY",
    "conflict_report",
    "describe_claims",
    "dump",
    "publication_record",
]

# Rewritten after each pass of the publisher; read by `quorum status`.
STATUS_KEY = PREFIX + "publisher-status.json"


def dump(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def conflict_report(verdict: Verdict, now: float) -> dict[str, Any]:
    """Which builders claim what for a disputed path, and where each NAR is
    kept (to compare them, e.g. with diffoscope)."""
    return {
        "version": VERSION,
        "storePath": verdict.store_path,
        "reportedAt": int(now),
        "claims": [
            {
                "narHash": claim.nar_hash,
                "narSize": claim.nar_size,
                "references": list(claim.references),
                "builders": [{"builder": a.builder, "nar": a.nar.url} for a in attestations],
            }
            for claim, attestations in sorted(
                verdict.claims.items(), key=lambda item: item[0].nar_hash
            )
        ],
    }


def describe_claims(report: dict[str, Any]) -> list[str]:
    """Each side of a conflict report in a few words: its NarHash, and its
    references too when that is where the sides differ (the NARs are then
    the same, and comparing them shows nothing)."""
    claims = report.get("claims", [])
    by_refs = len({c.get("narHash") for c in claims}) == 1
    out = []
    for c in claims:
        who = ", ".join(str(b.get("builder")) for b in c.get("builders", []))
        what = str(c.get("narHash"))
        if by_refs:
            refs = [os.path.basename(str(r)) for r in c.get("references", [])]
            what += f" with references [{', '.join(refs) or 'none'}]"
        out.append(f"{who}: {what}")
    return out


def publication_record(
    verdict: Verdict, url: str, counted: list[Attestation], now: float
) -> dict[str, Any]:
    """Why a path was published: the attestations that counted, kept in full."""
    first = counted[0]
    return {
        "version": VERSION,
        "storePath": first.store_path,
        "narHash": first.nar_hash,
        "narSize": first.nar_size,
        "url": url,
        "publishedAt": int(now),
        "needed": verdict.needed,
        "ca": verdict.ca,
        "builders": sorted(a.builder for a in counted),
        "attestations": [json.loads(a.to_json()) for a in counted],
    }
