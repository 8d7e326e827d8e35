"""Roots, pins and `gc` against real Nix and S3 (SeaweedFS, moto): what stays substitutes
into a fresh store with signatures required, what went was unreachable, and
gc running in a loop beside pushing uploaders breaks no closure."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.cli import KeyPair, run_cli
from tests.support.daemon import UploaderRun
from tests.support.entries import entry_bytes, write_entry
from tests.support.nix import build, nix_path_info, substitute, trivial_expr
from tests.support.services import NixDaemon, S3Server
from uploader.lifecycle import Policy, collect
from uploader.lifecycle.gclock import GcLock, LockHeld
from uploader.lifecycle.layout import LAYOUT, LOCKS, encode, timed_key
from uploader.lifecycle.marks import read_run
from uploader.narinfo import NarInfo
from uploader.nixbase32 import encode as nix32
from uploader.nixbase32 import format_hash
from uploader.signing import SecretKey
from uploader.storepath import STORE_DIR, hash_part
from uploader.targets import open_target

pytestmark = pytest.mark.integration

TIGHT = ["--keep-days", "0", "--keep-last", "1", "--grace", "0"]


def _expr(salt: str, leaves: int, tops: int) -> str:
    """``leaf-i`` files, ``top-j`` referencing three leaves each, and two
    ``twin`` paths with the same contents (so the same NAR)."""
    drv = (
        'derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";'
        ' PATH = "/usr/bin:/bin"; args = ["-c" "{script}"]; }}'
    )
    parts = [
        f"leaf{i} = " + drv.format(name=f"leaf{i}-{salt}", script=f"echo {salt} {i} > $out") + ";"
        for i in range(leaves)
    ]
    for j in range(tops):
        refs = " ".join(f"${{leaf{(j + k) % leaves}}}" for k in (0, 1, 3))
        parts.append(
            f"top{j} = " + drv.format(name=f"top{j}-{salt}", script=f"echo {refs} > $out") + ";"
        )
    for t in ("a", "b"):
        parts.append(
            f"twin{t} = " + drv.format(name=f"twin{t}-{salt}", script="echo twin > $out") + ";"
        )
    return "rec {\n" + "\n".join(parts) + "\n}"


@pytest.fixture(scope="module")
def paths(nix_daemon: NixDaemon) -> dict[str, str]:
    expr = _expr(os.urandom(6).hex(), leaves=10, tops=10)
    names = [f"leaf{i}" for i in range(10)] + [f"top{j}" for j in range(10)] + ["twina", "twinb"]
    return {n: build(expr, attr=n)[0] for n in names}


class Cache:
    def __init__(self, weed: S3Server, bucket: str, keys: KeyPair, tmp: Path) -> None:
        self.weed, self.bucket, self.keys, self.tmp = weed, bucket, keys, tmp
        self.url = weed.store_url(bucket)

    def push(self, root: str, *paths: str, env: dict[str, str] | None = None) -> None:
        run_cli("push", "--to", self.url, "--secret-key-file", self.keys.secret_file,
                "--root", root, "-q", *paths, env=env)  # fmt: skip

    def gc(self, *args: str, check: bool = True) -> dict[str, object]:
        proc = run_cli("gc", "--to", self.url, "--json", *args, check=check)
        return json.loads(proc.stdout) if proc.returncode == 0 else {"stderr": proc.stderr}

    def has(self, path: str) -> bool:
        return self.weed.get(self.bucket, f"{hash_part(path)}.narinfo") is not None

    def nar(self, path: str) -> str:
        data = self.weed.get(self.bucket, f"{hash_part(path)}.narinfo")
        assert data is not None
        return NarInfo.parse(data.decode()).url

    def substitutes(self, paths: list[str]) -> None:
        dest = self.tmp / f"fresh-{os.urandom(4).hex()}"
        proc = substitute(self.weed.http_url(self.bucket), paths, self.keys.public, dest=str(dest))
        assert proc.returncode == 0, proc.stderr

    def verify_clean(self) -> None:
        proc = run_cli("verify", "--to", self.url, "--public-key", self.keys.public, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def cache(s3: S3Server, bucket: str, keys: KeyPair, tmp_path: Path) -> Cache:
    return Cache(s3, bucket, keys, tmp_path)


def test_retention_keeps_roots_and_pins_and_deletes_the_unreachable(
    cache: Cache, paths: dict[str, str]
) -> None:
    p = paths
    cache.push("a", p["top0"])  # leaves 0 1 3
    cache.push("a", p["top5"])  # leaves 5 6 8: top0's root lapses
    cache.push("b", p["top1"])  # leaves 1 2 4
    cache.push("twins", p["twina"], p["twinb"])
    cache.push("twins", p["leaf9"])  # the twins' root lapses...
    assert cache.nar(p["twina"]) == cache.nar(p["twinb"])  # one NAR, two narinfos
    refused = run_cli(
        "pin", "add", "--to", cache.url, "release", p["twina"], p["top7"], check=False
    )
    assert refused.returncode == 1 and hash_part(p["top7"]) in refused.stderr
    run_cli("pin", "add", "--to", cache.url, "release", p["twina"])  # ...but twina is pinned
    listed = json.loads(run_cli("pin", "list", "--to", cache.url, "--json").stdout)
    assert [(x["name"], x["paths"]) for x in listed] == [("release", [p["twina"]])]

    everything = {n for n in p if cache.has(p[n])}
    dry = cache.gc(*TIGHT, "--nar-delay", "0")
    assert dry["narinfos_deleted"] == []  # no mark yet
    for _ in range(3):  # mark; delete narinfos; delete the NARs they left
        cache.gc(*TIGHT, "--nar-delay", "0", "--delete")
    kept = {n for n in p if cache.has(p[n])}
    gone = everything - kept
    assert gone == {"top0", "leaf0", "leaf3", "twinb"}  # leaf1 is top1's too
    for name in ("top5", "top1", "leaf9", "twina"):
        cache.substitutes([p[name]])
    assert cache.weed.get(cache.bucket, cache.nar(p["twina"])) is not None
    cache.verify_clean()
    removed = run_cli("pin", "rm", "--to", cache.url, "release")
    assert "removed pin release: its closure goes with a later gc" in removed.stderr
    assert run_cli("pin", "rm", "--to", cache.url, "release", check=False).returncode == 1
    listed = run_cli("pin", "list", "--to", cache.url)
    assert listed.stdout == "" and "no pins" in listed.stderr


def test_a_second_gc_refuses_and_a_crashed_ones_lock_expires(cache: Cache) -> None:
    target = open_target(cache.url)
    first = GcLock(target)
    first.acquire()
    try:
        proc = run_cli("gc", "--to", cache.url, "--delete", check=False)
        assert proc.returncode == 1
        assert "another gc is running" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
        assert cache.gc()["delete"] is False  # a dry run takes no lock
    finally:
        first.release()
    # A gc that died: its lock, last refreshed (by the server's clock) longer
    # ago than its expiry, has expired. (What the record says of the time is
    # not taken: the writer's clock may be off.)
    crashed = timed_key(LOCKS, time.time() - 600)
    record = {
        "host": "elsewhere",
        "pid": 1,
        "started": time.time() - 600,
        "expires": time.time() + 3600,
        "expiry": 1.0,
    }
    target.put_bytes(crashed, encode(record), "application/json")
    time.sleep(2.5)  # LastModified has whole seconds on some servers
    assert cache.gc("--delete")["delete"] is True


def test_a_gc_whose_clock_is_ahead_still_sees_the_running_gc_and_marks_by_the_server(
    cache: Cache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock's expiry and gc's mark are judged by the server's clock: a
    host whose clock is 150 s ahead (S3 accepts 15 minutes) neither runs
    beside a running gc nor marks narinfos with a time the server has not
    reached."""
    target = open_target(cache.url)
    first = GcLock(target)
    first.acquire()
    real = time.time
    try:
        monkeypatch.setattr(time, "time", lambda: real() + 150)
        with pytest.raises(LockHeld, match="another gc is running"):
            collect(target, Policy(), delete=True, jobs=2)
    finally:
        monkeypatch.setattr(time, "time", real)
        first.release()
    monkeypatch.setattr(time, "time", lambda: real() + 600)
    with caplog.at_level("WARNING", logger="uploader.lifecycle.gclock"):
        result = collect(target, Policy(), delete=True, jobs=2)
    monkeypatch.setattr(time, "time", real)
    # (LastModified has whole seconds: the server's clock is taken as no later.)
    assert re.search(r"this machine's clock is 60[0-3] s ahead of the S3 server's", caplog.text)
    assert result.record is not None
    record = read_run(target, result.record)
    assert record is not None
    assert real() - 30 < record.time <= real() + 1


def _narinfo_keys(cache: Cache) -> set[str]:
    pages = cache.weed.client().get_paginator("list_objects_v2")
    return {
        o["Key"]
        for page in pages.paginate(Bucket=cache.bucket, Delimiter="/")
        for o in page.get("Contents", [])
        if o["Key"].endswith(".narinfo")
    }


def test_a_gc_stopped_by_sigterm_has_said_each_object_it_deleted(cache: Cache) -> None:
    """What `systemctl stop` (or a unit's timeout) does to a gc: the journal
    holds one line for each object deleted before it, and a count."""
    _fill(cache, 300)
    run_cli("gc", "--to", cache.url, "--delete", *TIGHT)  # the first mark
    before = _narinfo_keys(cache)
    argv = [sys.executable, "-m", "uploader", "gc", "--to", cache.url, "--delete", *TIGHT]
    proc = subprocess.Popen(
        [*argv, "-j", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    said = [proc.stdout.readline() for _ in range(20)]
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=60)
    said += rest.splitlines(keepends=True)
    assert proc.returncode == 128 + signal.SIGTERM, err
    gone = before - _narinfo_keys(cache)
    assert 20 <= len(gone) < 300
    assert {line.split()[1].rstrip(":") for line in said} == gone
    assert all(
        line.startswith("delete ") and "-filler unreachable, a candidate since" in line
        for line in said
    ), said
    assert f"gc stopped after deleting {len(gone)} narinfos;" in err
    assert "gc stopped by SIGTERM" in err
    cache.verify_clean()
    # The next run finishes the work (once the lock the stopped run
    # released is gone: it was, so this one runs at once).
    run_cli("gc", "--to", cache.url, "--delete", *TIGHT)
    assert _narinfo_keys(cache) == set()


def test_a_newer_layout_is_refused(cache: Cache, paths: dict[str, str]) -> None:
    cache.push("a", paths["leaf2"])
    open_target(cache.url).put_bytes(LAYOUT, b'{"version": 2}', "application/json")
    proc = run_cli("gc", "--to", cache.url, "--delete", check=False)
    assert proc.returncode == 1 and "layout version 2" in proc.stderr
    assert cache.has(paths["leaf2"])


def _fill(cache: Cache, count: int) -> None:
    """Unreachable signed paths with their NARs (no Nix needed)."""
    target = open_target(cache.url)
    key = SecretKey.load(cache.keys.secret_file)

    def one(_: int) -> None:
        nar = os.urandom(64)
        url = f"nar/{nix32(hashlib.sha256(nar).digest())}.nar"
        info = NarInfo(
            store_path=f"{STORE_DIR}/{nix32(os.urandom(20))}-filler",
            url=url, compression="none", file_hash=None, file_size=len(nar),
            nar_hash=format_hash(hashlib.sha256(nar).digest()), nar_size=len(nar),
        )  # fmt: skip
        signed = NarInfo(**{**info.__dict__, "sigs": (key.sign(info.fingerprint()),)})
        target.put_bytes(url, nar, "application/x-nix-nar")
        target.put_bytes(
            f"{hash_part(info.store_path)}.narinfo", signed.render().encode(), "text/x-nix-narinfo"
        )

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))


def _concurrent(cache: Cache, paths: dict[str, str], seconds: float, env: dict[str, str]) -> None:
    tops = [paths[f"top{j}"] for j in range(10)]
    closures = {top: list(nix_path_info([top], recursive=True)) for top in tops}
    target = open_target(cache.url)
    last: dict[str, list[str]] = {}
    broken: list[str] = []
    errors: list[BaseException] = []
    deadline = time.monotonic() + seconds
    stop = threading.Event()

    def worker(name: str, seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while time.monotonic() < deadline:
                chosen = rnd.sample(tops, 2)
                cache.push(name, *chosen, env=env)
                last[name] = chosen
                # Its root is the newest complete one of its name: until the
                # next push, nothing of its closure may go.
                needed = {p for top in chosen for p in closures[top]}
                broken.extend(p for p in needed if not target.exists(f"{hash_part(p)}.narinfo"))
        except BaseException as e:
            errors.append(e)

    def collector() -> None:
        # One deletion at a time, among hundreds of unreachable fillers: the
        # deletion phase lasts as long as it does in a large bucket, which
        # is when an uploader ignoring the mark gets caught.
        while not stop.is_set():
            _fill(cache, 150)
            cache.gc(*TIGHT, "--delete", "-j", "1", check=False)

    threads = [threading.Thread(target=worker, args=(f"w{i}", i)) for i in range(3)]
    gc_thread = threading.Thread(target=collector)
    gc_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    gc_thread.join()
    assert not errors, errors
    assert not broken, f"paths gone from the closure of a kept root: {broken}"
    cache.verify_clean()
    for chosen in last.values():
        cache.substitutes(chosen)


def test_gc_in_a_loop_beside_pushing_uploaders_breaks_no_closure(
    cache: Cache, paths: dict[str, str]
) -> None:
    seconds = float(os.environ.get("GC_CONCURRENCY_SECONDS", "60"))
    _concurrent(cache, paths, seconds, dict(os.environ))


def test_the_daemon_forgets_what_gc_deleted_and_uploads_it_again(
    uploader: UploaderRun, s3: S3Server, bucket: str
) -> None:
    """Its memory of the cache (state.sqlite) would otherwise skip the path."""
    uploader.start()
    (out,) = build(trivial_expr("forgotten"), hook=str(uploader.hook))
    uploader.wait_drained(timeout=120)
    narinfo = f"{hash_part(out)}.narinfo"
    assert s3.get(bucket, narinfo) is not None

    gc = ["gc", "--to", uploader.store_url, "--delete", "--grace", "0", "--keep-days", "0",
          "--keep-last", "0", "--nar-delay", "0"]  # fmt: skip
    # gc's "now" is the server's, taken as no later than it is (LastModified
    # has whole seconds): a root written within the second is still young
    # with --keep-days 0.
    time.sleep(2)
    for _ in range(2):  # the first marks, the second deletes
        run_cli(*gc)
    assert s3.get(bucket, narinfo) is None, "gc should have deleted the unrooted path"

    write_entry(uploader.spool / "again.entry", entry_bytes(f"out {out}"))
    uploader.wait_drained(timeout=120)
    assert s3.get(bucket, narinfo) is not None, uploader.log()[-3000:]
