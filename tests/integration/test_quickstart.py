"""Every command of docs/quickstart.md, run as a new user would run it.

The commands are read from the quick start's ```sh blocks and run with
bash, in order, with the text as written except for the replacements in
`Quickstart.replace` (the bucket and its URL become a SeaweedFS bucket,
/opt, /usr/local/bin and /etc/nix-cache-uploader become temporary
directories) and with path flags added to `nix-cache-uploader` commands so
that install touches neither this machine's /etc nor its nix.conf.

What cannot run here is stood in for, as close to the real thing as this
machine allows: systemd is not PID 1, so the service is started the way its
unit says (ExecStart=, User=, Environment*=, LoadCredential=) and checked
with `systemd-analyze verify`; the nix-daemon cannot be restarted, so builds
pass it the post-build-hook that install put into nix.conf; and "the
laptop" is a fresh Nix store configured with the quick start's nix.conf
lines.  COVERED lists how each command is exercised: a command the quick
start gains without an entry there fails test_every_command_is_covered.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.requirements import require_binary
from tests.support.services import NixDaemon, SeaweedFS, nix_client_env
from uploader.nixconf import hook_settings

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "docs" / "quickstart.md"
USER = "ncu-qs-test"
DOC_URL = "s3://my-nix-cache?region=eu-west-1"
DOC_BUCKET = "my-nix-cache"
DOC_HTTP = "https://my-nix-cache.s3.eu-west-1.amazonaws.com"

# How each quick-start command is exercised, by a pattern matching its start.
RUN = "run as written"
SERVER_REFUSES = "run as written; SeaweedFS answers NotImplemented (AWS-only API)"
UPLOADER = "run as written, plus flags pointing install's paths into the test directory"
SYSTEMD = "needs systemd as PID 1: builds pass the hook from nix.conf instead"
BUILD = "run as written through the test nix-daemon, with nix.conf's post-build-hook"
LAPTOP = "run as written on a fresh store set up with the quick start's nix.conf lines"
COVERED = [
    (r"python3 -m venv /opt/nix-cache-uploader\b", RUN),
    (r"/opt/nix-cache-uploader/bin/pip install \.$", RUN),
    (r"ln -s ", RUN),
    (r"aws s3 mb ", RUN),
    (r"aws s3api put-public-access-block ", SERVER_REFUSES),
    (r"aws s3api put-bucket-policy ", RUN),
    (r"install -d ", RUN),
    (r"install -m 0600 /dev/null ", RUN),
    (r"cat > \S+ <<'EOF'\n", RUN),
    (r"nix-cache-uploader install --dry-run ", UPLOADER),
    (r"nix-cache-uploader install (?!--dry-run)", UPLOADER),
    (r"systemctl restart nix-daemon$", SYSTEMD),
    (r"nix-cache-uploader status$", UPLOADER),
    (r"nix-build -E ", BUILD),
    (r"nix-cache-uploader wait ", UPLOADER),
    (r"nix-store --realise ", LAPTOP),
    (r"nix-cache-uploader uninstall$", UPLOADER),
]


def code_blocks(language: str) -> list[str]:
    """The bodies of the quick start's fenced blocks in ``language`` ("": none)."""
    blocks = re.finditer(r"^```(\w*)\n(.*?)^```", QUICKSTART.read_text(), re.M | re.S)
    return [m.group(2) for m in blocks if m.group(1) == language]


def shell_commands() -> list[str]:
    """The commands of the ```sh blocks: continued lines joined, quotes and
    here-documents read to their end."""
    commands = []
    for block in code_blocks("sh"):
        lines = iter(block.splitlines())
        for line in lines:
            command = line
            while command.endswith("\\") or not _closed(command):
                command += "\n" + next(lines)
            heredoc = re.search(r"<<-?'?(\w+)'?", command)
            if heredoc:
                for body in lines:
                    command += "\n" + body
                    if body == heredoc.group(1):
                        break
            if command.strip():
                commands.append(command)
    return commands


def _closed(command: str) -> bool:
    try:
        shlex.split(command, comments=True)
    except ValueError:
        return False
    return True


def how(command: str) -> list[str]:
    return [kind for pattern, kind in COVERED if re.match(pattern, command)]


def test_every_command_is_covered() -> None:
    commands = shell_commands()
    assert len(commands) >= 10, "the parser found too few commands in the quick start"
    for command in commands:
        assert len(how(command)) == 1, (
            f"quickstart.md runs {command!r}, which matches {len(how(command))} entries of "
            "COVERED in tests/integration/test_quickstart.py: say there how it is exercised"
        )
    for pattern, _ in COVERED:
        assert any(re.match(pattern, c) for c in commands), f"{pattern!r} matches no command"


# -- running it --------------------------------------------------------------


@dataclass
class Quickstart:
    """The machine the quick start is followed on, in a temporary directory."""

    root: Path
    seaweedfs: SeaweedFS
    bucket: str
    hook: str | None = None
    built: str | None = None
    service: subprocess.Popen[bytes] | None = None
    credentials: Path | None = None
    log: list[str] = field(default_factory=list)

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "nix-cache-uploader"

    @property
    def bin(self) -> Path:
        return self.root / "usr-local-bin"

    @property
    def nix_conf(self) -> Path:
        return self.root / "nix.conf"

    def replace(self, command: str) -> str:
        for doc, here in [
            (DOC_URL, self.seaweedfs.store_url(self.bucket)),
            (DOC_BUCKET, self.bucket),
            ("/opt/nix-cache-uploader", str(self.root / "opt")),
            ("/usr/local/bin/nix-cache-uploader", str(self.bin / "nix-cache-uploader")),
            ("/etc/nix-cache-uploader", str(self.etc)),
            ("/nix/store/<hash>-hello-cache-<time>", self.built or "(not built yet)"),
        ]:
            command = command.replace(doc, here)
        return command

    def path_flags(self, command: str) -> list[str]:
        """Where install would write to this machine, the test directory instead."""
        words = shlex.split(command)
        flags = ["--config", str(self.etc / "config.toml")]
        if words[1] in ("install", "uninstall"):
            flags += [
                "--user", USER, "--nix-conf", str(self.nix_conf),
                "--unit-dir", str(self.root / "systemd"),
                "--hook-path", str(self.root / "libexec" / "post-build-hook"),
            ]  # fmt: skip
        if words[1] == "install":
            flags += [
                "--spool", str(self.root / "spool"), "--state-dir", str(self.root / "state"),
                "--gc-roots-dir", str(self.root / "gcroots"),
            ]  # fmt: skip
        return flags

    def env(self) -> dict[str, str]:
        """A Debian root's PATH (this machine's python3 may live in /root), the
        test directory's /usr/local/bin first, and the aws CLI."""
        aws = os.path.dirname(require_binary("aws"))
        env = nix_client_env(AWS_ENDPOINT_URL=self.seaweedfs.endpoint)
        env["PATH"] = (
            f"{self.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{aws}"
        )
        return env

    def sh(self, command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        self.log.append(f"$ {command}")
        out = subprocess.run(
            ["bash", "-e", "-c", command], env=self.env(), cwd=cwd or self.root,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        self.log.append(out.stdout + out.stderr)
        return out

    def run(self, command: str) -> None:
        (kind,) = how(command)
        text = self.replace(command)
        if kind == RUN:
            checkout = self.checkout() if "pip install ." in text else None
            out = self.sh(text, cwd=checkout)
            assert out.returncode == 0, out.stderr
        elif kind == SERVER_REFUSES:
            out = self.sh(text)
            assert out.returncode != 0 and "(NotImplemented)" in out.stderr, out.stderr
        elif kind == UPLOADER:
            self.uploader(text)
        elif kind == SYSTEMD:
            (self.hook,) = hook_settings(self.nix_conf.read_text())[-1:]
        elif kind == BUILD:
            assert self.hook, "the build comes after restarting the nix-daemon"
            out = self.sh(text + " --option post-build-hook " + shlex.quote(self.hook))
            assert out.returncode == 0, out.stderr
            self.built = out.stdout.split()[-1]
        else:
            self.laptop(text)

    def checkout(self) -> Path:
        """`pip install .` from a copy of the checkout (pip's build would leave
        build/ and *.egg-info in the real one)."""
        copy = self.root / "checkout"
        for name in ("pyproject.toml", "README.md", "hook", "uploader"):
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                copy.mkdir(exist_ok=True)
                shutil.copy2(source, copy / name)
        return copy

    def uploader(self, text: str) -> None:
        words = shlex.split(text)
        if words[1] == "uninstall":
            self.stop_service()  # what its `systemctl disable --now` does
        out = self.sh(f"{text} {shlex.join(self.path_flags(text))}")
        assert out.returncode == 0, out.stderr
        if words[1:3] == ["install", "--dry-run"]:
            assert "dry run:" in out.stdout and not (self.root / "spool").exists()
        elif words[1] == "install":
            assert "public key (for trusted-public-keys): cache.example.org-1:" in out.stdout
            self.start_service()
        elif words[1] == "status":
            assert "daemon:      running" in out.stdout, out.stdout
        elif words[1] == "wait":
            assert "spool drained" in out.stderr
        elif words[1] == "uninstall":
            assert self.nix_conf.read_text() == Path("/etc/nix/nix.conf").read_text()
            assert not (self.root / "systemd" / "nix-cache-uploader.service").exists()
            assert not (self.root / "libexec").exists()

    def start_service(self) -> None:
        """Start the unit install wrote as systemd would, after verifying it."""
        unit = self.root / "systemd" / "nix-cache-uploader.service"
        verify = subprocess.run(
            [require_binary("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True
        )
        assert verify.returncode == 0, verify.stderr
        values: dict[str, list[str]] = {}
        for line in unit.read_text().splitlines():
            if re.match(r"^[A-Z]\w*=", line):
                key, value = line.split("=", 1)
                values.setdefault(key, []).append(value)
        # As systemd does for a non-root User=: root-owned files on a tmpfs, 0500
        # and 0400, with read access granted to the user by an ACL (so the key
        # shows as mode 0440).
        credentials = Path(tempfile.mkdtemp(prefix="ncu-credentials-", dir="/dev/shm"))
        self.credentials = credentials
        (name, source), user = values["LoadCredential"][0].split(":", 1), values["User"][0]
        shutil.copy(source, credentials / name)
        os.chmod(credentials / name, 0o400)
        os.chmod(credentials, 0o500)
        setfacl = require_binary("setfacl")
        subprocess.run([setfacl, "-m", f"u:{user}:r", str(credentials / name)], check=True)
        subprocess.run([setfacl, "-m", f"u:{user}:rx", str(credentials)], check=True)
        assert stat.S_IMODE((credentials / name).stat().st_mode) == 0o440
        env = [v for v in values["Environment"]]
        environment_file = values["EnvironmentFile"][0].removeprefix("-")
        if os.path.exists(environment_file):
            env += [line for line in Path(environment_file).read_text().splitlines() if "=" in line]
        env.append("NIX_REMOTE=daemon")
        argv = shlex.split(values["ExecStart"][0].replace("%d", str(credentials)))
        with open(self.root / "service.log", "ab") as log:
            self.service = subprocess.Popen(
                ["setpriv", f"--reuid={user}", f"--regid={values['Group'][0]}", "--init-groups",
                 "--reset-env", "--", "/usr/bin/env", "-i", *env, *argv],
                stdout=log, stderr=subprocess.STDOUT, cwd="/", start_new_session=True,
            )  # fmt: skip
        status = self.root / "state" / "status.json"
        deadline = time.monotonic() + 60
        while not status.exists():
            assert self.service.poll() is None, (self.root / "service.log").read_text()
            assert time.monotonic() < deadline, "the service wrote no status within 60 s"
            time.sleep(0.1)

    def stop_service(self) -> None:
        if self.service is not None and self.service.poll() is None:
            os.killpg(self.service.pid, 15)
            try:
                self.service.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.service.pid, 9)
                self.service.wait()

    def laptop(self, text: str) -> None:
        """A machine that never saw the build, with the quick start's nix.conf lines."""
        (settings,) = [b for b in code_blocks("") if "extra-substituters" in b]
        public_key = (self.etc / "public-key").read_text().strip()
        settings = settings.replace(DOC_HTTP, self.seaweedfs.http_url(self.bucket))
        settings = settings.replace("cache.example.org-1:<the public key>", public_key)
        store = self.root / "laptop"
        env = self.env()
        env.pop("NIX_REMOTE")
        env["NIX_CONFIG"] = "substituters =\n" + settings
        self.log.append(f"$ {text} (laptop)")
        out = subprocess.run(
            ["bash", "-e", "-c", f"{text} --store {store}"], env=env, cwd=self.root,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "copying path" in out.stderr
        assert self.built is not None
        assert (store / self.built.lstrip("/")).read_text() == "hello\n"


@pytest.fixture
def quickstart(seaweedfs: SeaweedFS, nix_daemon: NixDaemon) -> Iterator[Quickstart]:
    if os.geteuid() != 0:
        pytest.skip("the quick start runs as root")
    for tool in ("setpriv", "setfacl", "useradd", "userdel", "systemd-analyze", "aws"):
        require_binary(tool)
    root = Path(tempfile.mkdtemp(prefix="ncu-quickstart-", dir="/var/tmp"))
    root.chmod(0o755)
    (root / "usr-local-bin").mkdir()
    # This machine's nix.conf, as install would find it.
    shutil.copy("/etc/nix/nix.conf", root / "nix.conf")
    run = Quickstart(root, seaweedfs, f"qs-{uuid.uuid4().hex[:12]}")
    try:
        yield run
    finally:
        run.stop_service()
        with contextlib.suppress(KeyError):
            pwd.getpwnam(USER)
            subprocess.run(["userdel", USER], check=True)
        with contextlib.suppress(KeyError):
            grp.getgrnam(USER)
            subprocess.run(["groupdel", USER], check=True)
        if run.credentials is not None:
            shutil.rmtree(run.credentials, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.slow
def test_the_quickstart_works(quickstart: Quickstart) -> None:
    for command in shell_commands():
        try:
            quickstart.run(command)
        except AssertionError as e:
            log = "\n".join(quickstart.log)[-6000:]
            raise AssertionError(f"quick start: {command!r} failed: {e}\n{log}") from None
