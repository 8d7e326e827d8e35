"""Store URLs in Nix's own syntax.

``s3://BUCKET?region=R&endpoint=http://HOST:PORT&profile=P&compression=zstd``
(also the older ``endpoint=HOST:PORT&scheme=http``) and ``file:///DIR``.
Parameters Nix knows but that change nothing here are accepted with a
warning; anything else is an error, so a typo never goes unnoticed.  The
ones honoured are checked here, before anything touches the cache.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from dataclasses import dataclass, field

from uploader._exceptions import ConfigError
from uploader.compression import check_method

__all__ = ["StoreUrl", "parse_store_url"]

# What S3 servers take for a bucket name: AWS's rules for new buckets are
# stricter (lower case, no '_', at most 63), but older buckets and other
# servers have the rest; a name outside this, botocore refuses before sending.
_BUCKET_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{1,253})[A-Za-z0-9]")

log = logging.getLogger(__name__)

_S3_PARAMS = {"region", "endpoint", "scheme", "profile", "addressing-style"}
_ADDRESSING_STYLES = ("auto", "path", "virtual")
# Nix's spellings of a boolean setting.
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
_COMMON_PARAMS = {
    "compression",
    "compression-level",
    "secret-key",
    "priority",
    "want-mass-query",
    "write-nar-listing",
}
# Accepted for compatibility with URLs written for `nix copy`; they tune Nix's
# own writer and have no counterpart here.
_IGNORED_PARAMS = {
    "parallel-compression",
    "multipart-upload",
    "multipart-chunk-size",
    "multipart-threshold",
    "buffer-size",
    "write-debug-info",
    "ls-compression",
    "narinfo-compression",
    "log-compression",
    "trusted",
    "index-debug-info",
}


@dataclass(frozen=True)
class StoreUrl:
    """A parsed binary cache URL."""

    scheme: str  # "s3" or "file"
    bucket: str = ""  # s3 only
    path: str = ""  # file only: the cache directory
    params: dict[str, str] = field(default_factory=dict)
    raw: str = ""

    @property
    def endpoint_url(self) -> str | None:
        """The S3 endpoint as a URL, from either of Nix's two spellings."""
        endpoint = self.params.get("endpoint")
        if not endpoint:
            return None
        if "://" in endpoint:
            return endpoint
        return f"{self.params.get('scheme', 'https')}://{endpoint}"

    @property
    def compression(self) -> str | None:
        return self.params.get("compression")

    @property
    def write_nar_listing(self) -> bool:
        """Nix's ``write-nar-listing=true``: a ``<hash>.ls`` beside each narinfo."""
        return _BOOLEANS[self.params.get("write-nar-listing", "false")]

    @property
    def secret_key_file(self) -> str | None:
        """Nix's own way to name the signing key: ``secret-key=PATH``."""
        return self.params.get("secret-key") or None

    def cache_info(self) -> str:
        """The ``nix-cache-info`` to write, with ``priority=`` and ``want-mass-query=``."""
        mass_query = _BOOLEANS[self.params.get("want-mass-query", "true")]
        return (
            "StoreDir: /nix/store\n"
            f"WantMassQuery: {int(mass_query)}\n"
            f"Priority: {self.params.get('priority', '40')}\n"
        )

    def redacted(self) -> str:
        """The URL for logs: without a secret-key parameter's path."""
        if "secret-key" not in self.params:
            return self.raw
        shown = {k: ("…" if k == "secret-key" else v) for k, v in self.params.items()}
        base = f"s3://{self.bucket}" if self.scheme == "s3" else f"file://{self.path}"
        return base + "?" + "&".join(f"{k}={v}" for k, v in shown.items())

    def __str__(self) -> str:
        return self.redacted()


def parse_store_url(url: str) -> StoreUrl:
    """Parse and check a store URL; ConfigError says what is wrong."""
    parts = urllib.parse.urlsplit(url)
    try:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        if parts.query:
            raise ConfigError(
                f"store URL {url!r}: cannot parse the query {parts.query!r}"
            ) from None
        pairs = []
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise ConfigError(f"store URL {url!r}: parameter {key!r} given twice")
        params[key] = value
    if parts.scheme == "s3":
        bucket = parts.netloc
        if len(bucket) < 3 or parts.path not in ("", "/"):
            raise ConfigError(
                f"store URL {url!r}: expected s3://BUCKET?region=…&endpoint=… "
                "(bucket names have at least 3 characters, no path)"
            )
        if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
            raise ConfigError(
                f"store URL {url!r}: {bucket!r} is not an S3 bucket name: bucket names are "
                "letters, digits, '.' and '-' (and '_' in old buckets), beginning and "
                "ending with a letter or digit, without '..'"
            )
        allowed = _S3_PARAMS | _COMMON_PARAMS
        result = StoreUrl(scheme="s3", bucket=bucket, params=params, raw=url)
    elif parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(f"store URL {url!r}: expected file:///ABSOLUTE/DIR")
        allowed = _COMMON_PARAMS
        result = StoreUrl(scheme="file", path=parts.path.rstrip("/") or "/", params=params, raw=url)
    elif not parts.scheme and url.startswith("/"):
        raise ConfigError(f"store URL {url!r} is a path: write file://{url} for a directory")
    else:
        raise ConfigError(
            f"store URL {url!r}: unsupported scheme {parts.scheme!r}; "
            "use s3://BUCKET?… or file:///DIR"
        )
    for key in params:
        if key in _IGNORED_PARAMS:
            log.warning("store URL parameter %s has no effect on nix-cache-uploader", key)
        elif key not in allowed:
            raise ConfigError(
                f"store URL {url!r}: unknown parameter {key!r} "
                f"(known: {', '.join(sorted(allowed))})"
            )
    for key in ("endpoint", "region", "profile"):
        if key in params and not params[key]:
            raise ConfigError(f"store URL {url!r}: parameter {key!r} is empty")
    if "scheme" in params and params["scheme"] not in ("http", "https"):
        raise ConfigError(f"store URL {url!r}: scheme must be http or https")
    _check_values(url, result)
    if "compression-level" in params:
        # int() is what reads the level later; isdigit() would let "--3" or "³" by.
        try:
            int(params["compression-level"])
        except ValueError:
            raise ConfigError(f"store URL {url!r}: compression-level must be an integer") from None
    # The level's range is checked against the method in use, which a flag
    # or the config file may set instead of the URL (cli's compression_for).
    if result.compression is not None:
        try:
            check_method(result.compression)
        except ConfigError as e:
            raise ConfigError(f"store URL {url!r}: {e}") from None
    return result


def _check_values(url: str, result: StoreUrl) -> None:
    """What boto3 or Nix would only refuse later, with a traceback or silently."""
    params = result.params
    style = params.get("addressing-style")
    if style is not None and style not in _ADDRESSING_STYLES:
        raise ConfigError(
            f"store URL {url!r}: addressing-style must be one of {', '.join(_ADDRESSING_STYLES)}"
        )
    endpoint = result.endpoint_url
    if endpoint is not None:
        parts = urllib.parse.urlsplit(endpoint)
        try:
            parts.port  # noqa: B018 - raises ValueError when out of range
        except ValueError:
            raise ConfigError(
                f"store URL {url!r}: endpoint {endpoint!r} has an invalid port"
            ) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"store URL {url!r}: endpoint must be http(s)://HOST[:PORT] or HOST[:PORT]"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            # botocore would put the bucket after the path: the objects
            # would land in another bucket (the path's first part).
            raise ConfigError(
                f"store URL {url!r}: endpoint {endpoint!r} has a path or query; give "
                "http(s)://HOST[:PORT] only (the bucket is the URL's BUCKET)"
            )
    priority = params.get("priority")
    if priority is not None and not (priority.isascii() and priority.isdigit()):
        raise ConfigError(f"store URL {url!r}: priority must be a non-negative integer")
    for flag in ("want-mass-query", "write-nar-listing"):
        if params.get(flag, "true") not in _BOOLEANS:
            raise ConfigError(f"store URL {url!r}: {flag} must be true or false")
    if "secret-key" in params and not os.path.isabs(params["secret-key"]):
        raise ConfigError(f"store URL {url!r}: secret-key must be an absolute path")
