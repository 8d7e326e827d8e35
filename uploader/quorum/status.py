"""What `quorum status` shows: what waits and why, disputes, recent publications.

The publisher's own status (written after each pass) says why each path
waits and which attestations it counted (from its --builder-key keys, with
their staged NARs checked); the listing of the bucket adds what arrived
since, counting only the publisher's builders, and works with no publisher
running at all.
"""

from __future__ import annotations

import collections
import json
from typing import Any

from uploader.progress import plural
from uploader.quorum.bucket import Bucket
from uploader.quorum.layout import (
    ATTESTATIONS,
    CONFLICTS,
    PUBLISHED,
    is_read_check,
    parse_attestation_key,
)
from uploader.quorum.reports import STATUS_KEY

__all__ = ["quorum_status"]


def quorum_status(bucket: Bucket, quorum: int | None, *, recent: int = 10) -> dict[str, Any]:
    publisher = _json(bucket, STATUS_KEY) or {}
    quorum = quorum or publisher.get("quorum")
    reasons = {_hash_part(str(w["storePath"])): w for w in publisher.get("waiting", [])}
    # The publisher's --builder-key names: only their attestations can count.
    names = publisher.get("builders")
    known_builders = set(names) if isinstance(names, list) else None
    listed: set[str] = set()
    by_hash: dict[str, list[str]] = collections.defaultdict(list)
    for key, _ in bucket.list_prefix(ATTESTATIONS):
        parsed = None if is_read_check(key) else parse_attestation_key(key)
        if parsed is not None:
            listed.add(key)
            by_hash[parsed[0]].append(parsed[1])
    conflicts = [_json(bucket, key) for key, _ in sorted(bucket.list_prefix(CONFLICTS))]
    conflict_hashes = {
        _hash_part(str(c["storePath"])) for c in conflicts if c and c.get("storePath")
    }
    waiting = []
    for hashpart, builders in sorted(by_hash.items()):
        if hashpart in conflict_hashes:
            continue
        known = reasons.get(hashpart)
        if known is not None:
            # What the publisher counted: signatures checked, staged NARs compared.
            counted = sorted(known.get("builders", []))
            entry = {
                "storePath": known["storePath"],
                "attestations": len(counted),
                "needed": known["needed"],
                "builders": counted,
                "why": known["why"],
            }
        elif known_builders is None:
            # No publisher pass yet: nothing says whose keys count, and
            # nothing was checked, so nothing is counted.
            entry = {
                "storePath": hashpart,
                "attestations": 0,
                "needed": quorum,
                "builders": [],
                "why": f"no publisher pass yet: {_listed(builders)}, none checked",
            }
        else:
            counted = sorted(b for b in builders if b in known_builders)
            entry = {
                "storePath": hashpart,
                "attestations": len(counted),
                "needed": quorum,
                "builders": counted,
                "why": "not yet checked by the publisher",
            }
        waiting.append(entry)
    published = sorted(bucket.list_prefix(PUBLISHED), key=lambda item: -item[1])[:recent]
    return {
        "quorum": quorum,
        "publisherUpdatedAt": publisher.get("updatedAt"),
        "waiting": waiting,
        "conflicts": [c for c in conflicts if c],
        # Only those still there: a pass may have deleted them since.
        "rejected": [r for r in publisher.get("rejected", []) if r.get("key") in listed],
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


def _listed(builders: list[str]) -> str:
    return f"{plural(len(builders), 'attestation')} listed ({', '.join(sorted(builders))})"


def _hash_part(store_path_or_hash: str) -> str:
    return store_path_or_hash.rsplit("/", 1)[-1][:32]


def _json(bucket: Bucket, key: str) -> dict[str, Any] | None:
    data = bucket.get(key)
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
