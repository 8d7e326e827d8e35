"""The Prometheus endpoint serves the queue and upload series during a drain."""

from __future__ import annotations

import re
import urllib.request

import pytest

from tests.integration.test_daemon import dag_expr
from tests.support.daemon import UploaderRun
from tests.support.nix import build
from tests.support.services import free_ports

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    series = {}
    for line in text.splitlines():
        m = re.match(r"^(nix_cache_uploader_[a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            series[m.group(1)] = float(m.group(2))
    return series


def test_metrics_follow_a_drain(uploader: UploaderRun) -> None:
    (port,) = free_ports(1)
    uploader.extra_args = ["--metrics", str(port)]
    outputs = build(dag_expr(12), hook=str(uploader.hook))
    uploader.start()
    during = scrape(port)
    for name in (
        "nix_cache_uploader_queue_depth",
        "nix_cache_uploader_in_flight",
        "nix_cache_uploader_oldest_entry_age_seconds",
        "nix_cache_uploader_paths_uploaded_total",
        "nix_cache_uploader_bytes_uploaded_total",
        "nix_cache_uploader_upload_seconds_count",
    ):
        assert name in during, f"{name} missing from /metrics"
    uploader.wait_drained()
    after = scrape(port)
    assert after["nix_cache_uploader_paths_uploaded_total"] == len(outputs)
    assert after["nix_cache_uploader_upload_seconds_count"] == len(outputs)
    assert after["nix_cache_uploader_bytes_uploaded_total"] > 0
    assert after["nix_cache_uploader_queue_depth"] == 0
    assert after["nix_cache_uploader_in_flight"] == 0

    # A bad entry shows up as a failure of its kind.
    (uploader.spool / "junk.entry").write_bytes(b"not an entry\n")
    uploader.wait_drained()
    assert scrape(port)['nix_cache_uploader_failures_total{kind="quarantined"}'] == 1


def test_metrics_listen_on_loopback_by_default(uploader: UploaderRun) -> None:
    (port,) = free_ports(1)
    uploader.extra_args = ["--metrics", str(port)]
    uploader.start()
    assert f"serving metrics at http://127.0.0.1:{port}/metrics" in uploader.log()
