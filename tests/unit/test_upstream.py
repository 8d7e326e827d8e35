"""Upstream caches that misbehave: nothing counts as served unless the
upstream serves its narinfo, and one that cannot be asked costs one
warning and one wait, not one per path."""

from __future__ import annotations

import contextlib
import http.server
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.fakes import FakeStore
from tests.support.rawserver import tcp_server
from uploader.lifecycle import upstream
from uploader.lifecycle.upstream import served_upstream
from uploader.narinfo import NarInfo
from uploader.store import PathInfo
from uploader.storepath import basename, hash_part
from uploader.upstream import Upstreams

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


@contextlib.contextmanager
def http_upstream(answer: Handler) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering every GET with ``answer``."""

    class Serve(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer(self)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Serve)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _send(request: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
    """Answer 200 with ``body``."""
    request.send_response(200)
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)


@contextlib.contextmanager
def raw_upstream(on_connect: Callable[[socket.socket], None]) -> Iterator[tuple[str, list[int]]]:
    """A TCP server on 127.0.0.1 that hands each connection to ``on_connect``;
    its URL and the count of connections, as a one-item list."""
    with tcp_server(on_connect) as (port, connections):
        yield f"http://127.0.0.1:{port}", connections


def _infos(tmp_path: Path, count: int) -> list[PathInfo]:
    store = FakeStore(tmp_path)
    paths = [store.add(f"p{i}") for i in range(count)]
    return list(store.path_infos(paths).values())


def _narinfo_for(path: str) -> bytes:
    return (
        NarInfo(
            store_path=path,
            url=f"nar/{hash_part(path)}.nar",
            compression="none",
            file_hash=None,
            file_size=None,
            nar_hash="sha256:" + "0" * 52,
            nar_size=1,
        )
        .render()
        .encode()
    )


def _serves_nothing(url: str, infos: list[PathInfo], caplog: pytest.LogCaptureFixture) -> str:
    """Ask ``url`` about ``infos``: none is served, and one warning says why."""
    with caplog.at_level(logging.WARNING):
        upstreams = Upstreams([url])
        try:
            assert upstreams.served(infos) == set()
        finally:
            upstreams.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    return warnings[0]


def test_an_upstream_serving_the_narinfo_serves_the_path(tmp_path: Path) -> None:
    infos = _infos(tmp_path, 3)
    by_hash = {hash_part(i.path): i.path for i in infos[:2]}

    def answer(request: http.server.BaseHTTPRequestHandler) -> None:
        path = by_hash.get(request.path.strip("/").removesuffix(".narinfo"))
        if path is None:
            request.send_error(404)
            return
        body = _narinfo_for(path)
        _send(request, body)

    with http_upstream(answer) as url:
        upstreams = Upstreams([url])
        try:
            assert upstreams.served(infos) == {infos[0].path, infos[1].path}
        finally:
            upstreams.close()


@pytest.mark.parametrize(
    "body",
    [b"<html>welcome</html>", None],
    ids=["a web page", "another path's narinfo"],
)
def test_an_upstream_answering_200_to_anything_serves_nothing(
    tmp_path: Path, body: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A mistyped URL, a captive portal or a CDN's error page answers 200:
    counted as served, the paths were never uploaded, and their entries were
    acknowledged."""
    infos = _infos(tmp_path, 20)
    other = _narinfo_for("/nix/store/" + "1" * 32 + "-other")

    def answer(request: http.server.BaseHTTPRequestHandler) -> None:
        data = body if body is not None else other
        _send(request, data)

    with http_upstream(answer) as url:
        warning = _serves_nothing(url, infos, caplog)
    assert "not a narinfo" in warning or "narinfo with" in warning
    assert "uploading 20 paths ourselves" in warning


def test_an_upstream_that_does_not_speak_http_serves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An SSH port: http.client's BadStatusLine escaped, `push` ended with a
    traceback and the daemon retried every batch as an internal error."""
    infos = _infos(tmp_path, 5)

    def banner(conn: socket.socket) -> None:
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        conn.shutdown(socket.SHUT_WR)

    with raw_upstream(banner) as (url, _):
        assert "BadStatusLine" in _serves_nothing(url, infos, caplog)


def test_an_upstream_that_does_not_answer_is_waited_for_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every path waited out its own timeout, 16 at a time, with a warning
    each, on every batch: 64 paths took 40 s, twice."""
    infos = _infos(tmp_path, 64)
    with raw_upstream(lambda conn: None) as (url, connections), caplog.at_level(logging.WARNING):
        upstreams = Upstreams([url], timeout=0.5)
        try:
            assert upstreams.served(infos) == set()
            first = connections[0]
            # At most the requests already under way when the first timed out.
            assert 1 <= first <= 16
            # Left alone for a while: not asked again.
            assert upstreams.served(infos) == set()
            assert connections[0] == first
        finally:
            upstreams.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "uploading 64 paths ourselves, and not asking it again for" in warnings[0]


# The same upstreams as `verify --upstream` and `pin add --upstream` ask them.


def _names(infos: list[PathInfo]) -> list[str]:
    return [basename(i.path) for i in infos]


def test_verify_and_pin_count_an_upstream_only_for_the_narinfo_of_the_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without --upstream-key any 200 counted: `pin add` accepted a closure
    that was nowhere, and `verify` hid the missing references."""
    infos = _infos(tmp_path, 6)
    served = {hash_part(i.path): _narinfo_for(i.path) for i in infos[:2]}
    other = _narinfo_for("/nix/store/" + "1" * 32 + "-other")
    page = b"<html>welcome</html>"

    def answer(request: http.server.BaseHTTPRequestHandler) -> None:
        wanted = request.path.strip("/").removesuffix(".narinfo")
        data = served.get(wanted, other if wanted == hash_part(infos[2].path) else page)
        _send(request, data)

    refused: dict[str, str] = {}
    with http_upstream(answer) as url:
        got = served_upstream([url], (), _names(infos), jobs=4, refused=refused)
    assert got == set(_names(infos[:2]))
    assert sorted(refused) == sorted(_names(infos[2:]))
    assert all("not with a narinfo of this path" in why for why in refused.values())


def test_verify_and_pin_survive_an_upstream_that_does_not_speak_http(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """http.client's BadStatusLine ended `verify` and `pin add` with a traceback."""
    infos = _infos(tmp_path, 5)

    def banner(conn: socket.socket) -> None:
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        conn.shutdown(socket.SHUT_WR)

    with raw_upstream(banner) as (url, _), caplog.at_level(logging.WARNING):
        assert served_upstream([url], (), _names(infos), jobs=4) == set()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "BadStatusLine" in warnings[0], warnings


def test_verify_and_pin_wait_for_an_upstream_that_does_not_answer_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each path waited its own 30 s, 16 at a time, each with a warning."""
    infos = _infos(tmp_path, 64)
    with raw_upstream(lambda conn: None) as (url, connections), caplog.at_level(logging.WARNING):
        assert served_upstream([url], (), _names(infos), jobs=16, timeout=0.5) == set()
        assert 1 <= connections[0] <= 16
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not asking it again" in warnings[0], warnings


def test_verify_and_pin_count_what_a_file_upstream_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file:// mirror's missing narinfo is its 404: the first one made the
    mirror unaskable, and none of the rest counted."""
    infos = _infos(tmp_path, 10)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for info in infos[1:]:
        (mirror / f"{hash_part(info.path)}.narinfo").write_bytes(_narinfo_for(info.path))
    with caplog.at_level(logging.WARNING):
        got = served_upstream([f"file://{mirror}"], (), _names(infos), jobs=1)
        assert got == set(_names(infos[1:]))
        assert caplog.records == []
        # A mirror that is not there is said once, and nothing is served.
        gone = f"file://{tmp_path}/no-such-mirror"
        assert served_upstream([gone], (), _names(infos), jobs=4) == set()
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"upstream {gone} cannot be asked (no directory {tmp_path}/no-such-mirror)"]


def test_verify_and_pin_ask_again_after_one_dropped_connection(tmp_path: Path) -> None:
    """One connection dropped (a restart, a load balancer) made the upstream
    unaskable for the whole run: none of the paths it serves counted."""
    infos = _infos(tmp_path, 10)
    by_hash = {hash_part(i.path): i.path for i in infos}
    requests: list[str] = []

    def answer(request: http.server.BaseHTTPRequestHandler) -> None:
        requests.append(request.path)
        if len(requests) == 1:
            request.close_connection = True  # closed without an answer
            return
        body = _narinfo_for(by_hash[request.path.strip("/").removesuffix(".narinfo")])
        _send(request, body)

    refused: dict[str, str] = {}
    with http_upstream(answer) as url:
        assert served_upstream([url], (), _names(infos), jobs=1, refused=refused) == set(
            _names(infos)
        )
    assert len(requests) == 11 and refused == {}


def test_a_blip_during_parallel_lookups_leaves_the_upstream_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify and pin add ask 16 at a time: a blip drops every connection
    open at that moment, which is not three failures of the upstream."""
    monkeypatch.setattr(upstream, "_RETRY_PAUSE", 0.3)
    infos = _infos(tmp_path, 40)
    by_hash = {hash_part(i.path): i.path for i in infos}
    lock = threading.Lock()
    blip_ends: list[float] = []
    dropped: list[str] = []

    def answer(request: http.server.BaseHTTPRequestHandler) -> None:
        with lock:
            if not blip_ends:
                blip_ends.append(time.monotonic() + 0.1)  # from the first request on
            in_blip = time.monotonic() < blip_ends[0]
            if in_blip:
                dropped.append(request.path)
        if in_blip:
            request.close_connection = True  # closed without an answer
            return
        _send(request, _narinfo_for(by_hash[request.path.strip("/").removesuffix(".narinfo")]))

    with http_upstream(answer) as url:
        assert served_upstream([url], (), _names(infos), jobs=16) == set(_names(infos))
    assert len(dropped) >= 3  # more than the failures in a row that give up on it


def test_what_an_upstream_served_is_not_listed_as_refused_by_another(tmp_path: Path) -> None:
    infos = _infos(tmp_path, 2)
    served = tmp_path / "served"
    served.mkdir()
    for info in infos:
        (served / f"{hash_part(info.path)}.narinfo").write_bytes(_narinfo_for(info.path))

    def page(request: http.server.BaseHTTPRequestHandler) -> None:
        _send(request, b"hello")

    refused: dict[str, str] = {}
    with http_upstream(page) as url:
        urls = [url, f"file://{served}"]
        assert served_upstream(urls, (), _names(infos), jobs=2, refused=refused) == set(
            _names(infos)
        )
    assert refused == {}
