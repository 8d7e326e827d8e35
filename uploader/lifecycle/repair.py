"""`verify --repair`: upload again, from the local Nix store, what verify
found damaged or missing.

Through the same engine as `push`, so the NAR is streamed, checked against
the Nix database, and written before the narinfo is replaced, and a
missing reference's narinfo appears before its referrers'.  Damaged paths
are forced (the engine would otherwise skip them: their narinfo exists);
missing ones are simply absent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from uploader.engine import Engine, PushResult
from uploader.lifecycle.report import Report

__all__ = ["RepairResult", "repair"]


class LocalStore(Protocol):
    def invalid_paths(self, paths: Iterable[str]) -> set[str]: ...


@dataclass
class RepairResult:
    repaired: list[str] = field(default_factory=list)  # the damaged or missing paths fixed
    uploaded: int = 0  # paths uploaded, with references the cache lacked
    not_repaired: dict[str, str] = field(default_factory=dict)  # path or key -> why

    @property
    def complete(self) -> bool:
        return not self.not_repaired

    def to_json(self) -> dict[str, Any]:
        return {
            "repaired": self.repaired,
            "uploaded": self.uploaded,
            "not_repaired": [
                {"subject": k, "reason": v} for k, v in sorted(self.not_repaired.items())
            ],
        }


def repair(
    report: Report,
    engine: Engine,
    store: LocalStore,
    run: Callable[[Coroutine[Any, Any, PushResult]], PushResult] = asyncio.run,
) -> RepairResult:
    """Upload again the paths ``report`` found damaged or missing, that the
    local store has; ``run`` runs the push (the CLI's stops on SIGTERM)."""
    result = RepairResult()
    damaged: set[str] = set()
    missing: set[str] = set()
    for problem in report.problems:
        if problem.store_path is None:
            # No client can use it, and nothing here can rewrite it: the
            # user removes it (gc waits for that, as it cannot read it).
            result.not_repaired[problem.key] = (
                f"{problem.detail}; no store path to upload again, so delete "
                f"{problem.key} from the cache by hand (no Nix client can use it)"
            )
        elif problem.kind == "missing-reference":
            missing.add(problem.store_path)
        else:
            damaged.add(problem.store_path)
    wanted = sorted(damaged | missing)
    invalid = store.invalid_paths(wanted) if wanted else set()
    for path in sorted(invalid):
        result.not_repaired[path] = "not valid in the local Nix store"
    valid = [p for p in wanted if p not in invalid]
    if not valid:
        return result
    pushed = run(engine.push(valid, force=[p for p in valid if p in damaged]))
    for path, error in sorted(pushed.failed.items()):
        if path in wanted:
            result.not_repaired[path] = str(error)
    result.uploaded = len(pushed.uploaded)
    result.repaired = [p for p in valid if p not in pushed.failed]
    return result
