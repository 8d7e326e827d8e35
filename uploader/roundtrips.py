"""How many small requests to keep in flight, from the cache's round-trip time.

Far from S3, thousands of tiny store paths are bound by round trips, not
bytes or CPU: each needs a PUT for its NAR and one for its narinfo, and the
rate is the number of requests in flight divided by the round-trip time
(Little's law).  Near S3 the CPU is the limit, and more requests in flight
only add threads contending for the interpreter.  So the width follows the
round-trip time: ``MIN_WIDTH`` (what keeps the CPU busy on loopback, where
the time of a request is the machine's own), plus enough to reach ``RATE``
requests per second over the distance, up to ``MAX_WIDTH``.

The round-trip time is the smallest request time among the recent ones: a
busy machine or server makes requests slower, and taking that for distance
would widen the window exactly when it should not (BBR estimates a path's
delay the same way).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["MAX_WIDTH", "MIN_WIDTH", "RATE", "RoundTrips"]

T = TypeVar("T")

# Small requests per second to aim for at a distance: more than the
# uploader makes on loopback here (about 1100 a second with two PUTs a
# path, 2 cores), so that the distance is never what limits.  A request in
# flight costs a coroutine and a connection, not a thread (direct.py).
RATE = 3000
MIN_WIDTH = 24
MAX_WIDTH = 256
# Request times remembered for the minimum: a few seconds' worth at a
# distance, so a route that changes is followed.
_SAMPLES = 256


class RoundTrips:
    """A gate for small requests whose width follows the round-trip time."""

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=_SAMPLES)
        self._in_flight = 0
        self._width = MIN_WIDTH
        # Requests waiting for room, first come first served; each is woken
        # alone (thousands may wait: waking all at each release is quadratic).
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def width(self) -> int:
        return self._width

    @property
    def rtt(self) -> float:
        """The round-trip time as measured so far (0 before any request)."""
        return min(self._samples, default=0.0)

    def observe(self, seconds: float) -> None:
        """One small request's time, from send to answer."""
        self._samples.append(seconds)
        rtt = min(self._samples)
        self._width = min(MAX_WIDTH, MIN_WIDTH + math.ceil(rtt * RATE))

    async def run(self, request: Callable[[], Awaitable[T]]) -> T:
        """``request()`` once there is room for it in the window, timed."""
        if self._in_flight >= self._width or self._waiting:
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            try:
                await turn
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self._in_flight -= 1  # the room it was given
                    self._wake()
                raise
        else:
            self._in_flight += 1
        try:
            started = time.monotonic()
            result = await request()
            self.observe(time.monotonic() - started)
            return result
        finally:
            self._in_flight -= 1
            self._wake()

    def _wake(self) -> None:
        """Give the room there is to the longest waiting requests."""
        while self._waiting and self._in_flight < self._width:
            turn = self._waiting.popleft()
            if not turn.done():
                self._in_flight += 1
                turn.set_result(None)
