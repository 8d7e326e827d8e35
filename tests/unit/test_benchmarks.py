"""The benchmark command's own logic (its measurements need root, Nix and
SeaweedFS and run from `scripts/bench`, not from the test suite)."""

from __future__ import annotations

import pytest

from benchmarks.__main__ import MEASUREMENTS, parse_args
from benchmarks.harness import Row, fmt_bytes, fmt_s, met
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
