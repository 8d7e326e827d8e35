"""The results table, in markdown."""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.harness import Row

__all__ = ["render"]

_HEADER = ("measurement", "ours", "baseline", "ratio", "target", "met?")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: Sequence[Row]) -> str:
    lines = [
        "| " + " | ".join(_HEADER) + " |",
        "|" + "|".join("---" for _ in _HEADER) + "|",
    ]
    for r in rows:
        cells = (r.measurement, r.ours, r.baseline, r.ratio, r.target, r.met)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
