"""The benchmark command's own logic (its measurements need root, Nix and
SeaweedFS and run from `scripts/bench`, not from the test suite)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import bulk
from benchmarks.__main__ import MEASUREMENTS, parse_args
from benchmarks.harness import Row, fmt_bytes, fmt_s, met, run_measured
from benchmarks.table import render


def test_runs_default_to_three_or_one_with_quick() -> None:
    assert parse_args([]).runs == 3
    assert parse_args(["--quick"]).runs == 1
    assert parse_args(["--quick", "--runs", "2"]).runs == 2
    assert parse_args(["--only", "small", "--only", "noop"]).only == ["small", "noop"]


def test_links_default_to_loopback_and_repeat() -> None:
    assert parse_args([]).link == ["loopback"]
    assert parse_args(["--link", "far", "--link", "region"]).link == ["far", "region"]


@pytest.mark.parametrize("argv", [["--runs", "0"], ["--only", "nonsense"], ["--link", "moon"]])
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert "scripts/bench" in capsys.readouterr().err


def test_every_issue_target_has_a_measurement() -> None:
    assert set(MEASUREMENTS) == {
        "hook", "bulk", "small", "memory", "noop", "interference", "lifecycle",
    }  # fmt: skip


def test_table_rows_are_one_line_each_and_escape_pipes() -> None:
    rows = [
        Row("a | b", fmt_s(0.0023), "x\ny", "2.00x", "≤ 3x", met(True)),
        Row("c", fmt_s(12.5), fmt_bytes(1.5 * (1 << 30)), "—", met=met(False)),
    ]
    lines = render(rows).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| a \\| b | 2.30 ms | x y | 2.00x | ≤ 3x | yes |"
    assert lines[3] == "| c | 12.50 s | 1.50 GiB | — | — | **no** |"


def test_a_measured_command_reports_its_cpu_time(tmp_path: Path) -> None:
    busy = "import time\nt = time.process_time() + 0.3\nwhile time.process_time() < t: pass"
    idle = "import time; time.sleep(0.3)"
    measured = run_measured([sys.executable, "-c", busy], tmp_path / "busy.log")
    assert measured.returncode == 0
    assert measured.cpu >= 0.3
    assert run_measured([sys.executable, "-c", idle], tmp_path / "idle.log").cpu < 0.2


def test_the_bulk_cpu_row_is_the_fastest_the_machine_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bulk.os, "cpu_count", lambda: 2)
    link = SimpleNamespace(link=SimpleNamespace(name="region"))
    bench = SimpleNamespace(where=" [region]", link=link)
    t = {"cpu": 8.0, "server-cpu": 4.5, "link-cpu": 0.5, "a": 12.0}
    row = bulk._cpu_row(bench, t)  # type: ignore[arg-type]
    # 13 core-seconds over 2 cores: no push can end before 6.5 s here.
    assert "= 13.0 core-s: 6.50 s at best" in row.ours
    assert "link proxy 0.50 s" in row.ours
    assert row.ratio == "at most 1.85x faster here"
    no_link = bulk._cpu_row(SimpleNamespace(where="", link=None), {**t, "link-cpu": 0.0})  # type: ignore[arg-type]
    assert "link proxy" not in no_link.ours
    assert "= 12.5 core-s: 6.25 s at best" in no_link.ours
