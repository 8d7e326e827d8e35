from __future__ import annotations

import pytest

from uploader._exceptions import ConfigError
from uploader.metrics import parse_listen_address


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
