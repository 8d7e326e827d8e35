"""How long the daemon waits after failures (backoff, Retry-After), the GC
roots it keeps while entries still wait, and what it tells monitoring while
the cache refuses it: a real spool, the store and bucket of test_daemon."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest

from tests.unit import test_daemon
from tests.unit.test_daemon import Setup
from uploader._exceptions import CredentialsError, StoreError, TransientTargetError
from uploader.daemon import Daemon
from uploader.engine import narinfo_key
from uploader.gcroots import GcRoots
from uploader.metrics import Metrics
from uploader.storepath import basename


def test_a_batch_failing_again_and_again_backs_off_exponentially(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the n-th batch failure in a row the daemon holds back for
    retry-min * 2^(n-1) (jittered by half).  Broken, during an outage of the
    local Nix the daemon retries every retry-min, flooding the log and the
    daemon socket."""
    retry_min = 0.05
    s = Setup(tmp_path, retry_min=retry_min, retry_max=10)
    s.entry("a", f"out {s.store.add('a')}")

    def down(paths: object) -> set[str]:
        raise StoreError("cannot connect to socket")

    monkeypatch.setattr(s.store, "invalid_paths", down)
    held: dict[int, float] = {}  # failures in a row -> how long still held back

    def failed_five_times(d: Daemon) -> bool:
        n = d._batch_failures
        if n and n not in held:
            held[n] = d._held_until - time.monotonic()
        return n >= 5

    s.run_until(failed_five_times, timeout=30)
    # At least 8 * retry-min after the 5th failure; never more than retry-min
    # without the backoff.
    assert held[5] > 2 * retry_min, held


def test_backoff_stops_growing_at_retry_max(tmp_path: Path) -> None:
    """An entry's wait between attempts grows up to retry-max and no
    further (configuration.md, operations.md).  Broken, after an outage of
    a few hours entries wait for days."""
    retry_max = 0.1
    s = Setup(tmp_path, retry_min=0.05, retry_max=retry_max)
    out = s.store.add("flaky")
    s.target.fail.add(narinfo_key(out))
    s.entry("flaky", f"out {out}")
    waits: list[float] = []

    def sixth_attempt(d: Daemon) -> bool:
        now = time.monotonic()
        waits.extend(p.next_try - now for p in d._pending.values() if p.attempts)
        return any(p.attempts >= 6 for p in d._pending.values())

    s.run_until(sixth_attempt, timeout=30)
    assert waits and max(waits) <= retry_max + 0.01, waits


def test_a_batch_failing_with_retry_after_waits_that_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the cache fails a whole batch (its listing or existence checks)
    with a Retry-After, the daemon waits at least that long.  Broken, a 503
    SlowDown is answered with more requests within retry-min."""
    s = Setup(tmp_path)
    s.entry("a", f"out {s.store.add('a')}")

    def slow_down(*args: object) -> bool:
        raise TransientTargetError("checking: 503 SlowDown", retry_after=30)

    monkeypatch.setattr(s.target, "exists", slow_down)
    monkeypatch.setattr(s.target, "list_keys", slow_down)
    d = s.run_until(lambda d: any(p.attempts for p in d._pending.values()))
    assert d._held_until - time.monotonic() > 25


def test_an_output_stays_rooted_while_another_entry_waits_for_it(tmp_path: Path) -> None:
    """Entry a (outputs X and a tampered Z) is quarantined; entry b (X) still
    waits for X, so X stays a GC root.  Broken, the Nix GC may collect X
    before b uploads it, and b's build is lost."""
    s = Setup(tmp_path, retry_min=30, retry_max=60)
    roots = tmp_path / "roots"
    roots.mkdir()
    s.roots = GcRoots(str(roots))
    x, z = s.store.add("x"), s.store.add("z")
    s.store.lie(z, nar_size=12345)
    s.target.fail.add(narinfo_key(x))
    s.entry("a", f"out {x}", f"out {z}")
    s.entry("b", f"out {x}")
    s.run_until(
        lambda d: bool(s.spool.quarantined()) and any(p.attempts for p in d._pending.values())
    )
    assert [name for name, _ in s.spool.quarantined()] == ["a.entry"]
    assert basename(x) in os.listdir(roots)


def test_cache_usable_is_0_while_credentials_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`nix_cache_uploader_cache_usable` is 0 while the cache refuses the
    credentials.  Broken, the alert monitoring sets on it never fires while
    nothing is uploaded."""
    metrics = Metrics()
    monkeypatch.setattr(test_daemon, "Daemon", functools.partial(Daemon, metrics=metrics))
    s = Setup(tmp_path)
    s.entry("w", f"out {s.store.add('w')}")
    s.target.refuse = CredentialsError("no AWS credentials found")
    usable: list[float | None] = []

    def refused_twice(d: Daemon) -> bool:
        if d._cache_attempts < 2:
            return False
        usable.append(metrics.registry.get_sample_value("nix_cache_uploader_cache_usable"))
        return True

    s.run_until(refused_twice)
    assert usable == [0.0]
