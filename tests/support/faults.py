"""A fault-injecting front for an S3 server, for tests.

A small threaded HTTP proxy on 127.0.0.1 that forwards every request to the
real server unchanged (the Host header too, so signatures still match), except
those a rule picks: it answers 503 SlowDown with Retry-After or 500, cuts the
connection halfway through the request or the response body, or holds the
request for a while.  It records every request the server carried out, in
order, so a test can tell that no narinfo was written before its NAR.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tests.support.services import S3Front, S3Server

__all__ = ["FaultProxy", "Rule"]

ACTIONS = (
    "slowdown",
    "error",
    "forbidden",
    "denied",
    "skewed",
    "drop-request",
    "drop-response",
    "stall",
)
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "error": (500, "InternalError", "We encountered an internal error. Please try again."),
    # What S3 says to a bad signature: it echoes the request's signing
    # material, which must not travel on into our messages.
    "forbidden": (403, "SignatureDoesNotMatch", "The request signature does not match"),
    # What S3 says to a user whose policy lacks the permission.
    "denied": (403, "AccessDenied", "Access Denied"),
    # What S3 says to a machine whose clock is off (escaped, as it sends it).
    "skewed": (
        403,
        "RequestTimeTooSkewed",
        "The difference between the request time and the server&#39;s time is too large.",
    ),
}
_HOP_BY_HOP = {"connection", "keep-alive", "expect", "transfer-encoding", "proxy-connection"}


@dataclass
class Rule:
    """Do ``action`` to the next ``count`` requests whose method is ``method``
    (any when None) and whose path and query match the regex ``path``."""

    action: str
    method: str | None = None
    path: str = ""
    count: int = 1
    seconds: float = 1.0  # Retry-After of a slowdown; how long a stall lasts
    hits: int = 0

    def __post_init__(self) -> None:
        assert self.action in ACTIONS, self.action


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    query: str
    status: int


class FaultProxy(S3Front):
    """The S3 server ``upstream`` as the program under test sees it; checks
    read the bucket from ``upstream`` directly."""

    name = "fault-proxy"

    def __init__(self, upstream: S3Server) -> None:
        self.upstream = upstream
        self.rules: list[Rule] = []
        self.accepted: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, *rules: Rule) -> None:
        with self._lock:
            self.rules.extend(rules)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _pick(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.hits >= rule.count or (rule.method and rule.method != method):
                    continue
                if re.search(rule.path, path):
                    rule.hits += 1
                    return rule
        return None

    def _accepted(self, method: str, path: str, status: int) -> None:
        parts = urlsplit(path)
        with self._lock:
            self.accepted.append(Request(method, parts.path, parts.query, status))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, format: str, *args: object) -> None:
        pass  # the test's output is not the place for an access log

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        rule = proxy._pick(self.command, self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if rule is not None and rule.action == "drop-request":
            self.rfile.read(length // 2)
            self._cut()
            return
        body = self.rfile.read(length) if length else None
        if rule is not None and rule.action == "stall":
            time.sleep(rule.seconds)
        if rule is not None and rule.action in _ERRORS:
            self._error(*_ERRORS[rule.action], retry_after=rule.seconds)
            return
        try:
            status, headers, data = self._forward(proxy.upstream, body)
        except OSError:  # the server went away (stopped at the end of a test)
            self._cut()
            return
        if 200 <= status < 300:  # done on the server, whatever the client hears
            proxy._accepted(self.command, self.path, status)
        raw = self._response(status, headers, data)
        if rule is not None and rule.action == "drop-response":
            self.wfile.write(raw[: len(raw) // 2])
            self._cut()
            return
        self.wfile.write(raw)

    def _forward(
        self, upstream: S3Server, body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        target = urlsplit(upstream.endpoint)
        conn = http.client.HTTPConnection(target.hostname or "", target.port, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            return response.status, response.getheaders(), data
        finally:
            conn.close()

    def _response(self, status: int, headers: list[tuple[str, str]], data: bytes) -> bytes:
        lines = [f"HTTP/1.1 {status} {http.client.responses.get(status, '')}"]
        # A HEAD keeps the server's Content-Length (of the object it did not send).
        recount = self.command != "HEAD"
        for k, v in headers:
            if k.lower() in _HOP_BY_HOP or (recount and k.lower() == "content-length"):
                continue
            lines.append(f"{k}: {v}")
        if recount:
            lines.append(f"Content-Length: {len(data)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + (data if recount else b"")

    def _error(self, status: int, code: str, message: str, *, retry_after: float) -> None:
        query = urlsplit(self.path).query
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><Resource>{urlsplit(self.path).path}</Resource>"
            f"<StringToSign>{query}</StringToSign><CanonicalRequest>{self.command} "
            f"{self.path}</CanonicalRequest></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        if status == 503:
            self.send_header("Retry-After", str(round(retry_after)))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _cut(self) -> None:
        """Close the connection at once; unread request bytes make it a reset."""
        self.close_connection = True
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
