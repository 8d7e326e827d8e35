"""What scrubbing removes from text, and what it leaves for the reader."""

from __future__ import annotations

import io
import json
import logging

import pytest

from uploader import redact
from uploader.redact import REDACTED, RedactingFormatter, scrub
from uploader.state import write_status

PRESIGNED = (
    "http://127.0.0.1:8333/cache/abc.narinfo?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host"
    "&X-Amz-Security-Token=FQoGZXIvYXdzEXAMPLETOKEN&X-Amz-Signature=0123abcd"
)


@pytest.mark.parametrize(
    "text",
    [
        f"Max retries exceeded with url: {PRESIGNED} (Caused by NewConnectionError)",
        f"'{PRESIGNED}'",
        "GET /cache/x?Signature=abc%2B&AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&Expires=1",
        "Authorization: AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20240101/us-east-1/"
        "s3/aws4_request, SignedHeaders=host;x-amz-date, Signature=fe5f80f77d5fa3beca038a24",
        "{'X-Amz-Security-Token': 'FQoGZXIvYXdzEXAMPLETOKEN', 'x-amz-date': '20240101'}",
        # SigV2 parameters without a URL's '?' (a query string logged on its own).
        "AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&Expires=1&Signature=fe5f80f77d%2B",
        # SigV2's Authorization header, and the parameters of a request as a dict.
        "Authorization: AWS AKIAIOSFODNN7EXAMPLE:fe5f80f77d5fa3beca038a24+/=",
        "Authorization: AWS minio_0123abcd:fe5f80f77d5fa3beca038a24AB+/EXAMPLETOKEN=",
        "{'AWSAccessKeyId': 'AKIAIOSFODNN7EXAMPLE', \"Signature\": \"fe5f80f77d+\"}",
    ],
)
def test_signing_material_is_removed(text: str) -> None:
    cleaned = scrub(text)
    for needle in ("x-amz-", "AKIAIOSFODNN7EXAMPLE", "fe5f80f77d", "0123abcd", "EXAMPLETOKEN"):
        assert needle.lower() not in cleaned.lower(), cleaned
    assert REDACTED in cleaned


def test_what_failed_stays_readable() -> None:
    cleaned = scrub(f"uploading s3://cache/abc.narinfo: {PRESIGNED} timed out")
    assert cleaned.startswith("uploading s3://cache/abc.narinfo: ")
    assert "http://127.0.0.1:8333/cache/abc.narinfo?" + REDACTED + " timed out" in cleaned
    # Unsigned URLs and ordinary words are left alone.
    for text in (
        "http://h/cache?versionId=3",
        "lacks a valid signature: see the key",
        "the signature: 'cache-1' is not trusted",
        "AWS region: eu-west-1",
        "AWS AccessDeniedException:User arn:aws:iam::123:user/ci is not authorized",
    ):
        assert scrub(text) == text


# Any one signing parameter marks a query as signed, and all of it goes: the
# rest may name the signer too (a CloudFront signed URL's Key-Pair-Id).
@pytest.mark.parametrize(
    "query",
    [
        "X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20240101T000000Z",
        "Expires=1700000000&Signature=fe5f80f77d~5fa3&Key-Pair-Id=APKAEIBAERJR2EXAMPLE",
        "AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&Expires=1700000000",
    ],
)
def test_a_signed_query_goes_whole(query: str) -> None:
    url = "https://cache.example.org/nar/abc.nar.zst"
    assert scrub(f"fetching {url}?{query} timed out") == f"fetching {url}?{REDACTED} timed out"


def test_remembered_credentials_are_removed_raw_and_url_encoded() -> None:
    redact.remember("AKIAREMEMBERED000001", "wJalr/XUtnFEMI+K7MDENG==", None, "short")
    text = "id AKIAREMEMBERED000001 secret wJalr/XUtnFEMI+K7MDENG== "
    text += "wJalr%2FXUtnFEMI%2BK7MDENG%3D%3D"
    assert scrub(text) == f"id {REDACTED} secret {REDACTED} {REDACTED}"
    assert scrub("short") == "short", "values this short are not treated as secrets"


def test_formatter_scrubs_message_arguments_and_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test-redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("failed: %s", PRESIGNED)
        try:
            raise ConnectionError(PRESIGNED)
        except ConnectionError:
            logger.exception("unexpected")
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert "Traceback" in written and "ConnectionError" in written
    assert "x-amz-" not in written.lower(), written


def test_status_file_is_scrubbed(tmp_path: object) -> None:
    directory = str(tmp_path)
    write_status(directory, {"last_errors": [{"error": f"uploading: {PRESIGNED}"}]})
    with open(f"{directory}/status.json") as f:
        text = f.read()
    assert "x-amz-" not in text.lower()
    assert json.loads(text)["last_errors"][0]["error"].startswith("uploading: http://")


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("upstream https://alice:s3cr3t-T0ken@cache.example.org unreachable", "https://alice:"),
        ("'http://ci:p%40ss@10.0.0.1:8080/x.narinfo'", "http://ci:"),
    ],
)
def test_a_password_in_a_url_is_removed(text: str, kept: str) -> None:
    cleaned = scrub(text)
    assert "s3cr3t" not in cleaned and "p%40ss" not in cleaned, cleaned
    assert kept in cleaned and REDACTED in cleaned


def test_urls_without_a_password_stay_as_they_are() -> None:
    for text in ("http://127.0.0.1:8333/cache", "s3://bucket?endpoint=http://h:1", "git@host:x"):
        assert scrub(text) == text
