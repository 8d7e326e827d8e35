"""Our SigV4 header signature equals botocore's, byte for byte."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterator
from unittest import mock
from urllib.parse import quote

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from uploader.targets.sigv4 import EMPTY_SHA256, Signer

NOW = datetime.datetime(2026, 11, 27, 21, 5, 9, tzinfo=datetime.UTC)


@pytest.fixture(autouse=True)
def frozen_clock() -> Iterator[None]:
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        yield


def botocore_headers(
    method: str, url: str, body: bytes | None, headers: dict[str, str], creds: Credentials,
    region: str,
) -> dict[str, str]:  # fmt: skip
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    request.context["payload_signing_enabled"] = True
    S3SigV4Auth(creds, "s3", region).add_auth(request)
    return dict(request.headers.items())


def ours(
    method: str, origin_host: str, path: str, query: dict[str, str], body: bytes | None,
    headers: dict[str, str], creds: Credentials, region: str,
) -> dict[str, str]:  # fmt: skip
    canonical = "&".join(
        f"{k}={v}" for k, v in sorted((quote(k, safe="~"), quote(v, safe="~"))
                                     for k, v in query.items())
    )  # fmt: skip
    return Signer(region).headers(
        method, origin_host, path, canonical, headers,
        hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256,
        access_key=creds.access_key, secret_key=creds.secret_key, token=creds.token, now=NOW,
    )  # fmt: skip


CASES = [
    ("PUT", "127.0.0.1:8333", "/bucket/abc.narinfo", {}, b"StorePath: x\n",
     {"Content-Type": "text/x-nix-narinfo"}, None, "us-east-1"),
    ("HEAD", "127.0.0.1:8333", "/bucket/nix-cache-info", {}, None, {}, "session-token", "auto"),
    ("GET", "s3.example.org", "/bucket", {"list-type": "2", "delimiter": "/", "prefix": "nar/",
     "start-after": "nar/0a b~c", "max-keys": "1000"}, None, {}, None, "eu-west-3"),
    ("DELETE", "bucket.s3.amazonaws.com", "/nar/x%20y.nar.zst", {}, None, {}, None, "us-east-1"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fixed_requests_sign_like_botocore(case: tuple) -> None:  # type: ignore[type-arg]
    method, host, path, query, body, headers, token, region = case
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    query_string = "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in query.items())
    url = f"http://{host}{path}" + (f"?{query_string}" if query_string else "")
    expected = botocore_headers(method, url, body, headers, creds, region)
    got = ours(method, host, path, query, body, headers, creds, region)
    assert got["Authorization"] == expected["Authorization"]
    assert got["X-Amz-Date"] == expected["X-Amz-Date"] == "20261127T210509Z"
    assert got["X-Amz-Content-SHA256"] == expected["X-Amz-Content-SHA256"]
    assert got.get("X-Amz-Security-Token") == expected.get("X-Amz-Security-Token")


keys = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               min_size=1, max_size=30)  # fmt: skip


@settings(max_examples=200)
@given(key=keys, body=st.binary(max_size=300), prefix=keys, secret=st.text(min_size=1))
def test_any_key_and_query_signs_like_botocore(
    key: str, body: bytes, prefix: str, secret: str
) -> None:
    creds = Credentials("AKID", secret)
    path = "/bucket/" + quote(key, safe="/~")
    nar = {"Content-Type": "application/x-nix-nar"}
    put = botocore_headers("PUT", f"http://127.0.0.1:9000{path}", body, nar, creds, "us-east-1")
    signed = ours("PUT", "127.0.0.1:9000", path, {}, body, nar, creds, "us-east-1")
    assert signed["Authorization"] == put["Authorization"]
    query = {"prefix": prefix, "start-after": key, "list-type": "2"}
    query_string = "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in query.items())
    listing = botocore_headers("GET", f"http://127.0.0.1:9000/bucket?{query_string}", None, {},
                               creds, "us-east-1")  # fmt: skip
    assert ours("GET", "127.0.0.1:9000", "/bucket", query, None, {}, creds,
                "us-east-1")["Authorization"] == listing["Authorization"]  # fmt: skip


def test_the_signing_key_is_derived_once_a_day() -> None:
    signer = Signer("us-east-1")
    with mock.patch("uploader.targets.sigv4._hmac", wraps=__import__(
            "uploader.targets.sigv4", fromlist=["_hmac"])._hmac) as derive:  # fmt: skip
        for _ in range(5):
            signer.headers("HEAD", "h", "/b/k", "", {}, EMPTY_SHA256,
                           access_key="a", secret_key="s", now=NOW)  # fmt: skip
        assert derive.call_count == 4  # date, region, service, aws4_request
        signer.headers("HEAD", "h", "/b/k", "", {}, EMPTY_SHA256, access_key="a",
                       secret_key="s", now=NOW + datetime.timedelta(days=1))  # fmt: skip
        assert derive.call_count == 8
