"""`scripts/bench [--quick] [--only NAME] [--runs N]`: run the measurements
and print one markdown table, also written to benchmarks/results/latest.md."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

from benchmarks import bulk, hook, interference, lifecycle, memory, noop, small
from benchmarks.harness import LOGS, REPO, RESULTS, Bench, Row, remove
from benchmarks.machine import describe
from benchmarks.table import render
from tests.support.cli import make_keys
from tests.support.services import running_services

MEASUREMENTS: dict[str, ModuleType] = {
    m.NAME: m for m in (hook, bulk, small, memory, noop, interference, lifecycle)
}
LATEST = RESULTS / "latest.md"


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
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


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
    remove(LOGS)
    rows: list[Row] = []
    failed: list[str] = []
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="ncu-bench-") as tmp,
        running_services() as (_, weed),
    ):
        bench = Bench(Path(tmp), weed, make_keys(Path(tmp), "bench-cache-1"), args.quick, args.runs)
        try:
            for name in names:
                try:
                    rows += MEASUREMENTS[name].run(bench)
                except Exception as e:
                    traceback.print_exc()
                    failed.append(name)
                    rows.append(Row(f"{name}: FAILED", str(e).splitlines()[0][:200], "", ""))
        finally:
            bench.say("cleaning up: deleting the workload store paths")
            bench.delete_built()
    elapsed = time.monotonic() - started
    mode = "--quick (small workloads: not the targets' sizes)" if args.quick else "full"
    text = "\n".join(
        [
            f"Mode: {mode}; runs: {args.runs} (medians); measurements: {', '.join(names)}; "
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
