"""A network link in front of a loopback server: round-trip time and
bandwidth, for measuring against an S3 that is not on this machine (the
machines running the benchmarks have no `netem`).

    python3 -m benchmarks.linkproxy PROFILE UPSTREAM_PORT

listens on a free port of 127.0.0.1, prints ``listening on PORT`` and relays
every connection to ``127.0.0.1:UPSTREAM_PORT`` through a model of the link:

- each direction has a one-way delay of RTT/2 and a bandwidth that all the
  connections in that direction share: a chunk starts to leave when the
  link is free, takes ``len / bandwidth`` to leave, and arrives one one-way
  delay after it has left;
- opening a connection costs one RTT (TCP's handshake): nothing leaves
  before that.

Each connection holds at most ``_WINDOW`` bytes in flight per direction (a
TCP window), which is larger than either profile's bandwidth-delay product,
so a single connection can fill the link, as with window scaling.  Slow
start and losses are not modelled.  It runs in a process of its own so that
relaying does not compete with the benchmark for its interpreter lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["PROFILES", "Link", "RunningLink", "running_link"]

_CHUNK = 64 << 10
_WINDOW = 8 << 20


@dataclass(frozen=True)
class Link:
    name: str
    rtt: float  # seconds
    bandwidth: float  # bytes per second, each direction

    def describe(self) -> str:
        return f"{self.name}: {self.rtt * 1000:.0f} ms RTT, {self.bandwidth * 8 / 1e6:.0f} Mbit/s"

    def transfer_seconds(self, nbytes: float) -> float:
        """What the link alone needs to carry ``nbytes`` one way."""
        return nbytes / self.bandwidth


PROFILES = {
    "region": Link("region", 0.020, 1e9 / 8),
    "far": Link("far", 0.080, 100e6 / 8),
}


class _Direction:
    """One direction of the link: when it is next free to send."""

    def __init__(self, link: Link) -> None:
        self.delay = link.rtt / 2
        self.bandwidth = link.bandwidth
        self.free_at = 0.0

    def send(self, now: float, size: int, not_before: float) -> float:
        """Occupy the link for ``size`` bytes; when they arrive at the far end."""
        start = max(now, self.free_at, not_before)
        self.free_at = start + size / self.bandwidth
        return self.free_at + self.delay


class _Pipe:
    """One direction of one connection: read, put on the link, deliver in order."""

    def __init__(self, direction: _Direction, not_before: float) -> None:
        self.direction = direction
        self.not_before = not_before
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.has_data = asyncio.Event()
        self.has_room = asyncio.Event()

    async def pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Until the source's end of file has been delivered, or either side fails."""
        loop = asyncio.get_running_loop()
        deliver = asyncio.create_task(self._deliver(dst))
        try:
            while True:
                while self.queued >= _WINDOW:
                    self.has_room.clear()
                    await self.has_room.wait()
                data = await src.read(_CHUNK)
                arrival = self.direction.send(loop.time(), len(data), self.not_before)
                self.queue.append((arrival, data))
                self.queued += len(data)
                self.has_data.set()
                if not data:
                    break
            await deliver
        except (ConnectionError, OSError):
            dst.close()
        finally:
            deliver.cancel()

    async def _deliver(self, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.has_data.clear()
                await self.has_data.wait()
            arrival, data = self.queue.popleft()
            delay = arrival - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not data:
                if dst.can_write_eof():
                    dst.write_eof()
                return
            dst.write(data)
            await dst.drain()
            self.queued -= len(data)
            self.has_room.set()


async def _serve(link: Link, upstream_port: int) -> None:
    up, down = _Direction(link), _Direction(link)

    async def relay(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        handshake_done = asyncio.get_running_loop().time() + link.rtt
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            c_writer.close()
            return
        try:
            await asyncio.gather(
                _Pipe(up, handshake_done).pump(c_reader, s_writer),
                _Pipe(down, handshake_done).pump(s_reader, c_writer),
            )
        finally:
            for w in (c_writer, s_writer):
                w.close()

    server = await asyncio.start_server(relay, "127.0.0.1", 0, limit=_CHUNK)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on {port}", flush=True)
    async with server:
        await server.serve_forever()


@dataclass
class RunningLink:
    link: Link
    port: int
    process: subprocess.Popen[str]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def running_link(link: Link, upstream_port: int) -> Iterator[RunningLink]:
    """The proxy in a child process for the length of a with-block."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.linkproxy", link.name, str(upstream_port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the link proxy did not start: {line!r}")
        yield RunningLink(link, int(line.split()[-1]), proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in PROFILES:
        print(f"usage: python3 -m benchmarks.linkproxy {{{','.join(PROFILES)}}} UPSTREAM_PORT",
              file=sys.stderr)  # fmt: skip
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(PROFILES[argv[0]], int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
