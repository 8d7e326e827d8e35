"""A real `nix-cache-uploader run` for tests: its own spool, state and GC-root
directories, a hook wrapper that nix-daemon can call, and start/stop/kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.cli import run_cli
from uploader.spool import DEFAULT_SPOOL

__all__ = ["HOOK", "UploaderRun", "make_hook_wrapper"]

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "hook" / "post-build-hook"


def make_hook_wrapper(directory: Path, spool: Path, hook: Path = HOOK) -> Path:
    """nix-daemon runs the hook with its own environment, so a spool other
    than the default is baked into a copy of the hook (no wrapper process:
    the hook's cost is what the build loop pays)."""
    text = hook.read_text()
    default = f"${{NIX_CACHE_UPLOADER_SPOOL:-{DEFAULT_SPOOL}}}"
    assert default in text, "the hook's default spool line changed"
    copy = directory / "post-build-hook"
    copy.write_text(text.replace(default, f"${{NIX_CACHE_UPLOADER_SPOOL:-{spool}}}"))
    copy.chmod(0o755)
    return copy


@dataclass
class UploaderRun:
    """Directories and the daemon process of one test's uploader."""

    root: Path
    store_url: str
    secret_key_file: str
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    user: str | None = None
    python: str = sys.executable
    # When set, `run`, `wait` and `status` get only --config: the file names
    # this run's directories, URL and key (the test writes it).
    config_file: Path | None = None
    # The daemon's environment (default: this process's).
    env: dict[str, str] | None = None

    def __post_init__(self) -> None:
        for d in (self.spool, self.state_dir, self.gc_roots):
            d.mkdir(parents=True, exist_ok=True)
        self.spool.chmod(0o2770)
        self.hook = make_hook_wrapper(self.root, self.spool)

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def gc_roots(self) -> Path:
        return self.root / "gcroots"

    @property
    def log_path(self) -> Path:
        return self.root / "uploader.log"

    def queue_args(self) -> list[str]:
        if self.config_file is not None:
            return ["--config", str(self.config_file)]
        return ["--spool", str(self.spool), "--state-dir", str(self.state_dir)]

    def command(self) -> list[str]:
        if self.config_file is not None:
            return [self.python, "-m", "uploader", "run", *self.queue_args(), *self.extra_args]
        return [
            self.python, "-m", "uploader", "run", *self.queue_args(),
            "--gc-roots-dir", str(self.gc_roots), "--to", self.store_url,
            "--secret-key-file", self.secret_key_file, *self.extra_args,
        ]  # fmt: skip

    def argv(self, extra: Sequence[str] = ()) -> list[str]:
        """The daemon's command line, switched to ``user`` when one is set
        (setpriv execs, so the process started is the daemon itself)."""
        cmd = self.command() + list(extra)
        if self.user:
            cmd = ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups",
                   "--reset-env", "--", "/usr/bin/env", *_child_env(), *cmd]  # fmt: skip
        return cmd

    @property
    def cwd(self) -> str:
        # `python -m` imports from the working directory first: a daemon run
        # as another user must use its own installed copy, not the checkout.
        return str(self.root if self.user else REPO)

    def start(self, extra: Sequence[str] = ()) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(extra),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=True,
            )
        self._wait_status()

    def _wait_status(self, timeout: float = 30) -> None:
        """Until the daemon has written its first status (it is serving)."""
        deadline = time.monotonic() + timeout
        status = self.state_dir / "status.json"
        started = time.time()
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"uploader exited at start:\n{self.log()}")
            if status.exists() and status.stat().st_mtime >= started - 1:
                return
            time.sleep(0.05)
        raise AssertionError(f"uploader wrote no status within {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: in-flight work drains, the rest stays queued."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"uploader did not stop within {timeout}s:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def wait_drained(self, timeout: float = 300) -> None:
        result = run_cli("wait", *self.queue_args(), "--timeout", str(timeout), check=False)
        if result.returncode != 0:
            status = run_cli("status", *self.queue_args(), check=False).stdout
            raise AssertionError(
                f"spool not drained: {result.stderr}\n{status}\nlog:\n{self.log()[-4000:]}"
            )

    def pending(self) -> list[str]:
        return sorted(p.name for p in self.spool.iterdir() if p.name.endswith(".entry"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _child_env() -> list[str]:
    keep = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PATH", "NIX_REMOTE", "NIX_CONFIG")
    env = [f"{k}={os.environ[k]}" for k in keep if k in os.environ]
    return [*env, "HOME=/nonexistent"]
