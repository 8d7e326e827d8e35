"""The daemon's queue logic with a real spool directory and plain objects for
the store and the bucket: what is acknowledged, quarantined, retried, and
what SIGTERM leaves behind."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.entries import entry_bytes, rename_entry, v1_entry_bytes, write_entry
from tests.support.fakes import FakeStore, RecordingTarget
from tests.support.requirements import require_binary
from tests.support.tmpfs import small_tmpfs
from uploader import daemon as daemon_module
from uploader import signing
from uploader._exceptions import CredentialsError, StoreError, TargetError, TransientTargetError
from uploader.cli import main
from uploader.config import Settings
from uploader.daemon import Daemon
from uploader.engine import Engine, narinfo_key
from uploader.gcroots import GcRoots
from uploader.spool import INCOMPLETE_GRACE, Spool
from uploader.state import KnownCache, read_status
from uploader.storepath import basename, hash_part

KEY = signing.generate("test-cache-1")


class Setup:
    def __init__(self, tmp_path: Path, **settings: float) -> None:
        self.store = FakeStore(tmp_path / "store")
        self.target = RecordingTarget()
        self.spool = Spool(tmp_path / "spool")
        os.makedirs(self.spool.path)
        state = tmp_path / "state"
        state.mkdir()
        self.settings = Settings(
            spool=self.spool.path,
            state_dir=str(state),
            retry_min=settings.get("retry_min", 0.05),
            retry_max=settings.get("retry_max", 0.2),
            drain_timeout=settings.get("drain_timeout", 5.0),
        )
        self.roots: GcRoots | None = None
        self.known: KnownCache | None = None

    def entry(self, name: str, *lines: str) -> str:
        write_entry(Path(self.spool.path, f"{name}.entry"), entry_bytes(*lines))
        return f"{name}.entry"

    def run_until(self, done: Callable[[Daemon], bool], timeout: float = 10) -> Daemon:
        """Run a daemon until ``done(daemon)`` holds, then stop it as SIGTERM would."""
        engine = Engine(self.store, self.target, KEY, jobs=2, known=self.known)  # type: ignore[arg-type]
        daemon = Daemon(
            self.settings,
            store=self.store,
            engine=engine,
            spool=self.spool,
            roots=self.roots,  # type: ignore[arg-type]
        )

        async def main() -> None:
            task = asyncio.create_task(daemon.run())
            deadline = time.monotonic() + timeout
            while not done(daemon):
                assert time.monotonic() < deadline, (
                    f"condition not reached: {daemon.status(running=True)}"
                )
                assert not task.done(), task.exception()
                await asyncio.sleep(0.02)
            daemon.request_stop()
            await task
            self.stopped_at = time.monotonic()

        try:
            asyncio.run(main())
        finally:
            engine.close()
        return daemon


def test_entries_are_acknowledged_once_their_closure_is_in_the_cache(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    dep = s.store.add("dep")
    out = s.store.add("out", [dep])
    s.entry("one", f"out {out}")
    s.run_until(lambda d: not s.spool.pending())
    assert s.target.narinfo(out) is not None and s.target.narinfo(dep) is not None
    status = read_status(s.settings.state_dir)
    assert status is not None and status["running"] is False
    assert status["uploaded_paths"] == 2


class _FailsOnce(KnownCache):
    """A memory whose first write fails as an unforeseen error would."""

    failed = False

    def remember(self, hash_parts: Iterable[str]) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("unforeseen")
        super().remember(hash_parts)


def test_paths_of_a_batch_that_failed_after_uploading_them_are_counted(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    s.known = memory = _FailsOnce(str(tmp_path / "known.sqlite"), "memory")
    out = s.store.add("counted")
    s.entry("counted", f"out {out}")
    s.run_until(lambda d: not s.spool.pending())
    assert memory.failed, "the first batch failed"
    status = read_status(s.settings.state_dir)
    assert status is not None
    # Uploaded once, by the batch that failed; the retry found it there.
    assert s.target.puts().count(narinfo_key(out)) == 1
    assert status["uploaded_paths"] == 1
    assert status["uploaded_bytes"] > 0


def test_entries_that_fail_together_are_retried_together_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local Nix not answering holds back every entry: each round is one
    batch and one log line, not a line per entry drifting apart."""
    s = Setup(tmp_path, retry_min=0.05, retry_max=0.2)
    for i in range(20):
        s.entry(f"held-{i}", f"out {s.store.add(f'held-{i}')}")

    def down(paths: Iterable[str]) -> set[str]:
        raise StoreError("nix-store --check-validity: error: cannot connect to socket")

    monkeypatch.setattr(s.store, "invalid_paths", down)
    with caplog.at_level("WARNING", logger="uploader.daemon"):
        s.run_until(lambda d: min((p.attempts for p in d._pending.values()), default=0) >= 4)
    lines = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert len(lines) >= 4
    assert all(line.startswith("20 entries failed, retrying in ") for line in lines), lines


def test_outputs_are_resolved_from_the_derivation_when_the_hook_saw_none(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    out, lib = s.store.add("multi"), s.store.add("multi-lib")
    drv = "/nix/store/" + "d" * 32 + "-multi.drv"
    s.store.outputs_of[drv] = [out, lib]
    s.entry("drv-only", f"drv {drv}")
    s.run_until(lambda d: not s.spool.pending())
    assert s.target.narinfo(out) is not None and s.target.narinfo(lib) is not None


def test_cache_failures_are_retried_with_backoff_and_never_dropped(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    out = s.store.add("flaky")
    s.target.fail.add(narinfo_key(out))
    s.entry("flaky", f"out {out}")
    d = s.run_until(lambda d: any(p.attempts >= 3 for p in d._pending.values()))
    assert s.spool.pending() == ["flaky.entry"], "a failing entry stays queued"
    assert s.spool.quarantined() == []
    assert d._failures["TransientTargetError"] >= 3

    s.target.fail.clear()
    s.run_until(lambda d: not s.spool.pending())
    assert s.target.narinfo(out) is not None


def test_without_credentials_entries_wait_with_one_line_until_they_appear(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Setup(tmp_path, retry_min=0.05, retry_max=0.1)
    outs = [s.store.add(f"waiting-{i}") for i in range(3)]
    for i, out in enumerate(outs):
        s.entry(f"waiting-{i}", f"out {out}")
    s.target.refuse = CredentialsError("checking nix-cache-info: no AWS credentials found")
    d = s.run_until(lambda d: d._cache_attempts >= 4)
    assert d.status(running=True)["cache_problem"] == (
        "checking nix-cache-info: no AWS credentials found"
    )
    assert sorted(s.spool.pending()) == [f"waiting-{i}.entry" for i in range(3)]
    assert s.spool.quarantined() == [] and all(p.attempts == 0 for p in d._pending.values())
    problem_lines = [r for r in caplog.records if "no AWS credentials" in r.getMessage()
                     and r.levelname == "WARNING"]  # fmt: skip
    assert len(problem_lines) == 1, "one line per episode, not one per attempt or entry"
    assert d._failures == {"CredentialsError": 1}

    # They appear while a daemon waits (a filled-in environment file, an
    # instance role): the same daemon resumes, and says so.
    caplog.clear()

    def appear_then_drain(d: Daemon) -> bool:
        if d._cache_attempts >= 2:
            s.target.refuse = None
        return not s.spool.pending()

    d = s.run_until(appear_then_drain)
    assert all(s.target.narinfo(out) is not None for out in outs)
    assert d.status(running=True)["cache_problem"] is None
    assert any("the cache takes the requests again" in r.getMessage() for r in caplog.records)


def test_a_failure_holding_back_many_entries_is_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Setup(tmp_path)
    for name in ("a", "b", "c"):
        s.entry(name, f"out {s.store.add(name)}")

    def unreachable(*args: object) -> bool:
        raise TransientTargetError("checking s3://cache: connection refused")

    s.target.exists = unreachable  # type: ignore[method-assign]
    s.target.list_keys = unreachable  # type: ignore[method-assign,assignment]
    with caplog.at_level("DEBUG", logger="uploader.daemon"):
        s.run_until(lambda d: sum(p.attempts for p in d._pending.values()) >= 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    at_start = [w for w in warnings if "builds queued meanwhile are retried" in w]
    assert len(at_start) == 1  # the start-up check, once
    warnings = [w for w in warnings if w not in at_start]
    assert warnings and all(w.startswith("3 entries failed, retrying in") for w in warnings)
    assert "connection refused" in warnings[0]


def test_an_unreachable_cache_is_said_at_start_and_counted_as_failures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Setup(tmp_path)
    s.entry("a", f"out {s.store.add('a')}")

    def unreachable(*args: object) -> bool:
        raise TransientTargetError("checking s3://cache: connection refused")

    s.target.exists = unreachable  # type: ignore[method-assign]
    s.target.list_keys = unreachable  # type: ignore[method-assign,assignment]
    with caplog.at_level("WARNING", logger="uploader.daemon"):
        d = s.run_until(lambda d: sum(p.attempts for p in d._pending.values()) >= 2)
    said = [r.getMessage() for r in caplog.records]
    assert any("connection refused; builds queued meanwhile are retried" in m for m in said)
    assert d.status(running=True)["failures"].get("TransientTargetError", 0) >= 2


def test_an_entry_the_spool_will_not_let_go_is_retried_with_its_reason_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An immutable spool (`chattr +i`, as a new user once left it): the
    path is uploaded, its entry cannot be removed; the daemon says so and
    retries, and takes the entry once the spool is writable again."""
    chattr = require_binary("chattr")
    s = Setup(tmp_path)
    out = s.store.add("stuck")
    s.entry("stuck", f"out {out}")
    locked = subprocess.run([chattr, "+i", s.spool.path], capture_output=True, text=True)
    if locked.returncode != 0:
        pytest.fail(f"chattr +i on the test's spool: {locked.stderr.strip()}", pytrace=False)
    try:
        with caplog.at_level("WARNING"):
            d = s.run_until(lambda d: any(p.attempts >= 2 for p in d._pending.values()))
    finally:
        subprocess.run([chattr, "-i", s.spool.path], check=True)
    assert s.target.narinfo(out) is not None
    said = [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
    assert not any("internal error" in m for m in said)
    assert any(
        "uploaded, but the entry cannot be removed from the spool (Operation not permitted)" in m
        and "lsattr -d" in m
        for m in said
    ), said
    retrying = d.status(running=True)["retrying"]
    assert [r["entry"] for r in retrying] == ["stuck.entry"]
    assert "cannot be removed from the spool" in retrying[0]["error"]
    s.run_until(lambda d: not s.spool.pending())
    assert s.spool.quarantined() == []


def test_status_of_a_stopped_daemon_counts_down_to_nothing(tmp_path: Path) -> None:
    s = Setup(tmp_path, retry_min=30, retry_max=60)
    out = s.store.add("later")
    s.target.fail.add(narinfo_key(out))
    s.entry("later", f"out {out}")
    s.run_until(lambda d: any(p.attempts >= 1 for p in d._pending.values()))
    shown = CliRunner().invoke(main, ["status", "--state-dir", s.settings.state_dir])
    assert shown.exit_code == 0, shown.output
    assert "daemon:      stopped" in shown.output
    assert "later.entry: attempt 1, retried when the daemon runs:" in shown.output
    assert "next in" not in shown.output


def test_retry_after_sets_the_earliest_next_attempt(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    out = s.store.add("throttled")
    s.entry("throttled", f"out {out}")
    original = s.target.put_bytes

    def slow_down(key: str, data: bytes, content_type: str) -> None:
        if key.endswith(".narinfo"):
            raise TransientTargetError("uploading: 503 SlowDown", retry_after=30)
        original(key, data, content_type)

    s.target.put_bytes = slow_down  # type: ignore[method-assign]
    d = s.run_until(lambda d: any(p.attempts for p in d._pending.values()))
    (pending,) = d._pending.values()
    assert pending.next_try - time.monotonic() > 25, "Retry-After: 30 was not honoured"
    assert s.spool.pending() == ["throttled.entry"]


def test_a_path_differing_from_the_database_quarantines_its_entries(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    bad = s.store.add("tampered")
    top = s.store.add("top", [bad])
    good = s.store.add("fine")
    s.store.lie(bad, nar_size=12345)
    s.entry("top", f"out {top}")
    s.entry("good", f"out {good}")
    s.run_until(lambda d: not s.spool.pending())
    ((name, reason),) = s.spool.quarantined()
    assert name == "top.entry"
    assert bad in reason and "differs from what the Nix database registered" in reason
    assert s.target.narinfo(top) is None and s.target.narinfo(good) is not None


def test_a_path_the_database_lists_but_the_disk_lacks_is_quarantined_not_retried(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    lost = s.store.add("lost")
    s.store.registered(lost)  # registered first: the database keeps it
    shutil.rmtree(s.store._dirs[lost])
    s.entry("lost", f"out {lost}")
    d = s.run_until(lambda d: not s.spool.pending())
    ((name, reason),) = s.spool.quarantined()
    assert name == "lost.entry" and "No such file or directory" in reason
    assert not any(p.attempts for p in d._pending.values())


def test_entries_that_left_the_spool_are_not_counted_in_flight(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.entry("bad", "drv nonsense")
    s.entry("good", f"out {s.store.add('good')}")
    d = s.run_until(lambda d: not s.spool.pending())
    assert [name for name, _ in s.spool.quarantined()] == ["bad.entry"]
    # As in the middle of a batch: one entry acked, one quarantined already.
    d._in_flight = {"bad.entry", "good.entry"}
    assert d.status(running=True)["in_flight"] == 0


def test_paths_not_in_the_store_are_quarantined_and_partly_valid_entries_upload(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    kept = s.store.add("kept")
    gone = "/nix/store/" + "g" * 32 + "-collected"
    s.entry("gone", f"out {gone}")
    s.entry("half", f"out {kept}", f"out {gone}")
    s.run_until(lambda d: not s.spool.pending())
    reasons = dict(s.spool.quarantined())
    assert list(reasons) == ["gone.entry"]
    assert "not valid in the local Nix store" in reasons["gone.entry"]
    assert s.target.narinfo(kept) is not None


def test_sigterm_lets_the_running_batch_finish(tmp_path: Path) -> None:
    s = Setup(tmp_path, drain_timeout=10)
    out = s.store.add("slow")
    s.target.delay = 1.0  # up to a second per put
    s.entry("slow", f"out {out}")
    started = threading.Event()

    def in_flight(d: Daemon) -> bool:
        if d._in_flight:
            started.set()
        return started.is_set()

    s.run_until(in_flight)
    assert s.spool.pending() == [], "the in-flight entry was finished before stopping"
    assert s.target.narinfo(out) is not None


def test_a_second_stop_request_cancels_and_keeps_the_entry(tmp_path: Path) -> None:
    s = Setup(tmp_path, drain_timeout=30)
    out = s.store.add("stuck")
    release = threading.Event()
    s.target.before_exists[narinfo_key(out)] = lambda: release.wait(10)
    s.entry("stuck", f"out {out}")

    def forced(d: Daemon) -> bool:
        if d._in_flight:
            d.request_stop()  # the first request waits for the batch; this is the second
            return True
        return False

    t0 = time.monotonic()
    threading.Timer(8, release.set).start()  # lets the stuck request's thread end
    s.run_until(forced)
    assert s.stopped_at - t0 < 4, "a second stop request did not cancel at once"
    assert s.spool.pending() == ["stuck.entry"]


def test_sigusr1_retries_waiting_entries_now(tmp_path: Path) -> None:
    s = Setup(tmp_path, retry_min=60, retry_max=60)
    out = s.store.add("later")
    s.target.fail.add(narinfo_key(out))
    s.entry("later", f"out {out}")
    healed = threading.Event()

    def heal_and_signal(d: Daemon) -> bool:
        if not healed.is_set() and any(p.attempts for p in d._pending.values()):
            s.target.fail.clear()
            healed.set()
            os.kill(os.getpid(), signal.SIGUSR1)
        return healed.is_set() and not s.spool.pending()

    s.run_until(heal_and_signal, timeout=15)
    assert s.target.narinfo(out) is not None


@pytest.mark.parametrize("content", [b"garbage\n", b"\xff\xfe binary", b"x" * 70_000])
def test_malformed_entries_are_quarantined_and_good_ones_still_served(
    tmp_path: Path, content: bytes
) -> None:
    s = Setup(tmp_path)
    good = s.store.add("good")
    bad = Path(s.spool.path, "bad.entry")
    bad.write_bytes(content)
    # Old enough that it cannot be a file still being written.
    os.utime(bad, (time.time() - 60, time.time() - 60))
    s.entry("good", f"out {good}")
    s.run_until(lambda d: not s.spool.pending())
    assert [n for n, _ in s.spool.quarantined()] == ["bad.entry"]
    assert s.target.narinfo(good) is not None


def test_a_quarantine_reason_a_full_spool_kept_out_is_written_once_there_is_room(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    with small_tmpfs(Path(s.spool.path), "16k") as spool:
        os.mkdir(s.spool.quarantine_path, 0o750)
        bad = spool / "bad.entry"
        bad.write_bytes(b"garbage\n")
        os.utime(bad, (time.time() - 60, time.time() - 60))
        filler = spool / ".filler"
        with open(filler, "wb") as f, pytest.raises(OSError, match="No space"):
            f.write(b"\0" * (1 << 20))
        seen: list[list[tuple[str, str]]] = []

        def reason_written(daemon: Daemon) -> bool:
            quarantined = s.spool.quarantined()
            if quarantined and not seen:
                seen.append(quarantined)
                filler.unlink()
            return bool(seen) and quarantined != seen[0]

        s.run_until(reason_written, timeout=20)
        assert seen == [[("bad.entry", "(no reason recorded)")]]
        ((name, reason),) = s.spool.quarantined()
    assert name == "bad.entry"
    assert reason.startswith("spool entry 'bad.entry': does not start with"), reason
    assert re.search(r"\(quarantined [0-9T:+-]+\)$", reason), reason


def test_a_half_written_entry_is_left_alone_until_its_end_line_is_written(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    early, late, first, second = (s.store.add(n) for n in ("early", "late", "first", "second"))
    # Written long enough ago that a daemon taking it for malformed would
    # quarantine it at once, yet within the grace for incomplete entries.
    a_while_ago = time.time() - 60
    halves = {}

    def start_writing(name: str, out: str) -> None:
        f = open(Path(s.spool.path, name), "xb", buffering=0)  # noqa: SIM115
        f.write(entry_bytes(f"out {out}")[: -len("end\n")])
        os.utime(f.fileno(), (a_while_ago, a_while_ago))
        halves[name] = f

    # One half-written before the start (its scan reads it), one while the
    # daemon runs (its watch); a complete entry after each shows that the
    # daemon has looked.
    start_writing("early.entry", early)
    s.entry("first", f"out {first}")
    phase = ["started"]

    def step(d: Daemon) -> bool:
        pending = s.spool.pending()
        if phase[0] == "started" and "first.entry" not in pending:
            start_writing("late.entry", late)
            s.entry("second", f"out {second}")
            phase[0] = "late written"
        elif phase[0] == "late written" and "second.entry" not in pending:
            assert s.target.narinfo(second) is not None
            assert sorted(pending) == ["early.entry", "late.entry"]
            assert s.target.narinfo(early) is None and s.target.narinfo(late) is None
            assert s.spool.quarantined() == []
            for f in halves.values():
                f.write(b"end\n")
                f.close()
            phase[0] = "completed"
        return phase[0] == "completed" and not pending

    s.run_until(step)
    assert s.target.narinfo(early) is not None and s.target.narinfo(late) is not None
    assert s.spool.quarantined() == []


def test_an_entry_left_incomplete_past_the_grace_is_quarantined(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    out, good = s.store.add("out"), s.store.add("good")
    half = Path(s.spool.path, "killed.entry")
    write_entry(half, entry_bytes(f"out {out}")[:-5])
    long_ago = time.time() - INCOMPLETE_GRACE - 60
    os.utime(half, (long_ago, long_ago))
    s.entry("good", f"out {good}")
    s.run_until(lambda d: not s.spool.pending())
    [(name, reason)] = s.spool.quarantined()
    assert name == "killed.entry"
    assert "incomplete: no 'end' line and no write for 11 minutes" in reason
    assert s.target.narinfo(out) is None and s.target.narinfo(good) is not None


def test_format_1_entries_of_an_older_hook_are_uploaded(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    before, during = s.store.add("before"), s.store.add("during")
    rename_entry(Path(s.spool.path, "before.entry"), v1_entry_bytes(f"out {before}"))

    def step(d: Daemon) -> bool:
        if not s.spool.pending() and s.target.narinfo(during) is None:
            rename_entry(Path(s.spool.path, "during.entry"), v1_entry_bytes(f"out {during}"))
        return s.target.narinfo(during) is not None and not s.spool.pending()

    s.run_until(step)
    assert s.target.narinfo(before) is not None
    assert s.spool.quarantined() == []


def test_entries_an_older_daemon_quarantined_for_their_format_are_uploaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`install` over an older install replaces the hook before the service
    restarts: the old daemon quarantines the new hook's entries meanwhile.
    The new daemon takes them back at its start, with a line saying so."""
    s = Setup(tmp_path)
    out = s.store.add("built-during-the-upgrade")
    name = s.entry("upgrade", f"out {out}")
    s.spool.quarantine(
        name,
        f"spool entry {name!r}: unsupported format 'nix-cache-uploader-spool 2' "
        "(this uploader reads 'nix-cache-uploader-spool 1')",
    )
    caplog.set_level("WARNING")
    s.run_until(lambda d: s.target.narinfo(out) is not None and not s.spool.pending())
    assert s.spool.quarantined() == []
    said = [r.getMessage() for r in caplog.records if "requeued" in r.getMessage()]
    assert said == ["requeued 1 entry quarantined by an older uploader for a format this one reads"]


def _roots_while_the_first_batch_is_in_flight(
    s: Setup, roots: Path, arrive: Callable[[], None]
) -> set[str]:
    """Run the daemon until the spool is empty; ``arrive`` writes entries
    once the batch of ``first.entry`` is in flight.  The names seen in
    ``roots`` while that batch still was."""
    seen: set[str] = set()
    arrived = False

    def step(d: Daemon) -> bool:
        nonlocal arrived
        if not arrived and d._in_flight == {"first.entry"}:
            arrive()
            arrived = True
        if arrived and d._in_flight == {"first.entry"}:
            seen.update(os.listdir(roots))
        return arrived and not s.spool.pending()

    s.run_until(step, timeout=30)
    return seen


def test_a_build_that_arrives_during_a_slow_batch_is_rooted_at_once(tmp_path: Path) -> None:
    """A garbage collection while a batch is in flight (a slow cache) must
    not take the outputs of the builds waiting for it: they are rooted as
    they arrive, from the entry or from the .drv, not when their batch comes."""
    s = Setup(tmp_path)
    (tmp_path / "roots").mkdir()
    s.roots = GcRoots(str(tmp_path / "roots"))
    s.target.delay = 1.0
    first, second, third = s.store.add("first"), s.store.add("second"), s.store.add("third")
    drv = "/nix/store/" + "d" * 32 + "-third.drv"
    s.store.outputs_of[drv] = [third]
    s.entry("first", f"out {first}")

    def arrive() -> None:
        s.entry("second", f"out {second}")
        s.entry("third", f"drv {drv}")  # as Nix 2.8's hook writes it

    rooted_during = _roots_while_the_first_batch_is_in_flight(s, tmp_path / "roots", arrive)
    assert {basename(second), basename(third)} <= rooted_during
    assert os.listdir(tmp_path / "roots") == [], "unrooted once uploaded"
    assert all(s.target.narinfo(p) is not None for p in (first, second, third))


def test_builds_arriving_together_are_rooted_together_and_never_on_the_event_loop(
    tmp_path: Path,
) -> None:
    """Thousands of entries dropped at once while a batch is in flight (a
    re-enqueue, a CI restarted) are rooted in one call, not one thread hop
    and one call each, and no symlink is made or removed on the event loop:
    one costs up to a millisecond on a busy disk.  (Per entry, 2000 entries
    took the daemon 2.3 s of CPU instead of 1.0.)"""
    s = Setup(tmp_path)
    calls: list[tuple[str, int, bool]] = []  # what, how many paths, on the loop's thread

    class RecordingRoots(GcRoots):
        def add(self, paths: Iterable[str], skip: Callable[[str], bool] | None = None) -> None:
            paths = list(paths)
            calls.append(("add", len(paths), threading.current_thread() is loop_thread))
            super().add(paths, skip)

        def remove(self, paths: Iterable[str]) -> None:
            paths = list(paths)
            calls.append(("remove", len(paths), threading.current_thread() is loop_thread))
            super().remove(paths)

    loop_thread = threading.current_thread()  # asyncio.run runs the loop here
    (tmp_path / "roots").mkdir()
    s.roots = RecordingRoots(str(tmp_path / "roots"))
    s.target.delay = 2.0
    first = s.store.add("first")
    later = [s.store.add(f"later-{i}") for i in range(60)]
    s.entry("first", f"out {first}")

    def arrive() -> None:
        for i, path in enumerate(later):
            s.entry(f"later-{i}", f"out {path}")

    rooted_during = _roots_while_the_first_batch_is_in_flight(s, tmp_path / "roots", arrive)
    assert {basename(p) for p in later} <= rooted_during, "rooted while they waited"
    adds = [c for c in calls if c[0] == "add"]
    assert sum(n for _, n, _ in adds) == 61 and len(adds) <= 3, adds
    assert [c for c in calls if c[2]] == [], "nothing made or removed on the event loop"
    assert os.listdir(tmp_path / "roots") == [], "unrooted once uploaded"


def test_a_restart_keeps_the_roots_of_entries_that_name_only_their_drv(tmp_path: Path) -> None:
    """The clean-up of stale roots at start read only the outputs entries
    name: those of Nix 2.8's entries (a .drv only) lost their roots at every
    restart until their batch came."""
    s = Setup(tmp_path)
    removed_while_waiting: list[str] = []

    class RecordingRoots(GcRoots):
        def remove(self, paths: Iterable[str]) -> None:
            paths = list(paths)
            if s.spool.pending():
                removed_while_waiting.extend(paths)
            super().remove(paths)

    (tmp_path / "roots").mkdir()
    s.roots = RecordingRoots(str(tmp_path / "roots"))
    out, stale = s.store.add("out"), s.store.add("stale")
    drv = "/nix/store/" + "d" * 32 + "-out.drv"
    s.store.outputs_of[drv] = [out]
    s.roots.add([out, stale])  # rooted before the restart; `stale` by an entry gone since
    s.entry("out", f"drv {drv}")
    s.run_until(lambda d: not s.spool.pending())
    assert removed_while_waiting == [stale]
    assert s.target.narinfo(out) is not None
    assert os.listdir(tmp_path / "roots") == []


def test_roots_kept_at_a_restart_go_once_their_entry_is_done(tmp_path: Path) -> None:
    """A crash after the upload and before the entry was removed: at the
    restart the cache already holds the outputs, so no batch roots them,
    and the roots kept from before must still go with the entry."""
    s = Setup(tmp_path)
    (tmp_path / "roots").mkdir()
    s.roots = GcRoots(str(tmp_path / "roots"))
    # The daemon's memory of the cache, kept across the restart.
    s.known = KnownCache(str(tmp_path / "known.sqlite"), "memory")
    uploaded, waiting = s.store.add("uploaded"), s.store.add("waiting")
    s.entry("before", f"out {uploaded}")
    s.run_until(lambda d: not s.spool.pending())
    assert s.target.narinfo(uploaded) is not None
    # Left as the crash left them: both entries, both outputs rooted.
    s.roots.add([uploaded, waiting])
    s.entry("uploaded", f"out {uploaded}")
    s.entry("waiting", f"out {waiting}")
    d = s.run_until(lambda d: not s.spool.pending())
    assert s.target.narinfo(waiting) is not None
    assert os.listdir(tmp_path / "roots") == []
    assert d._entry_roots == {} and not d._root_refs


def test_outputs_not_rooted_before_a_restart_are_rooted_by_their_batch(tmp_path: Path) -> None:
    """Killed while it made an entry's roots: the restart keeps the one made,
    and its batch must still root the other while it uploads."""
    s = Setup(tmp_path)
    (tmp_path / "roots").mkdir()
    s.roots = GcRoots(str(tmp_path / "roots"))
    s.target.delay = 0.5
    made, not_yet = s.store.add("made"), s.store.add("not-yet")
    s.roots.add([made])
    s.entry("both", f"out {made}", f"out {not_yet}")
    seen: set[str] = set()

    def step(d: Daemon) -> bool:
        if d._in_flight:
            seen.update(os.listdir(tmp_path / "roots"))
        return not s.spool.pending()

    d = s.run_until(step, timeout=30)
    assert {basename(made), basename(not_yet)} <= seen
    assert os.listdir(tmp_path / "roots") == []
    assert d._entry_roots == {} and not d._root_refs


def _slow_first_batch(tmp_path: Path, roots: type[GcRoots] = GcRoots) -> tuple[Setup, str]:
    """Set up a daemon with GC roots and ``first.entry``, whose batch takes a
    while; and the output of a later build."""
    s = Setup(tmp_path)
    (tmp_path / "roots").mkdir()
    s.roots = roots(str(tmp_path / "roots"))
    s.target.delay = 0.5
    first, later = s.store.add("first"), s.store.add("later")
    s.entry("first", f"out {first}")
    return s, later


def _later_arrives_during_the_first_batch(
    s: Setup, later: str, done: Callable[[Daemon], bool]
) -> Daemon:
    """Run the daemon on ``first.entry`` until ``done``; ``later.entry`` (for
    the output ``later``) arrives once that batch is in flight."""
    arrived = False

    def step(d: Daemon) -> bool:
        nonlocal arrived
        if not arrived and d._in_flight == {"first.entry"}:
            s.entry("later", f"out {later}")
            arrived = True
        return arrived and done(d)

    return s.run_until(step, timeout=30)


def test_a_batch_waits_for_the_roots_asked_for_before_it(tmp_path: Path) -> None:
    """An entry that arrived during a batch is rooted on the roots' thread;
    its own batch must not ask Nix for its closure (nor upload it) before
    that root is there, however far behind the thread is."""

    class SlowRoots(GcRoots):
        def add(self, paths: Iterable[str], skip: Callable[[str], bool] | None = None) -> None:
            paths = list(paths)
            if later in paths:
                time.sleep(1.5)  # a busy disk, thousands of symlinks queued
            super().add(paths, skip)

    s, later = _slow_first_batch(tmp_path, SlowRoots)
    rooted_when_asked: list[bool] = []
    original = s.store.path_infos

    def path_infos(paths: list[str], **kw: bool) -> dict[str, object]:
        if later in paths:
            rooted_when_asked.append(basename(later) in os.listdir(tmp_path / "roots"))
        return original(paths, **kw)  # type: ignore[return-value]

    s.store.path_infos = path_infos  # type: ignore[method-assign,assignment]
    _later_arrives_during_the_first_batch(s, later, lambda d: not s.spool.pending())
    assert rooted_when_asked and all(rooted_when_asked)
    assert s.target.narinfo(later) is not None


def test_the_roots_of_an_entry_removed_by_hand_go_with_it(tmp_path: Path) -> None:
    s, later = _slow_first_batch(tmp_path)
    removed = False

    def remove_once_rooted(d: Daemon) -> bool:
        nonlocal removed
        if not removed and basename(later) in os.listdir(tmp_path / "roots"):
            os.unlink(Path(s.spool.path, "later.entry"))  # rooted on arrival, then removed
            removed = True
        return removed and not d._in_flight and not os.listdir(tmp_path / "roots")

    d = _later_arrives_during_the_first_batch(s, later, remove_once_rooted)
    assert s.target.narinfo(later) is None
    assert d._entry_roots == {} and not d._root_refs


def test_a_failure_rooting_arrivals_is_said_and_left_to_their_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s, later = _slow_first_batch(tmp_path)
    original = Daemon._entry_outputs

    def failing(d: Daemon, names: list[str]) -> dict[str, list[str]]:
        if d._in_flight:
            raise RuntimeError("disk on fire")
        return original(d, names)

    monkeypatch.setattr(Daemon, "_entry_outputs", failing)
    caplog.set_level("WARNING")
    _later_arrives_during_the_first_batch(s, later, lambda d: not s.spool.pending())
    assert s.target.narinfo(later) is not None
    said = [r.getMessage() for r in caplog.records if "arrived" in r.getMessage()]
    assert said == ["rooting the builds that arrived: RuntimeError('disk on fire')"]


def test_a_build_that_arrives_during_an_outage_is_rooted_at_once(tmp_path: Path) -> None:
    """A batch failed as a whole waits for its retry (up to retry-max, 15
    minutes by default); a build that finishes meanwhile must not wait
    that long for its root."""
    s = Setup(tmp_path, retry_min=30, retry_max=30)
    (tmp_path / "roots").mkdir()
    s.roots = GcRoots(str(tmp_path / "roots"))
    first, later = s.store.add("first"), s.store.add("later")
    s.target.refuse = TransientTargetError("connection refused (the cache is down)")
    s.entry("first", f"out {first}")
    arrived = False

    def step(d: Daemon) -> bool:
        nonlocal arrived
        if not arrived and d._held_until > 0 and not d._in_flight:
            s.entry("later", f"out {later}")
            arrived = True
        return arrived and basename(later) in os.listdir(tmp_path / "roots")

    s.run_until(step, timeout=10)


@pytest.mark.parametrize("failure", ["cache", "nix"])
def test_every_entry_waiting_out_an_outage_is_rooted(tmp_path: Path, failure: str) -> None:
    """Not only the builds that arrive during the hold: those of the failed
    batch (a Nix query failed before they were rooted) and the rest of a
    queue larger than a batch wait as long."""
    s = Setup(tmp_path, retry_min=30, retry_max=30)
    s.settings = dataclasses.replace(s.settings, batch_size=2)
    (tmp_path / "roots").mkdir()
    s.roots = GcRoots(str(tmp_path / "roots"))
    outs = [s.store.add(f"q{i}") for i in range(4)]
    if failure == "cache":
        s.target.refuse = TransientTargetError("connection refused (the cache is down)")
    else:

        def nix_down(paths: Iterable[str]) -> set[str]:
            raise StoreError("cannot connect to the Nix daemon")

        s.store.invalid_paths = nix_down  # type: ignore[method-assign]
    for i, out in enumerate(outs):
        s.entry(f"q{i}", f"out {out}")

    def step(d: Daemon) -> bool:
        rooted = set(os.listdir(tmp_path / "roots"))
        return d._held_until > 0 and {basename(p) for p in outs} <= rooted

    s.run_until(step, timeout=10)


def test_an_output_the_cache_lost_is_rooted_before_it_is_read(tmp_path: Path) -> None:
    """A root skipped because the cache was found to hold the path still
    counts for its entry; when the path must be uploaded after all (the
    cache lost it), the root is made before Nix is asked for its closure."""
    s = Setup(tmp_path, retry_min=0.3, retry_max=0.3)
    (tmp_path / "roots").mkdir()

    class SlowRoots(GcRoots):  # a busy disk: the cache answers first
        def add(self, paths: Iterable[str], skip: Callable[[str], bool] | None = None) -> None:
            time.sleep(0.2)
            super().add(paths, skip)

    s.roots = SlowRoots(str(tmp_path / "roots"))
    kept, failing = s.store.add("kept"), s.store.add("failing")
    s.entry("before", f"out {kept}")  # the cache holds `kept`
    s.run_until(lambda d: not s.spool.pending())
    s.target.fail.add(narinfo_key(failing))  # and the entry stays for `failing`
    s.entry("both", f"out {kept}", f"out {failing}")
    state: dict[str, object] = {}
    unrooted: list[str] = []
    original = s.store.path_infos

    def recording(paths: list[str], **kw: bool) -> dict[str, object]:
        rooted = set(os.listdir(tmp_path / "roots"))
        unrooted.extend(p for p in paths if p in (kept, failing) and basename(p) not in rooted)
        return original(paths, **kw)  # type: ignore[return-value]

    s.store.path_infos = recording  # type: ignore[method-assign,assignment]

    def step(d: Daemon) -> bool:
        if (
            "lost" not in state
            and d._pending.get("both.entry")
            and d._pending["both.entry"].attempts
        ):
            with s.target._lock:  # the cache loses `kept` (a gc of the bucket)
                for key in [k for k in s.target.objects if hash_part(kept) in k]:
                    del s.target.objects[key]
            s.target.fail.clear()
            state["lost"] = True
        return "lost" in state and not s.spool.pending()

    s.run_until(step, timeout=10)
    assert unrooted == []


def test_a_reenqueued_build_the_cache_holds_needs_no_closure_query_nor_root(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    (tmp_path / "roots").mkdir()
    rooted: list[str] = []

    class RecordingRoots(GcRoots):
        def add(self, paths: Iterable[str], skip: Callable[[str], bool] | None = None) -> None:
            paths = list(paths)
            rooted.extend(paths)  # handed over to be rooted (unless found meanwhile)
            super().add(paths, skip)

    s.roots = RecordingRoots(str(tmp_path / "roots"))
    dep = s.store.add("dep")
    out = s.store.add("out", [dep])
    s.entry("first", f"out {out}")
    s.run_until(lambda d: not s.spool.pending())
    assert rooted == [out], "a new output is rooted while it uploads"
    queries: list[list[str]] = []
    original = s.store.path_infos

    def recording(paths: list[str], **kw: bool) -> dict[str, object]:
        queries.append(list(paths))
        return original(paths, **kw)  # type: ignore[return-value]

    s.store.path_infos = recording  # type: ignore[method-assign,assignment]
    events = len(s.target.events)
    # Without a memory of the cache, the output is rooted while the cache
    # is asked; when remembered there, not even that.
    remembered = KnownCache(str(tmp_path / "known.sqlite"), "memory")
    remembered.remember([hash_part(out)])
    for known in (None, remembered):
        s.known = known
        rooted.clear()
        s.entry("again", f"out {out}")
        d = s.run_until(lambda d: not s.spool.pending())

        assert queries == [], "the cache had the output: Nix was not asked for its closure"
        assert s.target.events[events:] == []
        assert rooted == ([out] if known is None else [])
        assert d._entry_roots == {} and not d._root_refs
        assert os.listdir(tmp_path / "roots") == []


def test_status_lists_the_oldest_retrying_entries_and_counts_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # During an outage every entry retries: the status file lists a few,
    # the oldest, and counts every one (5,000 listed made it 1.2 MB).
    monkeypatch.setattr(daemon_module, "RETRYING_LISTED", 3)
    s = Setup(tmp_path, retry_min=30, retry_max=60)
    names = []
    for i in range(14):
        out = s.store.add(f"p{i}")
        s.target.fail.add(narinfo_key(out))
        names.append(s.entry(f"e{i:02d}", f"out {out}"))
        # Written in the opposite order of their names (names begin with
        # the store hash: they say nothing of age).
        written = time.time() - 1000 + 10 * (14 - i)
        os.utime(Path(s.spool.path, names[-1]), (written, written))
    s.run_until(lambda d: sum(p.attempts >= 1 for p in d._pending.values()) == 14)
    status = read_status(s.settings.state_dir)
    assert status is not None
    assert [r["entry"] for r in status["retrying"]] == names[::-1][:3]
    assert status["retrying_count"] == 14
    shown = CliRunner().invoke(main, ["status", "--state-dir", s.settings.state_dir])
    assert shown.exit_code == 0, shown.output
    assert "retrying:    14\n" in shown.output
    assert shown.output.count(": attempt 1, retried when the daemon runs:") == 3
    assert "  … and 11 more (--json lists the oldest 3)" in shown.output
    as_json = CliRunner().invoke(main, ["status", "--json", "--state-dir", s.settings.state_dir])
    assert json.loads(as_json.output)["retrying_count"] == 14


def test_roots_no_entry_names_are_dropped_at_start_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A spool moved without its entries: their roots go, and the log says so.
    s = Setup(tmp_path)
    (tmp_path / "roots").mkdir()
    s.roots = GcRoots(str(tmp_path / "roots"))
    queued, left = s.store.add("queued"), s.store.add("left-behind")
    os.symlink(queued, tmp_path / "roots" / basename(queued))
    os.symlink(left, tmp_path / "roots" / basename(left))
    s.target.fail.add(narinfo_key(queued))  # stays queued, and rooted
    s.entry("queued", f"out {queued}")
    caplog.set_level("WARNING")
    s.run_until(lambda d: any(p.attempts for p in d._pending.values()))
    assert os.listdir(tmp_path / "roots") == [basename(queued)]
    said = [r.getMessage() for r in caplog.records if "GC root" in r.getMessage()]
    assert said == [
        f"removed 1 GC root in {tmp_path / 'roots'} that no entry in {s.spool.path} names "
        "(left by a crash, by entries removed by hand, or by a spool moved without its "
        "entries: move those here, they are uploaded from here only)"
    ]


def test_entries_that_arrive_while_the_cache_refuses_wait_with_the_failed_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A bucket refusing writes fails every batch as a whole, at once. Builds
    # that keep arriving must not each be tried (and fail, and log) on their
    # own: they wait with the failed entries and are retried as one batch,
    # so the log grows with the attempts, not with the entries.
    s = Setup(tmp_path, retry_min=0.3, retry_max=0.3)
    s.target.refuse = TargetError("uploading roots/x.json: AccessDenied (writes refused)")
    outs = [s.store.add(f"p{i}") for i in range(30)]
    s.entry("e00", f"out {outs[0]}")
    written, last = 1, time.monotonic()
    caplog.set_level("WARNING", logger="uploader.daemon")

    def arriving(d: Daemon) -> bool:
        nonlocal written, last
        if written < len(outs) and time.monotonic() - last >= 0.05:
            s.entry(f"e{written:02d}", f"out {outs[written]}")
            written, last = written + 1, time.monotonic()
        return len(d._pending) == len(outs) and all(p.attempts for p in d._pending.values())

    d = s.run_until(arriving)
    failed = [r.getMessage() for r in caplog.records if "failed, retrying" in r.getMessage()]
    attempts = d._pending["e00.entry"].attempts
    assert 3 <= len(failed) <= attempts + 1, (attempts, failed)
    assert all("AccessDenied (writes refused)" in line for line in failed)
    status = d.status(running=True)
    assert status["retrying_count"] == 30
    assert len({round(r["next_try_in"], 1) for r in status["retrying"]}) == 1, "one batch"
    s.target.refuse = None
    s.run_until(lambda d: not s.spool.pending())
    assert all(s.target.narinfo(p) is not None for p in outs)


def test_entries_of_a_batch_failing_each_for_its_own_reason_take_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Setup(tmp_path, retry_min=30, retry_max=60)
    outs = [s.store.add(f"own{i}") for i in range(3)]
    for i, out in enumerate(outs):
        s.target.fail.add(narinfo_key(out))
        s.entry(f"own{i}", f"out {out}")
    caplog.set_level("WARNING", logger="uploader.daemon")
    d = s.run_until(lambda d: sum(p.attempts for p in d._pending.values()) == 3)
    failed = [r.getMessage() for r in caplog.records if "failed, retrying" in r.getMessage()]
    assert len(failed) == 1, failed
    assert failed[0].startswith("3 entries failed, retrying in ")
    assert f"uploading {narinfo_key(outs[0])}" in failed[0]
    assert failed[0].endswith("(and 2 other errors: `nix-cache-uploader status` lists them)")
    errors = {r["entry"]: r["error"] for r in d.status(running=True)["retrying"]}
    for i, out in enumerate(outs):
        assert narinfo_key(out) in errors[f"own{i}.entry"]


def test_a_batch_that_fails_for_want_of_files_is_retried_in_halves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A batch may fail for its size (the open files its requests need): each
    # such failure in a row halves the next one, a success restores it.
    s = Setup(tmp_path, retry_min=0.05, retry_max=0.05)
    s.target.refuse = TargetError("listing: Too many open files")
    s.target.refuse.__cause__ = OSError(errno.EMFILE, "Too many open files")
    outs = [s.store.add(f"half{i}") for i in range(8)]
    for i, out in enumerate(outs):
        s.entry(f"half{i}", f"out {out}")
    caplog.set_level("WARNING", logger="uploader.daemon")
    d = s.run_until(lambda d: any(p.attempts >= 4 for p in d._pending.values()))
    failed = [r.getMessage().split(",")[0] for r in caplog.records if "failed" in r.getMessage()]
    assert failed[:3] == ["8 entries failed", "4 entries failed", "2 entries failed"], failed
    assert re.fullmatch(r"half\d\.entry: attempt \d failed", failed[3]), failed
    assert d._batch_limit == 1
    s.target.refuse = None
    d = s.run_until(lambda d: not s.spool.pending())


def test_entries_are_quarantined_on_the_loop_not_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs are resolved in a thread; it quarantined entries there,
    changing the queue under the loop (and under the status thread, which
    then died of `dictionary changed size during iteration`)."""
    s = Setup(tmp_path)
    kept = s.store.add("kept")
    for i in range(5):
        s.entry(f"gone{i}", "out /nix/store/" + f"{i}" * 32 + "-collected")
    s.entry("kept", f"out {kept}")
    threads: list[str] = []
    quarantine = Daemon._quarantine

    def recorded(self: Daemon, name: str, reason: str) -> None:
        threads.append(threading.current_thread().name)
        quarantine(self, name, reason)

    monkeypatch.setattr(Daemon, "_quarantine", recorded)
    s.run_until(lambda d: not s.spool.pending())
    assert len(s.spool.quarantined()) == 5
    assert threads == [threading.main_thread().name] * 5
    assert s.target.narinfo(kept) is not None


def test_a_failed_status_tick_does_not_end_the_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The status task died with its first unexpected error: status.json was
    never written again (`status`: "not responding"), and the error ended
    `run` with a traceback instead of a clean stop."""
    s = Setup(tmp_path)
    calls: list[str] = []
    status = Daemon.status

    def failing_once(self: Daemon, *, running: bool) -> dict[str, object]:
        calls.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread() and len(calls) <= 2:
            raise RuntimeError("dictionary changed size during iteration")
        return status(self, running=running)

    monkeypatch.setattr(Daemon, "status", failing_once)
    out = s.store.add("after")
    s.run_until(lambda d: len(calls) >= 2)
    s.entry("after", f"out {out}")
    s.run_until(lambda d: not s.spool.pending() and len(calls) >= 5)
    assert read_status(s.settings.state_dir)["running"] is False
    assert "internal error writing the status; trying again" in caplog.text
