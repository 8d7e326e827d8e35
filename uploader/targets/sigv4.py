"""AWS Signature Version 4 in the headers of an S3 request, for the direct
route's small requests (direct.py).

botocore signs the same way (``S3SigV4Auth``), and the tests hold this to it
byte for byte; but it builds a request object, parses its URL and derives
the signing key (four HMACs) for every request: for thousands of tiny store
paths that was a seventh of the uploader's CPU.  Here the signing key is
derived once a day and region, and the caller hands in the parts of the URL
it already has.  Credentials still come from botocore, refreshed as it does.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import threading
from collections.abc import Mapping

__all__ = ["EMPTY_SHA256", "Signer"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_ALGORITHM = "AWS4-HMAC-SHA256"


class Signer:
    """Signs requests to one region's S3 service."""

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._lock = threading.Lock()
        # (secret key, date) -> the day's signing key; one entry at a time.
        self._key: tuple[str, str, bytes] | None = None

    def _signing_key(self, secret: str, date: str) -> bytes:
        with self._lock:
            if self._key is not None and self._key[:2] == (secret, date):
                return self._key[2]
        key = _hmac(("AWS4" + secret).encode(), date)
        for part in (self.region, self.service, "aws4_request"):
            key = _hmac(key, part)
        with self._lock:
            self._key = (secret, date, key)
        return key

    def headers(
        self,
        method: str,
        host: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        payload_sha256: str,
        *,
        access_key: str,
        secret_key: str,
        token: str | None = None,
        now: datetime.datetime | None = None,
    ) -> dict[str, str]:
        """``headers`` with the signature added (Host, X-Amz-Date,
        X-Amz-Content-SHA256, X-Amz-Security-Token, Authorization).

        ``path`` is the request's path as sent (already percent-encoded, as
        S3 wants it signed: not encoded again); ``query`` the canonical query
        string (keys sorted, keys and values percent-encoded), or "";
        ``host`` the Host header (with the port unless it is the default)."""
        stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
        date = stamp[:8]
        signed = {k.lower(): v.strip() for k, v in headers.items()}
        signed["host"] = host
        signed["x-amz-date"] = stamp
        signed["x-amz-content-sha256"] = payload_sha256
        if token:
            signed["x-amz-security-token"] = token
        names = sorted(signed)
        canonical = "\n".join(
            [
                method,
                path,
                query,
                "".join(f"{n}:{signed[n]}\n" for n in names),
                ";".join(names),
                payload_sha256,
            ]
        )
        scope = f"{date}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join(
            [_ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        signature = hmac.new(
            self._signing_key(secret_key, date), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        out = dict(headers)
        out["Host"] = host
        out["X-Amz-Date"] = stamp
        out["X-Amz-Content-SHA256"] = payload_sha256
        if token:
            out["X-Amz-Security-Token"] = token
        out["Authorization"] = (
            f"{_ALGORITHM} Credential={access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        return out


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()
