"""The S3 target against servers that are not S3 at all, on loopback: one
that accepts connections and never answers, one that speaks plain HTTP where
the URL's endpoint (no scheme) means HTTPS.  What a user sees is the point."""

from __future__ import annotations

import contextlib
import http.server
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.rawserver import tcp_server
from uploader._exceptions import ConfigError, TargetError
from uploader.redact import scrub
from uploader.targets.s3 import S3Target
from uploader.targets.url import parse_store_url


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """Accepts connections and reads requests, never answers."""
    with tcp_server() as (port, _):
        yield port


@contextlib.contextmanager
def plain_http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_server_that_stops_answering_is_said_at_once_not_after_every_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with silent_server() as port:
        url = parse_store_url(f"s3://silent?endpoint=http://127.0.0.1:{port}")
        target = S3Target(url, max_attempts=2, read_timeout=0.3)
        with caplog.at_level(logging.WARNING), pytest.raises(TargetError):
            target.get("nix-cache-info")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no answer in time" in w and "attempt 2 of 2" in w for w in warned), warned


def test_a_stalled_part_is_said_at_its_first_timeout_and_the_end_names_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The parts of a streamed NAR go through botocore, which retries on its
    own: its timeouts are said as the small requests' are."""
    with silent_server() as port:
        url = parse_store_url(f"s3://silent?endpoint=http://127.0.0.1:{port}")
        target = S3Target(url, max_attempts=2, read_timeout=0.3)
        with caplog.at_level(logging.WARNING), pytest.raises(TargetError) as failed:
            target.start_upload("nar/x.nar.zst", "application/x-nix-nar")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "CreateMultipartUpload s3://silent/nar/x.nar.zst: no answer in time "
        "(ReadTimeoutError); attempt 2 of 2"
    ], warned
    assert "\n" not in str(failed.value) and "uploadId" not in str(failed.value)
    with silent_server() as port:
        url = parse_store_url(f"s3://silent?endpoint=http://127.0.0.1:{port}")
        target = S3Target(url, max_attempts=2, read_timeout=0.3)
        with pytest.raises(TargetError) as failed:
            target.get("nix-cache-info")
    assert "no answer in time in 2 attempts" in str(failed.value)
    assert "check that it is up and reachable" in str(failed.value)


def test_an_endpoint_without_a_scheme_on_a_plain_http_server_says_to_add_one() -> None:
    with plain_http_server() as port:
        url = parse_store_url(f"s3://plain?endpoint=127.0.0.1:{port}")
        target = S3Target(url, max_attempts=1, read_timeout=5)
        with pytest.raises(TargetError) as failed:
            target.get("nix-cache-info")
    assert f"write endpoint=http://127.0.0.1:{port}" in str(failed.value)


def test_an_aws_profile_from_the_environment_that_does_not_exist_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_PROFILE", "nosuch")
    with pytest.raises(ConfigError, match="AWS_PROFILE=nosuch: no such AWS profile"):
        S3Target(parse_store_url("s3://bucket?endpoint=http://127.0.0.1:9"))


class _Forbidding(http.server.BaseHTTPRequestHandler):
    """Every request refused as S3 refuses a missing permission."""

    def _deny(self) -> None:
        body = (
            b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
            b"<Message>Access Denied</Message></Error>"
        )
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_DELETE = do_HEAD = do_POST = _deny

    def log_message(self, *args: object) -> None:
        pass


def test_a_refused_request_names_the_permission_it_needs() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidding)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        target = S3Target(parse_store_url(f"s3://denied?endpoint=http://127.0.0.1:{port}"))
        for attempt, permission in [
            (lambda: target.put_bytes("x.narinfo", b"x", "text/plain"), "s3:PutObject"),
            (lambda: target.delete("x.narinfo"), "s3:DeleteObject"),
            (lambda: target.list_objects("nar/", ""), "s3:ListBucket"),
        ]:
            with pytest.raises(TargetError) as refused:
                attempt()
            assert str(refused.value).endswith(f"(this needs the {permission} permission)")
            assert str(refused.value).count("this needs") == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_credentials_from_a_profile_never_appear_in_what_is_said(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Credentials from the environment are known to the log's scrubber at
    start; those of a profile (or an instance role) only once they sign a
    request. A server quoting the access key id in its refusal must not
    put it in an error, a log line or the status file."""
    key_id, secret = "AKIAPROFILEONLY7Q3Z", "pr0file/secret+that/never/shows"
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[ci]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))

    class Quoting(_Forbidding):
        def _deny(self) -> None:
            body = (
                "<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                f"<Message>Access Denied for {key_id} ({secret})</Message></Error>"
            ).encode()
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_DELETE = do_POST = _deny

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quoting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        url = parse_store_url(f"s3://quoting?endpoint=http://127.0.0.1:{port}&profile=ci")
        target = S3Target(url)
        with pytest.raises(TargetError) as refused:
            target.put_bytes("x.narinfo", b"x", "text/plain")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    said = scrub(f"{refused.value} {refused.value!r}")
    assert "Access Denied" in said
    assert key_id not in said and secret not in said, said
