"""The optional Prometheus endpoint of the daemon (``--metrics ADDR:PORT``).

Bound to 127.0.0.1 unless an address says otherwise.  Series:

- ``nix_cache_uploader_queue_depth``               entries waiting, in flight included
- ``nix_cache_uploader_in_flight``                 entries being uploaded now
- ``nix_cache_uploader_oldest_entry_age_seconds``  age of the oldest waiting entry
- ``nix_cache_uploader_paths_uploaded_total``      store paths uploaded
- ``nix_cache_uploader_bytes_uploaded_total``      compressed NAR bytes uploaded
- ``nix_cache_uploader_nar_bytes_uploaded_total``  uncompressed NAR bytes uploaded
- ``nix_cache_uploader_failures_total{kind}``      failures by error kind
- ``nix_cache_uploader_cache_usable``              0 while credentials are missing or rejected
- ``nix_cache_uploader_upload_seconds``            per-path upload latency (histogram)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from uploader._exceptions import ConfigError

__all__ = ["Metrics", "parse_listen_address", "serve_registry"]

_PREFIX = "nix_cache_uploader_"


def parse_listen_address(value: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT``; the host defaults to 127.0.0.1."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics address {value!r}: expected PORT or HOST:PORT")
    return host, int(port)


class Metrics:
    """The daemon's counters and gauges, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            _PREFIX + "queue_depth", "Spool entries waiting, in flight included", registry=r
        )
        self.in_flight = Gauge(_PREFIX + "in_flight", "Spool entries being uploaded", registry=r)
        self.oldest_age = Gauge(
            _PREFIX + "oldest_entry_age_seconds", "Age of the oldest waiting entry", registry=r
        )
        self.cache_usable = Gauge(
            _PREFIX + "cache_usable",
            "0 while the cache cannot be used at all (no credentials, or rejected ones), else 1; "
            "an unreachable cache shows in failures_total and oldest_entry_age_seconds",
            registry=r,
        )
        self.paths_uploaded = Counter(
            _PREFIX + "paths_uploaded", "Store paths uploaded", registry=r
        )
        self.bytes_uploaded = Counter(
            _PREFIX + "bytes_uploaded", "Compressed NAR bytes uploaded", registry=r
        )
        self.nar_bytes_uploaded = Counter(
            _PREFIX + "nar_bytes_uploaded", "Uncompressed NAR bytes uploaded", registry=r
        )
        self.failures = Counter(
            _PREFIX + "failures", "Failures by kind of error", ["kind"], registry=r
        )
        self.upload_seconds = Histogram(
            _PREFIX + "upload_seconds",
            "Time from reading a path's NAR to its narinfo being visible",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self._server: Any = None

    def watch(
        self,
        queue_depth: Callable[[], float],
        in_flight: Callable[[], float],
        oldest_age: Callable[[], float],
        cache_usable: Callable[[], float],
    ) -> None:
        """Read the gauges from the daemon's state at scrape time."""
        self.cache_usable.set_function(cache_usable)
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)
        self.oldest_age.set_function(oldest_age)

    def uploaded(self, seconds: float, nar_size: int, file_size: int) -> None:
        self.paths_uploaded.inc()
        self.nar_bytes_uploaded.inc(nar_size)
        self.bytes_uploaded.inc(file_size)
        self.upload_seconds.observe(seconds)

    def serve(self, address: str) -> tuple[str, int]:
        self._server, bound = serve_registry(self.registry, address)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def serve_registry(registry: CollectorRegistry, address: str) -> tuple[Any, tuple[str, int]]:
    """Serve ``registry`` at http://ADDRESS/metrics; the server and where it listens."""
    host, port = parse_listen_address(address)
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {e.strerror}") from e
    bound_host, bound_port = server.server_address[:2]
    return server, (str(bound_host), int(bound_port))
