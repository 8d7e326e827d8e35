"""Small S3 requests (HEAD, PUT of narinfos and small NARs, listings)
without boto3's per-request pipeline.

botocore still does what needs care: credentials (environment, profile,
instance role, refreshed when they expire), the endpoint and addressing
style, and SigV4 query signing of each request; urllib3, the transport
botocore itself uses, sends it over a shared connection pool.  Measured here against SeaweedFS, this
makes about 2.5 times as many small requests per second as `put_object` and
`head_object` with a third of the CPU: for thousands of tiny store paths,
botocore's own overhead, not the network, was the limit.

Failures come back as botocore ``ClientError``s shaped like boto3's, so the
S3 target maps them to our errors in one place.  A presigned URL is a
credential while it lasts: failures quote it scrubbed (redact.py), and
urllib3's own "Retrying …" warning, which quotes it whole and comes once per
attempt, is demoted to a debug line.  When a proxy is configured
the target keeps to boto3, which knows how to use it.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import urllib.request
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote

import botocore.exceptions
import botocore.httpsession
import urllib3
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest

from uploader.redact import remember_credentials, scrub

__all__ = ["Listing", "PresignedRequests", "parse_time", "usable_for"]

# Presigned URLs are used at once; a short life limits what a leaked one is worth.
_EXPIRES = 300
_TRANSIENT_STATUS = (429, 500, 502, 503, 504)
_PROBE = "nix-cache-uploader-probe"
# Keys per listing page: S3's maximum.
LIST_PAGE = 1000


class _RetriesAtDebug(logging.Filter):
    """urllib3 warns at each retry of a request; one failure episode is one
    line, logged by whoever gives up or retries later (the daemon, `push`).
    The per-attempt detail is a debug line, kept only when debugging."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith("Retrying"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


_RETRY_FILTER = _RetriesAtDebug()


def usable_for() -> bool:
    """Whether requests may go straight to the endpoint (no proxy configured)."""
    return not urllib.request.getproxies()


class PresignedRequests:
    """HEAD and PUT of small objects through presigned URLs."""

    def __init__(
        self,
        client: Any,
        session: Any,
        bucket: str,
        *,
        max_connections: int,
        max_attempts: int,
        read_timeout: float,
    ) -> None:
        self._session = session
        self._client = client
        self._bucket = bucket
        self._region = client.meta.region_name
        self._base: str | None = None
        retries = urllib3.Retry(
            total=max_attempts - 1,
            backoff_factor=0.2,
            status_forcelist=_TRANSIENT_STATUS,
            allowed_methods=frozenset({"HEAD", "PUT", "GET", "DELETE"}),
            raise_on_status=False,
            respect_retry_after_header=True,
        )
        logging.getLogger("urllib3.connectionpool").addFilter(_RETRY_FILTER)
        self._http = urllib3.PoolManager(
            maxsize=max_connections,
            retries=retries,
            timeout=urllib3.Timeout(connect=10, read=read_timeout),
            ca_certs=os.environ.get("AWS_CA_BUNDLE") or botocore.httpsession.get_cert_path(True),
        )

    @property
    def _prefix(self) -> str:
        """Where objects live (endpoint, addressing style): it does not depend
        on the key, so botocore resolves it once, from a presigned URL for a
        placeholder key (per request, that was a fifth of the CPU).  On first
        use, not at start: signing needs credentials, which may come later."""
        if self._base is None:
            probe = self._client.generate_presigned_url(
                "head_object", Params={"Bucket": self._bucket, "Key": _PROBE}, ExpiresIn=_EXPIRES
            )
            base = probe.split("?", 1)[0]
            if not base.endswith("/" + _PROBE):
                raise ValueError(f"unexpected presigned URL shape: {base}")
            self._base = base[: -len(_PROBE)]
        return self._base

    def head(self, key: str) -> None:
        """Succeeds when the object exists; raises ClientError (404, 403…) otherwise."""
        self._send("HEAD", "HeadObject", key, None, {})

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._send("PUT", "PutObject", key, data, {"Content-Type": content_type})

    def get(self, key: str) -> bytes:
        """A small object's bytes (narinfos); raises ClientError (404, 403…)."""
        return self._send("GET", "GetObject", key, None, {})

    def delete(self, key: str) -> None:
        self._send("DELETE", "DeleteObject", key, None, {})

    def list(self, client: Any, bucket: str, start_after: str, prefix: str = "") -> Listing:
        """One ListObjectsV2 page of the objects directly under ``prefix``
        (the top level by default) after ``start_after``.  Parsed with expat
        alone: botocore's parser costs as much for one page of 1000 keys as a
        few dozen HEADs."""
        url = client.generate_presigned_url(
            "list_objects_v2",
            Params={
                "Bucket": bucket,
                "Delimiter": "/",
                "Prefix": prefix,
                "StartAfter": start_after,
                "MaxKeys": LIST_PAGE,
            },
            ExpiresIn=_EXPIRES,
        )
        try:
            response = self._http.request("GET", url)
        except urllib3.exceptions.HTTPError as e:
            raise _connection_error(e) from None
        if response.status >= 300:
            raise _client_error(response, "ListObjectsV2")
        return Listing.parse(response.data)

    def _signed_url(self, method: str, key: str, headers: dict[str, str]) -> str:
        credentials = self._session.get_credentials()
        if credentials is None:
            raise botocore.exceptions.NoCredentialsError()
        frozen = credentials.get_frozen_credentials()
        remember_credentials(frozen)
        request = AWSRequest(
            method=method, url=self._prefix + quote(key, safe="/~"), headers=headers
        )
        S3SigV4QueryAuth(frozen, "s3", self._region, expires=_EXPIRES).add_auth(request)
        url: str = request.url
        return url

    def _send(
        self, method: str, operation: str, key: str, body: bytes | None, headers: dict[str, str]
    ) -> bytes:
        url = self._signed_url(method, key, headers)
        try:
            response = self._http.request(method, url, body=body, headers=headers)
        except urllib3.exceptions.HTTPError as e:
            raise _connection_error(e) from None
        if response.status >= 300:
            raise _client_error(response, operation)
        data: bytes = response.data
        return data


class Listing:
    """The objects (key, size, LastModified as Unix time) and common prefixes
    of one ListObjectsV2 page."""

    def __init__(
        self, objects: list[tuple[str, int, float]], prefixes: list[str], truncated: bool
    ) -> None:
        self.objects = objects
        self.prefixes = prefixes
        self.truncated = truncated

    @property
    def keys(self) -> list[str]:
        """Object keys and prefixes together, as the existence checks want them."""
        return [k for k, _, _ in self.objects] + self.prefixes

    @classmethod
    def parse(cls, body: bytes) -> Listing:
        try:
            root = ET.fromstring(body)
        except ET.ParseError as e:
            raise ValueError(f"unreadable ListObjectsV2 answer: {e}") from e
        objects: list[tuple[str, int, float]] = []
        prefixes: list[str] = []
        truncated = False
        for child in root:
            tag = _local(child.tag)
            if tag == "Contents":
                fields = {_local(c.tag): c.text or "" for c in child}
                size = fields.get("Size", "")
                objects.append(
                    (
                        fields.get("Key", ""),
                        int(size) if size.isdigit() else -1,
                        parse_time(fields.get("LastModified", "")),
                    )
                )
            elif tag == "CommonPrefixes":
                prefixes.extend(c.text or "" for c in child if _local(c.tag) == "Prefix")
            elif tag == "IsTruncated":
                truncated = (child.text or "").strip().lower() == "true"
        return cls(objects, prefixes, truncated)


def parse_time(text: str) -> float:
    """LastModified as S3 writes it (ISO 8601, ``2024-05-01T12:00:00.000Z``)
    as Unix time; 0 (the oldest possible) when missing or unreadable."""
    try:
        stamp = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    return stamp.timestamp()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _connection_error(e: urllib3.exceptions.HTTPError) -> ConnectionError:
    """The failure, without the signed URL urllib3 quotes (nor the chain to
    the exception that holds it: a traceback would print it)."""
    return ConnectionError(scrub(f"{type(e).__name__}: {e}"))


def _client_error(response: urllib3.BaseHTTPResponse, operation: str) -> Exception:
    text = response.data.decode("utf-8", "replace") if response.data else ""
    code = _tag(text, "Code") or str(response.status)
    message = _tag(text, "Message") or response.reason or ""
    error: Exception = botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {
                "HTTPStatusCode": response.status,
                "HTTPHeaders": {k.lower(): v for k, v in response.headers.items()},
            },
        },
        operation,
    )
    return error


def _tag(xml: str, name: str) -> str | None:
    match = re.search(rf"<{name}>(.*?)</{name}>", xml, re.S)
    return match.group(1) if match else None
