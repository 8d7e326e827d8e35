"""The publisher's Prometheus endpoint (``publish --metrics [HOST:]PORT``),
bound to 127.0.0.1 unless an address says otherwise.  Series:

- ``nix_cache_uploader_quorum_published_total``     paths signed and published
- ``nix_cache_uploader_quorum_waiting``             paths with attestations short of the quorum
- ``nix_cache_uploader_quorum_conflicts``           paths whose builders disagree (never signed)
- ``nix_cache_uploader_quorum_rejected_total``      attestations found not counted (bad signature, unknown key, NAR mismatch), each once
- ``nix_cache_uploader_quorum_expired_total``       attestations removed after waiting too long
- ``nix_cache_uploader_quorum_pass_failures_total`` passes that failed (and are retried)
- ``nix_cache_uploader_quorum_last_pass_timestamp_seconds``  when the last pass ended well
- ``nix_cache_uploader_quorum_pass_seconds``        duration of a pass (histogram)
"""  # noqa: E501

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from uploader.metrics import serve_registry
from uploader.quorum.publish import PassResult

__all__ = ["PublisherMetrics"]

_PREFIX = "nix_cache_uploader_quorum_"


class PublisherMetrics:
    """The publisher's counters and gauges, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.published = Counter(_PREFIX + "published", "Paths signed and published", registry=r)
        self.waiting = Gauge(_PREFIX + "waiting", "Paths short of the quorum", registry=r)
        self.conflicts = Gauge(_PREFIX + "conflicts", "Paths whose builders disagree", registry=r)
        self.rejected = Counter(
            _PREFIX + "rejected", "Attestations found not counted, each once", registry=r
        )
        self.expired = Counter(_PREFIX + "expired", "Attestations expired", registry=r)
        self.failures = Counter(_PREFIX + "pass_failures", "Passes that failed", registry=r)
        self.last_pass = Gauge(
            _PREFIX + "last_pass_timestamp_seconds", "When the last pass ended well", registry=r
        )
        self.pass_seconds = Histogram(
            _PREFIX + "pass_seconds",
            "Duration of a publishing pass",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
            registry=r,
        )
        # The attestations not counted that the last pass left in the bucket:
        # counted already, not again while they stay.
        self._rejected_seen: set[str] = set()

    def serve(self, address: str) -> tuple[str, int]:
        _, bound = serve_registry(self.registry, address)
        return bound

    def record(self, result: PassResult, seconds: float) -> None:
        self.published.inc(len(result.published))
        self.waiting.set(len(result.waiting))
        self.conflicts.set(len(result.conflicts))
        rejected = {r["key"] for r in result.rejected}
        self.rejected.inc(len(rejected - self._rejected_seen))
        self._rejected_seen = rejected - result.removed
        self.expired.inc(len(result.expired))
        self.pass_seconds.observe(seconds)
        self.last_pass.set(time.time())

    def failed(self) -> None:
        self.failures.inc()
