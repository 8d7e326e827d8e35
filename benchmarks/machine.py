"""What the numbers were measured on, for the results file and the docs."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

__all__ = ["describe"]


def _first(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    lines = out.strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        return f"{kib / (1 << 20):.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def _journal(source: str) -> str:
    """ext4 only: whether the file system keeps a journal.  Without one, a new
    file skips the inodes freed in the last minutes, so creating files (the
    hook's spool entry) slows down after mass deletions."""
    parts = source.split()
    if len(parts) != 2 or parts[1] != "ext4":
        return ""
    try:
        task = Path(f"/sys/fs/ext4/{Path(parts[0]).name}/journal_task").read_text().strip()
    except OSError:
        return ""
    return ", no journal" if task == "<none>" else ", journaled"


def _disk(path: str = "/nix/store") -> str:
    usage = shutil.disk_usage(path if os.path.exists(path) else "/")
    source = _first(["findmnt", "-no", "SOURCE,FSTYPE", "--target", path])
    return (
        f"{source}{_journal(source)}, {usage.total / (1 << 30):.0f} GiB, "
        f"{usage.free / (1 << 30):.0f} GiB free"
    )


def describe() -> list[str]:
    """One ``- name: value`` line per fact."""
    facts = {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} cores (nproc)",
        "memory": _memory(),
        "disk (/nix/store)": _disk(),
        "kernel": platform.release(),
        "Nix": _first(["nix", "--version"]),
        "SeaweedFS": _first(["weed", "version"]),
        "zstd": _first(["zstd", "--version"]),
        "Python": platform.python_version(),
    }
    return [f"- {k}: {v}" for k, v in facts.items()]
