"""A bare TCP server on 127.0.0.1 for tests of servers that misbehave below
HTTP: one that never answers, or answers something else."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

__all__ = ["tcp_server"]


@contextlib.contextmanager
def tcp_server(
    on_connect: Callable[[socket.socket], None] = lambda conn: None,
) -> Iterator[tuple[int, list[int]]]:
    """A listener on 127.0.0.1 that hands each connection to ``on_connect``
    (by default: holds it, silent); its port and the count of connections,
    as a one-item list.  Connections are closed when the block ends."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    connections = [0]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            connections[0] += 1
            held.append(conn)
            on_connect(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], connections
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()
