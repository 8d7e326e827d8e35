"""Store URLs in Nix's syntax: what parses, what it means, and what is refused."""

from __future__ import annotations

import logging

import pytest

from uploader._exceptions import ConfigError
from uploader.targets.url import parse_store_url


def test_s3_url_with_every_parameter() -> None:
    url = parse_store_url(
        "s3://my-cache?region=eu-west-1&endpoint=http://127.0.0.1:8333"
        "&profile=ci&compression=xz&compression-level=9"
    )
    assert url.scheme == "s3"
    assert url.bucket == "my-cache"
    assert url.params["region"] == "eu-west-1"
    assert url.params["profile"] == "ci"
    assert url.endpoint_url == "http://127.0.0.1:8333"
    assert url.compression == "xz"
    assert url.params["compression-level"] == "9"


def test_older_endpoint_and_scheme_spelling() -> None:
    url = parse_store_url("s3://my-cache?endpoint=minio.local:9000&scheme=http")
    assert url.endpoint_url == "http://minio.local:9000"


def test_endpoint_without_scheme_defaults_to_https() -> None:
    url = parse_store_url("s3://my-cache?endpoint=s3.example.org")
    assert url.endpoint_url == "https://s3.example.org"


def test_plain_s3_url_uses_aws_defaults() -> None:
    url = parse_store_url("s3://my-cache")
    assert url.endpoint_url is None
    assert url.compression is None
    assert url.params == {}


def test_percent_encoded_values_are_decoded() -> None:
    url = parse_store_url("s3://my-cache?endpoint=http%3A%2F%2F127.0.0.1%3A8333")
    assert url.endpoint_url == "http://127.0.0.1:8333"


@pytest.mark.parametrize(
    ("text", "directory"),
    [
        ("file:///var/cache/nix", "/var/cache/nix"),
        ("file:///var/cache/nix/", "/var/cache/nix"),
        ("file://localhost/srv/cache", "/srv/cache"),
        ("file:///srv/cache?compression=none", "/srv/cache"),
    ],
)
def test_file_url(text: str, directory: str) -> None:
    url = parse_store_url(text)
    assert url.scheme == "file"
    assert url.path == directory


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("s3://my-cache?regoin=eu-west-1", "unknown parameter 'regoin'"),
        ("s3://my-cache?region=a&region=b", "parameter 'region' given twice"),
        ("s3://my-cache?endpoint=", "parameter 'endpoint' is empty"),
        ("s3://my-cache?region=", "parameter 'region' is empty"),
        ("s3://ab", "at least 3 characters"),
        ("s3://my-cache/sub/dir", "no path"),
        # botocore refuses these before sending anything; the server, the rest.
        ("s3://bad_bucket!?endpoint=http://h:1", "'bad_bucket!' is not an S3 bucket name"),
        ("s3://my..cache", "'my..cache' is not an S3 bucket name"),
        ("s3://-cache", "beginning and ending with a letter or digit"),
        ("s3://cache.", "beginning and ending with a letter or digit"),
        ("s3://my%20cache", "is not an S3 bucket name"),
        (f"s3://{'a' * 256}", "is not an S3 bucket name"),
        ("s3://my-cache?endpoint=h:1&scheme=ftp", "scheme must be http or https"),
        ("http://cache.example.org", "unsupported scheme 'http'"),
        ("cache.example.org", "unsupported scheme ''"),
        ("/srv/cache", "is a path: write file:///srv/cache for a directory"),
        ("file://relative/dir", "expected file:///ABSOLUTE/DIR"),
        ("file:relative/dir", "expected file:///ABSOLUTE/DIR"),
        ("file:///srv/cache?endpoint=http://h:1", "unknown parameter 'endpoint'"),
        ("s3://my-cache?compression=gzip", "unsupported compression 'gzip'"),
        ("s3://my-cache?compression-level=high", "compression-level must be an integer"),
        ("s3://my-cache?compression-level=--3", "compression-level must be an integer"),
        ("s3://my-cache?compression-level=", "compression-level must be an integer"),
        ("s3://my-cache?region=a&&b", "cannot parse the query"),
    ],
)
def test_mistakes_are_refused_with_a_reason(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_store_url(text)
    assert says in str(error.value)
    assert text.split("?")[0] in str(error.value), "the message names the URL"


def test_unknown_parameter_error_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"known: .*endpoint.*region"):
        parse_store_url("s3://my-cache?regoin=x")


@pytest.mark.parametrize("level", ["-5", "0", "19"])
def test_integer_compression_levels_parse(level: str) -> None:
    url = parse_store_url(f"s3://my-cache?compression=zstd&compression-level={level}")
    assert int(url.params["compression-level"]) == int(level)


def test_nix_only_parameters_warn_but_parse(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="uploader.targets.url"):
        url = parse_store_url("s3://my-cache?parallel-compression=true&write-debug-info=1")
    assert url.bucket == "my-cache"
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "parallel-compression" in warned
    assert "write-debug-info" in warned


def test_write_nar_listing_is_honoured_in_nix_spellings() -> None:
    assert parse_store_url("s3://my-cache?write-nar-listing=1").write_nar_listing
    assert parse_store_url("file:///c?write-nar-listing=true").write_nar_listing
    assert not parse_store_url("file:///c?write-nar-listing=false").write_nar_listing
    assert not parse_store_url("file:///c").write_nar_listing
    with pytest.raises(ConfigError, match="write-nar-listing must be true or false"):
        parse_store_url("file:///c?write-nar-listing=maybe")


def test_redacted_hides_the_secret_key() -> None:
    text = "s3://my-cache?region=eu-west-1&secret-key=/run/keys/cache.secret"
    url = parse_store_url(text)
    shown = url.redacted()
    assert "/run/keys/cache.secret" not in shown
    assert "cache.secret" not in str(url)
    assert "region=eu-west-1" in shown
    assert shown.startswith("s3://my-cache?")


def test_redacted_without_a_secret_key_is_the_url() -> None:
    text = "file:///srv/cache?compression=xz"
    assert parse_store_url(text).redacted() == text


@pytest.mark.parametrize("bucket", ["abc", "my-cache.example.org", "Old_Bucket", "0cache9"])
def test_bucket_names_s3_servers_take_are_accepted(bucket: str) -> None:
    assert parse_store_url(f"s3://{bucket}/?region=eu-west-1").bucket == bucket


def test_want_mass_query_and_priority_reach_nix_cache_info() -> None:
    """Broken, want-mass-query=false would be ignored and Nix clients would
    query the cache in bulk anyway."""
    url = parse_store_url("file:///srv/cache?want-mass-query=false&priority=30")
    assert url.cache_info() == "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 30\n"


@pytest.mark.parametrize("priority", ["³", "٣"])  # digits to str.isdigit, not to Nix
def test_a_priority_of_other_digits_is_refused(priority: str) -> None:
    """Broken, `priority=³` would be accepted and written into nix-cache-info,
    where Nix cannot read it."""
    with pytest.raises(ConfigError, match="priority must be a non-negative integer"):
        parse_store_url(f"file:///srv/cache?priority={priority}")
