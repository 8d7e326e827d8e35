"""The window of small requests follows the round-trip time, never lets
more than its width through, and serves waiting requests in order."""

from __future__ import annotations

import asyncio
import math

from uploader.roundtrips import MAX_WIDTH, MIN_WIDTH, RATE, RoundTrips


def test_width_follows_the_smallest_recent_request_time() -> None:
    gate = RoundTrips()
    assert gate.width == MIN_WIDTH  # near, or not known yet
    gate.observe(0.020)
    assert gate.width == MIN_WIDTH + math.ceil(0.020 * RATE) < MAX_WIDTH
    # A slow answer (a busy server) does not widen the window further.
    gate.observe(0.500)
    assert gate.width == MIN_WIDTH + math.ceil(0.020 * RATE)
    far = RoundTrips()
    far.observe(10.0)
    assert far.width == MAX_WIDTH


class Watched(RoundTrips):
    """The widest the window has been: it follows the round trips measured,
    up and down, so the width at the end may be below what was allowed."""

    widest = MIN_WIDTH

    def observe(self, seconds: float) -> None:
        super().observe(seconds)
        self.widest = max(self.widest, self.width)


def test_no_more_than_the_width_in_flight_and_first_come_first_served() -> None:
    gate = Watched()

    async def scenario() -> tuple[int, list[int]]:
        in_flight = peak = 0
        order: list[int] = []

        async def request(i: int) -> int:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            order.append(i)
            await asyncio.sleep(0.001)
            in_flight -= 1
            return i

        results = await asyncio.gather(
            *(gate.run(lambda i=i: request(i)) for i in range(5 * MIN_WIDTH))
        )
        assert results == list(range(5 * MIN_WIDTH))
        return peak, order

    peak, order = asyncio.run(scenario())
    # The 1 ms requests widened it a little; never more went at once.
    assert MIN_WIDTH <= peak <= gate.widest
    assert order == sorted(order)


def test_a_cancelled_waiter_gives_its_turn_on() -> None:
    async def scenario() -> int:
        gate = RoundTrips()
        release = asyncio.Event()
        holders = [asyncio.create_task(gate.run(release.wait)) for _ in range(MIN_WIDTH)]
        await asyncio.sleep(0)
        waiter = asyncio.create_task(gate.run(release.wait))
        await asyncio.sleep(0)
        waiter.cancel()
        release.set()
        await asyncio.gather(*holders)
        done = await gate.run(lambda: asyncio.sleep(0, result=1))
        return done

    assert asyncio.run(scenario()) == 1


def test_the_round_trip_time_is_the_smallest_request_time_seen() -> None:
    gate = RoundTrips()
    assert gate.rtt == 0.0  # nothing measured yet
    for seconds in (0.050, 0.021, 0.300):
        gate.observe(seconds)
    assert gate.rtt == 0.021
