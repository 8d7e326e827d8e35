"""Bucket lifecycle at scale: `verify` (not deep) and the `gc` dry run on a
synthetic bucket of 100 000 narinfos, each ≤ 5 minutes at ≤ 300 MiB peak
RSS; the requests one run makes, and what a run costs at 1 000 000
narinfos at AWS S3 list prices ($0.005 per 1000 LIST, $0.0004 per 1000 GET).

The bucket is made by this script, not by Nix: signed narinfos (the bench
key) whose references form a DAG, each with a small NAR, 100 roots of 5
names and a pin, all written straight to SeaweedFS.  Requests are counted from what the
commands do: one LIST per 1000 keys of the top level and of ``nar/``, one
GET per narinfo (and per root and pin for gc).
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.harness import Bench, Row, fmt_s, median, met, run_measured
from uploader.lifecycle.layout import check_layout
from uploader.lifecycle.roots import RootWriter, write_pin
from uploader.narinfo import NarInfo
from uploader.nixbase32 import encode as nix32
from uploader.nixbase32 import format_hash
from uploader.signing import SecretKey
from uploader.targets import open_target

__all__ = ["NAME", "run"]

NAME = "lifecycle"
_FULL = 100_000
_QUICK = 2_000
_SECONDS = 300.0
_RSS = 300 << 20
# AWS S3 Standard, us-east-1 (per 1000 requests): LIST is priced as PUT.
_LIST_PRICE = 0.005 / 1000
_GET_PRICE = 0.0004 / 1000


def _hash_part(rng: random.Random) -> str:
    return nix32(rng.randbytes(20))


def _objects(count: int, key: SecretKey, seed: int = 1) -> list[tuple[str, bytes]]:
    """``count`` signed narinfos with their NARs: every path references up to
    four earlier ones, so closures are deep and shared as in a real cache."""
    rng = random.Random(seed)
    paths = [f"/nix/store/{_hash_part(rng)}-synthetic-{i}" for i in range(count)]
    objects: list[tuple[str, bytes]] = []
    for i, path in enumerate(paths):
        nar = rng.randbytes(rng.randint(64, 512))
        refs = {paths[rng.randrange(i)] for _ in range(min(i, rng.randint(0, 4)))}
        file_hash = hashlib.sha256(nar).digest()
        url = f"nar/{nix32(file_hash)}.nar"
        info = NarInfo(
            store_path=path,
            url=url,
            compression="none",
            file_hash=format_hash(file_hash),
            file_size=len(nar),
            nar_hash=format_hash(file_hash),
            nar_size=len(nar),
            references=tuple(sorted(p.removeprefix("/nix/store/") for p in refs)),
        )
        signed = NarInfo(**{**info.__dict__, "sigs": (key.sign(info.fingerprint()),)})
        objects.append((url, nar))
        objects.append((f"{path[11:43]}.narinfo", signed.render().encode()))
    return objects


def _fill(bench: Bench, bucket: str, count: int) -> int:
    """Write the synthetic cache, in a child process: the 200 000 objects it
    holds in memory must not inflate this process, whose size a forked
    measurement would inherit.  Returns the number of objects."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        written: int = pool.apply(_fill_child, (bench.url(bucket), bench.keys.secret_file, count))
    return written


def _fill_child(url: str, key_file: str, count: int) -> int:
    target = open_target(url, max_connections=32)
    check_layout(target, write=True)
    objects = _objects(count, SecretKey.load(key_file))
    objects.append(("nix-cache-info", b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"))
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda kv: target.put_bytes(kv[0], kv[1], "application/octet-stream"),
                      objects))  # fmt: skip
    # What keeps the bucket's paths alive: the newest of 20 roots of each of
    # 5 names covering the last paths written (and so their closures), and a pin.
    paths = [k.removesuffix(".narinfo") for k, _ in objects if k.endswith(".narinfo")]
    for name in range(5):
        for i in range(20):
            writer = RootWriter(target, f"builder-{name}")
            writer.start(_store_paths(objects, paths[-(i + 1) * 50 - name :][:50]))
            writer.complete()
    write_pin(target, "release", _store_paths(objects, paths[:10]))
    return len(objects) + 101


def _store_paths(objects: list[tuple[str, bytes]], hash_parts: list[str]) -> list[str]:
    wanted = set(hash_parts)
    found = []
    for key, body in objects:
        if key.endswith(".narinfo") and key[:32] in wanted:
            found.append(body.split(b"\n", 1)[0].removeprefix(b"StorePath: ").decode())
    return found


def _command(bench: Bench, bucket: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "uploader", *args, "--to", bench.url(bucket)]


def run(bench: Bench) -> list[Row]:
    count = _QUICK if bench.quick else _FULL
    bucket = bench.bucket("lifecycle")
    try:
        bench.say(f"lifecycle: writing a synthetic bucket of {count} narinfos")
        objects = _fill(bench, bucket, count)
        public = bench.keys.public
        commands: dict[str, list[str]] = {
            "verify": _command(bench, bucket, "verify", "--public-key", public, "--json"),
        }
        if _has_gc():
            commands["gc dry run"] = _command(bench, bucket, "gc", "--json", "--grace", "0")
        results: dict[str, list[Any]] = {name: [] for name in commands}

        def once(_: int) -> None:
            for name, args in commands.items():
                measured = run_measured(args, bench.work / f"lifecycle-{name}.log")
                if measured.returncode not in (0, 1):  # 1: damage found, reported below
                    raise RuntimeError(f"{name} failed:\n{measured.log[-2000:]}")
                results[name].append(measured)

        bench.repeat(f"lifecycle: verify and gc on {count} narinfos", once)
    finally:
        bench.drop_bucket(bucket)

    narinfos, nars = count, count
    lists = math.ceil((narinfos + 1) / 1000) + math.ceil(nars / 1000)
    rows = []
    for name, runs in results.items():
        seconds = median(m.seconds for m in runs)
        peak = max(m.max_rss for m in runs)
        clean = all(m.returncode == 0 for m in runs)  # verify: 0 is a clean bucket
        rows.append(
            Row(
                f"lifecycle: {name}, {count} narinfos + {nars} NARs ({objects} objects)",
                f"{fmt_s(seconds)}, peak RSS {peak / (1 << 20):.0f} MiB"
                + ("" if clean else " (reported damage!)"),
                "—",
                "—",
                "≤ 5 min, ≤ 300 MiB",
                met(seconds <= _SECONDS and peak <= _RSS and clean),
            )
        )
    scale = 1_000_000 / narinfos
    cost = (lists * _LIST_PRICE + narinfos * _GET_PRICE) * scale
    rows.append(
        Row(
            "lifecycle: requests per verify or gc run",
            f"{lists} LIST + {narinfos} GET here; at 1 000 000 narinfos (and as many NARs) "
            f"{math.ceil(lists * scale)} LIST + {math.ceil(narinfos * scale)} GET ≈ ${cost:.2f} "
            "at AWS S3 Standard prices",
            "—",
            "—",
            "reported",
            "—",
        )
    )
    return rows


def _has_gc() -> bool:
    from uploader.cli import main

    return "gc" in main.commands
