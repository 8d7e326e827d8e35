"""`scripts/bench [--quick] [--only NAME] [--runs N] [--link PROFILE]`: run
the measurements and print one markdown table, also written to
benchmarks/results/latest.md.  ``--link`` (repeatable) runs those that talk
to S3 (bulk, small, noop) through a modelled network link as well as, or
instead of, loopback."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from benchmarks import bulk, hook, interference, lifecycle, memory, noop, small
from benchmarks.harness import LOGS, REPO, RESULTS, Bench, Row, remove
from benchmarks.linkproxy import PROFILES, running_link
from benchmarks.machine import describe
from benchmarks.table import render
from tests.support.cli import make_keys
from tests.support.services import running_services

MEASUREMENTS: dict[str, ModuleType] = {
    m.NAME: m for m in (hook, bulk, small, memory, noop, interference, lifecycle)
}
LATEST = RESULTS / "latest.md"
LOOPBACK = "loopback"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark nix-cache-uploader against the manual's nix copy pipelines.",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="small workloads and 1 run by default: checks the harness in a few minutes",
    )  # fmt: skip
    parser.add_argument(
        "--only", action="append", choices=sorted(MEASUREMENTS), metavar="NAME",
        help=f"run only this measurement (repeatable): {', '.join(MEASUREMENTS)}",
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int, default=None,
        help="repeats of each timing, medians reported [default: 3, or 1 with --quick]",
    )  # fmt: skip
    parser.add_argument(
        "--link", action="append", choices=[LOOPBACK, *PROFILES], metavar="PROFILE",
        help="where S3 is (repeatable): loopback, or through a modelled link: "
        + "; ".join(p.describe() for p in PROFILES.values()) + " [default: loopback]",
    )  # fmt: skip
    parser.add_argument(
        "--no-xz", action="store_true",
        help="skip baseline (a-xz), nix copy with Nix's default xz (12 minutes in a full run)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.link = args.link or [LOOPBACK]
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


@contextlib.contextmanager
def _linked(bench: Bench, link: str) -> Iterator[None]:
    """The bench's S3 through ``link`` (a proxy started for it) or on loopback."""
    if link == LOOPBACK:
        yield
        return
    with running_link(PROFILES[link], bench.weed.s3_port) as bench.link:
        try:
            yield
        finally:
            bench.link = None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/bench: run as root (it starts nix-daemon and passes it a hook)")
        return 2
    # SeaweedFS without identities accepts any credentials; boto3 needs some.
    os.environ["AWS_ACCESS_KEY_ID"] = "bench"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "bench"
    os.environ.pop("AWS_PROFILE", None)
    names = [n for n in MEASUREMENTS if not args.only or n in args.only]
    # Only the measurements that talk to S3 run through a link.
    plan = [
        (link, n)
        for link in args.link
        for n in names
        if link == LOOPBACK or getattr(MEASUREMENTS[n], "LINKED", False)
    ]
    remove(LOGS)
    rows: list[Row] = []
    failed: list[str] = []
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="ncu-bench-") as tmp,
        running_services() as (_, weed),
    ):
        bench = Bench(
            Path(tmp), weed, make_keys(Path(tmp), "bench-cache-1"), args.quick, args.runs,
            xz=not args.no_xz,
        )  # fmt: skip
        try:
            for link, name in plan:
                with _linked(bench, link):
                    try:
                        rows += MEASUREMENTS[name].run(bench)
                    except Exception as e:
                        traceback.print_exc()
                        failed.append(f"{name}{bench.where}")
                        error = str(e).splitlines()[0][:200]
                        rows.append(Row(f"{name}{bench.where}: FAILED", error, "", ""))
        finally:
            bench.say("cleaning up: deleting the workload store paths")
            bench.delete_built()
    elapsed = time.monotonic() - started
    mode = "--quick (small workloads: not the targets' sizes)" if args.quick else "full"
    text = "\n".join(
        [
            f"Mode: {mode}; runs: {args.runs} (medians); measurements: {', '.join(names)}; "
            f"S3: {', '.join(args.link)}; "
            f"took {elapsed / 60:.1f} min; {time.strftime('%Y-%m-%d %H:%M %Z')}.",
            "",
            render(rows),
            "Machine:",
            *describe(),
            "",
        ]
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    LATEST.write_text(text)
    print(text)
    print(f"(written to {LATEST.relative_to(REPO)}; daemon logs in {LOGS.relative_to(REPO)})",
          file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
