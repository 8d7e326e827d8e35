"""The benchmarks' link proxy is a measuring instrument: a round trip through
it takes the profile's RTT, and a bulk transfer the profile's bandwidth
(shared by the connections), within loose tolerances.  These check the
instrument's calibration, not the product's speed."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.linkproxy import PROFILES, Link, RunningLink, running_link


def _answer(conn: socket.socket) -> None:
    """Reads until a newline, answers ``ok``; again until the client closes."""
    with conn:
        while True:
            data = conn.recv(1 << 16)
            if not data:
                return
            if data.endswith(b"\n"):
                conn.sendall(b"ok\n")


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _exchange(sock: socket.socket, payload: int) -> None:
    """Send ``payload`` bytes and a newline; wait for the answer."""
    chunk = b"\0" * (1 << 16)
    left = payload
    while left > 0:
        left -= sock.send(chunk[:left])
    sock.sendall(b"\n")
    assert sock.recv(16) == b"ok\n"


def _timed(link: RunningLink, payload: int, exchanges: int = 1) -> tuple[float, float]:
    """Seconds for connect + first exchange, and for each later one (mean)."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", link.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _exchange(sock, payload)
        first = time.perf_counter()
        for _ in range(exchanges):
            _exchange(sock, payload)
        later = (time.perf_counter() - first) / max(1, exchanges)
    return first - start, later


def _within(measured: float, expected: float) -> bool:
    """Loose: the machine is shared, timers and the proxy add a little."""
    return 0.9 * expected <= measured <= 1.4 * expected + 0.010


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_a_round_trip_costs_the_rtt_and_a_new_connection_one_more(
    profile: str, upstream: int
) -> None:
    link = PROFILES[profile]
    with running_link(link, upstream) as running:
        first, later = _timed(running, 0, exchanges=5)
    assert _within(later, link.rtt), (later, link)
    assert _within(first, 2 * link.rtt), (first, link)


@pytest.mark.parametrize(("profile", "mib"), [("far", 4), ("region", 48)])
def test_a_bulk_transfer_takes_the_bandwidth(profile: str, mib: int, upstream: int) -> None:
    link = PROFILES[profile]
    with running_link(link, upstream) as running:
        _, later = _timed(running, mib << 20)
    assert _within(later, link.transfer_seconds(mib << 20) + link.rtt), (later, link)


def test_connections_share_the_bandwidth(upstream: int) -> None:
    link: Link = PROFILES["far"]
    size = 2 << 20
    with running_link(link, upstream) as running, ThreadPoolExecutor(4) as pool:
        start = time.perf_counter()
        list(pool.map(lambda _: _timed(running, size, exchanges=0), range(4)))
        seconds = time.perf_counter() - start
    assert _within(seconds, link.transfer_seconds(4 * size) + 2 * link.rtt), seconds
