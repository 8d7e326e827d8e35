"""What `quorum status` shows: what waits and why, disputes, recent publications.

The publisher's own status (written after each pass) says why each path
waits; the listing of the bucket adds what arrived since and works with no
publisher running at all.
"""

from __future__ import annotations

import collections
import json
from typing import Any

from uploader.quorum.bucket import Bucket
from uploader.quorum.layout import ATTESTATIONS, CONFLICTS, PUBLISHED, parse_attestation_key
from uploader.quorum.reports import STATUS_KEY

__all__ = ["quorum_status"]


def quorum_status(bucket: Bucket, quorum: int | None, *, recent: int = 10) -> dict[str, Any]:
    publisher = _json(bucket, STATUS_KEY) or {}
    quorum = quorum or publisher.get("quorum")
    reasons = {w["storePath"]: w for w in publisher.get("waiting", [])}
    by_hash: dict[str, list[str]] = collections.defaultdict(list)
    for key, _ in bucket.list_prefix(ATTESTATIONS):
        parsed = parse_attestation_key(key)
        if parsed is not None:
            by_hash[parsed[0]].append(parsed[1])
    conflicts = [_json(bucket, key) for key, _ in sorted(bucket.list_prefix(CONFLICTS))]
    conflict_hashes = {
        str(c["storePath"]).rsplit("/", 1)[-1][:32] for c in conflicts if c and c.get("storePath")
    }
    waiting = []
    for hashpart, builders in sorted(by_hash.items()):
        if hashpart in conflict_hashes:
            continue
        known = next((w for p, w in reasons.items() if hashpart in p), None)
        waiting.append(
            {
                "storePath": known["storePath"] if known else hashpart,
                "attestations": len(builders),
                "needed": known["needed"] if known else quorum,
                "builders": sorted(builders),
                "why": known["why"] if known else "not yet seen by the publisher",
            }
        )
    published = sorted(bucket.list_prefix(PUBLISHED), key=lambda item: -item[1])[:recent]
    return {
        "quorum": quorum,
        "publisherUpdatedAt": publisher.get("updatedAt"),
        "waiting": waiting,
        "conflicts": [c for c in conflicts if c],
        "rejected": publisher.get("rejected", []),
        "expired": publisher.get("expired", []),
        "recentlyPublished": [
            {
                "storePath": doc.get("storePath"),
                "publishedAt": doc.get("publishedAt"),
                "builders": doc.get("builders"),
            }
            for key, _ in published
            if (doc := _json(bucket, key)) is not None
        ],
    }


def _json(bucket: Bucket, key: str) -> dict[str, Any] | None:
    data = bucket.get(key)
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
