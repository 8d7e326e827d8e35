"""The metrics the daemon exports (uploader/metrics.py)."""

from __future__ import annotations

import pytest

from uploader._exceptions import ConfigError
from uploader.metrics import Metrics, parse_listen_address


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("9464", ("127.0.0.1", 9464)),
        (":9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
    ],
)
def test_listen_addresses(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(value) == expected


@pytest.mark.parametrize("value", ["", "host:", "host:http", "127.0.0.1:70000", "0"])
def test_bad_listen_addresses_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="metrics address"):
        parse_listen_address(value)


def test_nar_bytes_and_file_bytes_are_counted_apart() -> None:
    """`_nar_bytes_uploaded_total` counts the NARs' uncompressed bytes,
    `_bytes_uploaded_total` what was sent.  Broken, dashboards show no
    compression ratio and a wrong NAR throughput."""
    metrics = Metrics()
    metrics.uploaded(0.1, nar_size=1000, file_size=300)
    value = metrics.registry.get_sample_value
    assert value("nix_cache_uploader_nar_bytes_uploaded_total") == 1000
    assert value("nix_cache_uploader_bytes_uploaded_total") == 300


@pytest.mark.parametrize("value", ["65536", "127.0.0.1:65536", "[::1]:99999"])
def test_metrics_ports_beyond_65535_are_refused(value: str) -> None:
    """Broken, check-config would pass port 65536 and `run` would then die
    with a traceback; 65535 itself stays accepted."""
    with pytest.raises(ConfigError, match="expected PORT or HOST:PORT"):
        parse_listen_address(value)
    assert parse_listen_address("65535") == ("127.0.0.1", 65535)
