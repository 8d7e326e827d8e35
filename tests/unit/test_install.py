"""install, uninstall and check-config without touching the machine: every
path points into tmp_path, and accounts and systemd live in a FakeHost."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from uploader._exceptions import ConfigError
from uploader.cli import main
from uploader.config import DEFAULT_CONFIG, DEFAULT_GC_ROOTS, DEFAULT_STATE_DIR, Settings
from uploader.host import Account, InstallError
from uploader.install import (
    Layout,
    Plan,
    Request,
    execute,
    packaged_hook,
    plan_install,
    plan_uninstall,
    service_command,
    service_path,
)
from uploader.nixconf import DISABLED, MARK, ForeignHookError, add_hook, hook_settings, remove_hook
from uploader.signing import SecretKey, generate, write_secret_key
from uploader.spool import DEFAULT_SPOOL
from uploader.unit import HEADER, UnitParams, render_config, render_unit, render_wrapper

REPO = Path(__file__).resolve().parents[2]
NIX_CONF = "# see https://nixos.org/nix/manual/#sec-conf-file\n\nsandbox = false\n"
STORE_URL = "s3://my-nix-cache?region=eu-west-1"
COMMAND = ("/opt/nix-cache-uploader/bin/nix-cache-uploader",)
PATH = ("/usr/bin", "/usr/local/bin", "/bin")


# -- a machine in memory -----------------------------------------------------


@dataclass
class FakeHost:
    """Accounts, ownership and systemd in dicts; it records what it is told."""

    systemd_running: bool = False
    uids: dict[str, int] = field(default_factory=dict)
    primary: dict[str, str] = field(default_factory=dict)
    groups: dict[str, set[str]] = field(default_factory=lambda: {"nix-users": set()})
    owners: dict[str, tuple[str, str]] = field(default_factory=dict)
    daemons: list[int] = field(default_factory=list)
    enabled: bool = False
    active: bool = False
    log: list[str] = field(default_factory=list)

    def account(self, name: str) -> Account | None:
        if name not in self.uids:
            return None
        member_of = {g for g, members in self.groups.items() if name in members}
        return Account(name, self.uids[name], frozenset({self.primary[name], *member_of}))

    def group_members(self, name: str) -> list[str] | None:
        if name not in self.groups:
            return None
        return sorted(self.groups[name] | {u for u, g in self.primary.items() if g == name})

    def add_group(self, name: str) -> None:
        self.log.append(f"groupadd {name}")
        self.groups[name] = set()

    def add_user(self, name: str, group: str, home: str) -> None:
        self.log.append(f"useradd {name} {group} {home}")
        self.uids[name], self.primary[name] = 990, group

    def add_to_group(self, user: str, group: str) -> None:
        self.log.append(f"usermod {user} +{group}")
        self.groups[group].add(user)

    def remove_user(self, name: str) -> None:
        self.log.append(f"userdel {name}")
        del self.uids[name], self.primary[name]
        for members in self.groups.values():
            members.discard(name)

    def remove_group(self, name: str) -> None:
        self.log.append(f"groupdel {name}")
        self.groups.pop(name, None)

    def chown(self, path: str, user: str, group: str) -> None:
        self.owners[os.path.realpath(path)] = (user, group)

    def owner(self, path: str) -> tuple[str, str]:
        return self.owners.get(os.path.realpath(path), ("root", "root"))

    def systemd(self) -> bool:
        return self.systemd_running

    def systemctl(self, *args: str) -> None:
        self.log.append("systemctl " + " ".join(args))
        if args[0] in ("enable", "disable"):
            self.enabled = args[0] == "enable"
            if "--now" in args:
                self.active = self.enabled
        elif args[0] == "restart":
            self.active = True

    def unit_state(self, unit: str) -> tuple[bool, bool]:
        return self.enabled, self.active

    def nix_daemons(self, nix_conf: str, since: float | None) -> list[int]:
        return list(self.daemons)


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    (tmp_path / "nix").mkdir()
    (tmp_path / "nix" / "nix.conf").write_text(NIX_CONF)
    return Layout(
        user="ncu",
        group="ncu",
        config=str(tmp_path / "etc" / "config.toml"),
        nix_conf=str(tmp_path / "nix" / "nix.conf"),
        unit_dir=str(tmp_path / "systemd"),
        hook_path=str(tmp_path / "libexec" / "post-build-hook"),
    )


def request(tmp_path: Path, **changes: object) -> Request:
    values: dict[str, object] = {
        "command": COMMAND,
        "path": PATH,
        "to": STORE_URL,
        "spool": str(tmp_path / "spool"),
        "state_dir": str(tmp_path / "state"),
        "gc_roots_dir": str(tmp_path / "gcroots"),
    }
    values.update(changes)
    return Request(**values)  # type: ignore[arg-type]


def run(plan: Plan, *, dry_run: bool = False) -> list[str]:
    lines: list[str] = []
    execute(plan, dry_run=dry_run, echo=lines.append, nothing="nothing to do")
    return lines


def tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under root with its mode and contents."""
    return {
        str(p): (p.lstat().st_mode, p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


# -- the unit ----------------------------------------------------------------


def directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if re.match(r"^[A-Za-z]+=", line):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def unit_params(**changes: object) -> UnitParams:
    values: dict[str, object] = {
        "command": COMMAND,
        "config": DEFAULT_CONFIG,
        "secret_key_file": "/etc/nix-cache-uploader/secret-key",
        "environment_file": "/etc/nix-cache-uploader/environment",
        "user": "nix-cache-uploader",
        "group": "nix-cache-uploader",
        "path": PATH,
    }
    values.update(changes)
    return UnitParams(**values)  # type: ignore[arg-type]


# The hardening the deployment issue asks for, value for value.
HARDENING = {
    "NoNewPrivileges": ["yes"],
    "ProtectSystem": ["strict"],
    "ProtectHome": ["yes"],
    "PrivateTmp": ["yes"],
    "PrivateDevices": ["yes"],
    "CapabilityBoundingSet": [""],
    "AmbientCapabilities": [""],
    "SystemCallFilter": ["@system-service", "~@privileged"],
    "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
    "MemoryDenyWriteExecute": ["yes"],
    "RestrictNamespaces": ["yes"],
    "LockPersonality": ["yes"],
    "Nice": ["19"],
    "CPUWeight": ["20"],
    "IOSchedulingClass": ["idle"],
    "Restart": ["on-failure"],
    "KillMode": ["mixed"],
    "KillSignal": ["SIGTERM"],
    "TimeoutStopSec": ["90"],
    "User": ["nix-cache-uploader"],
    "Group": ["nix-cache-uploader"],
    "StateDirectory": ["nix-cache-uploader"],
    "LoadCredential": ["secret-key:/etc/nix-cache-uploader/secret-key"],
    "EnvironmentFile": ["-/etc/nix-cache-uploader/environment"],
    "ReadWritePaths": [f"{DEFAULT_SPOOL} {DEFAULT_GC_ROOTS}"],
    "WantedBy": ["multi-user.target"],
}


@pytest.mark.parametrize("directive", sorted(HARDENING))
def test_unit_sets_each_hardening_directive(directive: str) -> None:
    assert directives(render_unit(unit_params(), Settings()))[directive] == HARDENING[directive]


def test_unit_runs_this_command_with_the_key_as_a_credential() -> None:
    found = directives(render_unit(unit_params(), Settings()))
    assert found["ExecStart"] == [
        f"{COMMAND[0]} run --config {DEFAULT_CONFIG} --secret-key-file %d/secret-key"
    ]
    assert found["Environment"] == [f"PATH={':'.join(PATH)}", f"HOME={DEFAULT_STATE_DIR}"]


def test_unit_makes_other_directories_writable_and_waits_for_the_drain() -> None:
    settings = Settings(state_dir="/srv/state", tmp_dir="/srv/tmp", drain_timeout=45.5)
    found = directives(render_unit(unit_params(), settings))
    # '-': a tmp-dir that is missing must not stop systemd at namespace setup.
    assert found["ReadWritePaths"] == [f"{DEFAULT_SPOOL} {DEFAULT_GC_ROOTS} /srv/state -/srv/tmp"]
    assert found["TimeoutStopSec"] == ["76"]
    # The user's home is the state directory install made; systemd makes no other.
    assert found["Environment"][1] == "HOME=/srv/state"
    assert "StateDirectory" not in found


@pytest.mark.parametrize(
    ("to", "tmp_dir", "extra"),
    [
        ("file:///srv/nix-cache", None, " -/srv/nix-cache"),
        ("file://localhost/srv/nix%cache/?compression=xz", None, " -/srv/nix%%cache"),
        ("file:///srv/nix-cache", "/var/cache/ncu", " -/srv/nix-cache -/var/cache/ncu"),
        (STORE_URL, "/tmp", ""),  # PrivateTmp= makes /tmp writable already
        (STORE_URL, "/var/tmp", ""),
    ],
)
def test_unit_makes_a_file_cache_and_tmp_dir_writable(
    to: str, tmp_dir: str | None, extra: str
) -> None:
    found = directives(render_unit(unit_params(), Settings(to=to, tmp_dir=tmp_dir)))
    assert found["ProtectSystem"] == ["strict"]
    assert found["ReadWritePaths"] == [f"{DEFAULT_SPOOL} {DEFAULT_GC_ROOTS}{extra}"]


def test_unit_runs_at_normal_priority_when_asked() -> None:
    found = directives(render_unit(unit_params(), Settings(low_priority=False)))
    assert not {"Nice", "CPUWeight", "IOSchedulingClass"} & set(found)


def test_unit_quotes_what_systemd_would_expand_or_split() -> None:
    unit = render_unit(
        unit_params(
            command=("/usr/bin/python3", "-m", "uploader"), config="/etc/my conf/100%.toml"
        ),
        Settings(),
    )
    (exec_start,) = directives(unit)["ExecStart"]
    assert exec_start.startswith(
        '/usr/bin/python3 -m uploader run --config "/etc/my conf/100%%.toml"'
    )


def test_unit_doubles_dollar_signs_in_the_command_line() -> None:
    """Broken, systemd would expand a `$` in the --config path and the
    service would read another file, or none."""
    unit = render_unit(unit_params(config="/etc/$HOME/config.toml"), Settings())
    assert "--config /etc/$$HOME/config.toml" in directives(unit)["ExecStart"][0]


def test_the_quickstart_shows_the_unit_install_writes() -> None:
    text = (REPO / "docs" / "quickstart.md").read_text()
    (shown,) = re.findall(r"^```ini\n(.*?)^```", text, re.M | re.S)
    # What install writes after `ln -s … /usr/local/bin/nix-cache-uploader`
    # on a machine with Nix's installer (nix in the default profile).
    params = unit_params(
        command=("/usr/local/bin/nix-cache-uploader",),
        path=("/nix/var/nix/profiles/default/bin", "/usr/local/bin", "/usr/bin", "/bin"),
    )
    assert shown == render_unit(params, Settings())


def test_wrapper_passes_the_spool_and_never_fails(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.write_text('#!/bin/sh\necho "spool=$NIX_CACHE_UPLOADER_SPOOL"\n')
    hook.chmod(0o755)
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(render_wrapper(str(hook), "/srv/my spool"))
    out = subprocess.run(["sh", str(wrapper)], capture_output=True, text=True)
    assert out.stdout == "spool=/srv/my spool\n"
    hook.unlink()
    out = subprocess.run(["sh", str(wrapper)], capture_output=True, text=True)
    assert out.returncode == 0
    assert "is missing" in out.stderr
    # Executable but cannot run: a shell whose exec fails would exit 127.
    hook.write_text("#!/nonexistent/interpreter\n")
    hook.chmod(0o755)
    out = subprocess.run(["sh", str(wrapper)], capture_output=True, text=True)
    assert out.returncode == 0
    assert "is missing or failed" in out.stderr


def test_config_file_reads_back() -> None:
    values = {"to": STORE_URL, "jobs": 8, "drain-timeout": 1.5, "upstream-keys": ["a-1", 'b"2']}
    text = render_config(values)
    assert text.startswith(HEADER)
    assert tomllib.loads(text) == values


# -- nix.conf ----------------------------------------------------------------

HOOK = "/usr/local/libexec/nix-cache-uploader/post-build-hook"
OTHER = "/etc/nix/upload-to-cache.sh"


@pytest.mark.parametrize(
    "text",
    [
        "",
        NIX_CONF,
        "sandbox = false",  # no newline at the end
        "max-jobs = 4\n\n# a comment\nsubstituters = https://cache.nixos.org\n",
        "post-build-hook =\n",  # set to nothing: not another hook
        "\n\n",
    ],
    ids=["empty", "debian", "no-final-newline", "settings", "empty-hook", "blank"],
)
def test_hook_line_is_added_once_and_removed_exactly(text: str) -> None:
    added = add_hook(text, HOOK)
    assert added.startswith(text.rstrip("\n"))
    assert added.endswith(f"{MARK}\npost-build-hook = {HOOK}\n") or "(and the newline" in added
    assert hook_settings(added)[-1] == HOOK
    assert add_hook(added, HOOK) == added
    assert remove_hook(added) == (text, [HOOK])


def test_a_hook_set_by_hand_to_ours_is_left_alone() -> None:
    text = f"sandbox = false\npost-build-hook = {HOOK}\n"
    assert add_hook(text, HOOK) == text
    assert remove_hook(text) == (text, [])


@pytest.mark.parametrize(
    "line", [f"post-build-hook = {OTHER}", f"  post-build-hook={OTHER} # ours"]
)
def test_another_hook_is_refused_without_force(line: str) -> None:
    text = f"sandbox = false\n{line}\nmax-jobs = 2\n"
    with pytest.raises(ForeignHookError, match=re.escape(OTHER)):
        add_hook(text, HOOK)
    forced = add_hook(text, HOOK, force=True)
    assert f"{DISABLED}{line}\n" in forced
    assert hook_settings(forced) == [HOOK]
    assert remove_hook(forced) == (text, [HOOK])


def test_a_later_install_updates_its_own_line() -> None:
    first = add_hook(NIX_CONF, HOOK)
    second = add_hook(first, HOOK + "-wrapper")
    assert second.count(MARK) == 1
    assert hook_settings(second) == [HOOK + "-wrapper"]
    assert remove_hook(second)[0] == NIX_CONF


LINES = st.sampled_from(
    [
        "sandbox = false",
        "",
        "# post-build-hook = /commented",
        f"post-build-hook = {OTHER}",
        "post-build-hook =",
        "extra-substituters = https://example.org",
        "  max-jobs=2   # trailing comment",
        "\t",
    ]
)


@given(st.lists(LINES, max_size=8), st.booleans())
def test_uninstall_restores_any_nix_conf_byte_for_byte(lines: list[str], final: bool) -> None:
    text = "\n".join(lines) + ("\n" if final and lines else "")
    added = add_hook(text, HOOK, force=True)
    assert hook_settings(added)[-1] == HOOK
    assert set(hook_settings(added)) <= {HOOK, ""}
    assert remove_hook(added)[0] == text


# -- install -----------------------------------------------------------------


def test_dry_run_prints_each_action_and_changes_nothing(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    before = tree(tmp_path)
    lines = run(plan_install(layout, request(tmp_path), host), dry_run=True)
    spool, wrapper = tmp_path / "spool", layout.wrapper_path
    for expected in [
        "create group ncu",
        "create user ncu (system user in group ncu, no login shell)",
        "add user ncu to group nix-users (to reach the nix-daemon's socket)",
        f"create directory {spool} (root:ncu, mode 2770)",
        f"create directory {tmp_path / 'state'} (ncu:ncu, mode 0755)",
        f"create directory {tmp_path / 'gcroots'} (ncu:ncu, mode 0755)",
        f"write {layout.hook_path} (post-build hook)",
        f"write {wrapper} (hook wrapper for spool {spool})",
        f"write {layout.config} "
        "(to, secret-key-file, spool, state-dir, gc-roots-dir, upstream-keys)",
        f"write {layout.unit_path} (systemd unit)",
        f"add post-build-hook = {wrapper} to {layout.nix_conf}",
        "dry run: 11 actions, nothing changed",
    ]:
        assert expected in lines
    assert tree(tmp_path) == before
    assert host.log == []


def test_the_default_spool_needs_no_wrapper(layout: Layout, host: FakeHost) -> None:
    plan = plan_install(layout, Request(COMMAND, PATH, to=STORE_URL), host)
    texts = [text for text, _ in plan.actions]
    assert f"add post-build-hook = {layout.hook_path} to {layout.nix_conf}" in texts
    assert not any("wrapper" in text for text in texts)


def test_install_sets_everything_up_once(tmp_path: Path, layout: Layout, host: FakeHost) -> None:
    run(plan_install(layout, request(tmp_path), host))
    assert host.log == [
        "groupadd ncu",
        f"useradd ncu ncu {tmp_path / 'state'}",
        "usermod ncu +nix-users",
    ]
    spool = tmp_path / "spool"
    assert stat.S_IMODE(spool.stat().st_mode) == 0o2770
    assert host.owner(str(spool)) == ("root", "ncu")
    assert host.owner(str(tmp_path / "gcroots")) == ("ncu", "ncu")
    hook = Path(layout.hook_path)
    assert hook.read_bytes() == packaged_hook()
    assert stat.S_IMODE(hook.stat().st_mode) == 0o755
    assert f"NIX_CACHE_UPLOADER_SPOOL={spool}" in Path(layout.wrapper_path).read_text()
    config = tomllib.loads(Path(layout.config).read_text())
    assert config["to"] == STORE_URL
    assert config["secret-key-file"] == str(tmp_path / "etc" / "secret-key")
    assert config["upstream-keys"] == ["cache.nixos.org-1"]
    unit = Path(layout.unit_path).read_text()
    assert f"ExecStart={COMMAND[0]} run --config {layout.config} " in unit
    assert f"LoadCredential=secret-key:{tmp_path / 'etc' / 'secret-key'}" in unit
    assert f"EnvironmentFile=-{tmp_path / 'etc' / 'environment'}" in unit
    conf = Path(layout.nix_conf).read_text()
    assert conf == f"{NIX_CONF}{MARK}\npost-build-hook = {layout.wrapper_path}\n"

    before = tree(tmp_path)
    assert run(plan_install(layout, request(tmp_path), host)) == [
        "nothing to do",
        "note: systemd is not running here (it is not PID 1): nix-cache-uploader.service is "
        "not enabled or started; on a machine booted with systemd, install does that",
        "next:",
        "  - create the signing key: nix-cache-uploader keygen NAME "
        f"{tmp_path / 'etc' / 'secret-key'} {tmp_path / 'etc' / 'public-key'} "
        "(NAME: e.g. cache.example.org-1); the service starts once it exists",
        "  - unless the machine has an instance role, put the S3 credentials into "
        f"{tmp_path / 'etc' / 'environment'} (mode 0600): AWS_ACCESS_KEY_ID=... and "
        "AWS_SECRET_ACCESS_KEY=..., then restart the service",
        f"  - check the uploader: nix-cache-uploader status --config {layout.config}",
    ]
    assert tree(tmp_path) == before


def test_install_makes_a_missing_file_cache_and_leaves_one_alone(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    cache = tmp_path / "cache"
    run(plan_install(layout, request(tmp_path, to=f"file://{cache}"), host))
    assert cache.is_dir()
    assert host.owner(str(cache)) == ("ncu", "ncu")
    # '-': the unit starts should the directory go missing.
    assert f" -{cache}\n" in Path(layout.unit_path).read_text()

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o775)
    os.chmod(shared, 0o775)
    Path(layout.config).unlink()
    plan = plan_install(layout, request(tmp_path, to=f"file://{shared}"), host)
    assert not any(str(shared) in text for text, _ in plan.actions)


def test_install_makes_a_missing_tmp_dir(tmp_path: Path, layout: Layout, host: FakeHost) -> None:
    scratch = tmp_path / "scratch"
    Path(layout.config).parent.mkdir()
    req = request(tmp_path)
    Path(layout.config).write_text(
        render_config({"to": STORE_URL, "spool": req.spool, "state-dir": req.state_dir,
                       "gc-roots-dir": req.gc_roots_dir, "tmp-dir": str(scratch)})
    )  # fmt: skip
    run(plan_install(layout, req, host))
    assert scratch.is_dir()
    assert host.owner(str(scratch)) == ("ncu", "ncu")
    assert f" -{scratch}\n" in Path(layout.unit_path).read_text()


def test_install_repairs_what_drifted(tmp_path: Path, layout: Layout, host: FakeHost) -> None:
    run(plan_install(layout, request(tmp_path), host))
    (tmp_path / "spool").chmod(0o755)
    Path(layout.hook_path).write_text("#!/bin/sh\n# nix-cache-uploader post-build hook, old\n")
    texts = [t for t, _ in plan_install(layout, request(tmp_path), host).actions]
    assert texts == [
        f"set {tmp_path / 'spool'} to root:ncu, mode 2770",
        f"update {layout.hook_path} (post-build hook)",
    ]


def test_install_repairs_the_mode_of_a_file_whose_bytes_are_right(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    """Broken, a hook chmod'ed to 0644 (which Nix cannot run) would be
    reported as "nothing to do" and every build's upload would be lost."""
    run(plan_install(layout, request(tmp_path), host))
    Path(layout.hook_path).chmod(0o644)
    texts = [t for t, _ in plan_install(layout, request(tmp_path), host).actions]
    assert texts == [f"update {layout.hook_path} (post-build hook)"]
    run(plan_install(layout, request(tmp_path), host))
    assert Path(layout.hook_path).stat().st_mode & 0o777 == 0o755


def test_install_repairs_the_owner_of_a_directory(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    """Broken, a state directory that drifted to root:root (mode still
    right) would stay unwritable to the daemon, and install would not say so."""
    run(plan_install(layout, request(tmp_path), host))
    host.chown(str(tmp_path / "state"), "root", "root")
    texts = [t for t, _ in plan_install(layout, request(tmp_path), host).actions]
    assert texts == [f"set {tmp_path / 'state'} to ncu:ncu, mode 0755"]


def test_install_notes_a_key_the_group_can_read(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    """Broken, a signing key readable by its group would go unmentioned."""
    key = tmp_path / "etc" / "secret-key"
    key.parent.mkdir()
    write_secret_key(str(key), generate("test-1"))
    key.chmod(0o640)
    plan = plan_install(layout, request(tmp_path), host)
    assert f"{key} is readable by others: run chmod 600 {key}" in plan.notes


def test_install_refuses_a_relative_key_file(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    """Broken, install would succeed and the service would then fail at
    start, as systemd's LoadCredential= takes only absolute paths."""
    with pytest.raises(ConfigError, match="must be an absolute path: systemd loads it"):
        plan_install(layout, request(tmp_path, secret_key_file="keys/secret"), host)


def test_a_public_key_without_its_secret_key_stops_install_before_any_change(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    """Broken, --generate-key would write a secret key, fail on the existing
    public key, and leave half a key pair and half an installation."""
    public, secret = tmp_path / "etc" / "public-key", tmp_path / "etc" / "secret-key"
    public.parent.mkdir()
    public.write_text("old-1:AAAA\n")
    plan = plan_install(layout, request(tmp_path, generate_key="test-1"), host)
    assert plan.conflicts == [f"{public} exists without its secret key {secret}; move it away"]
    with pytest.raises(ConfigError):
        run(plan)
    assert not secret.exists() and not (tmp_path / "spool").exists()


def test_uninstall_restores_nix_conf_and_purge_removes_the_rest(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    before = Path(layout.nix_conf).read_bytes()
    run(plan_install(layout, request(tmp_path, generate_key="test-1"), host))
    lines = run(plan_uninstall(layout, host, purge=False, force=False))
    assert f"remove {layout.unit_path}" in lines
    assert Path(layout.nix_conf).read_bytes() == before
    assert not Path(layout.unit_path).exists()
    assert not Path(layout.hook_path).exists() and not Path(layout.wrapper_path).exists()
    assert (tmp_path / "spool").is_dir() and host.account("ncu") is not None

    (tmp_path / "spool" / "x.drv.1.entry").write_text("nix-cache-uploader-spool 1\n")
    lines = run(plan_uninstall(layout, host, purge=True, force=False))
    assert f"note: 1 build queued in {tmp_path / 'spool'} not uploaded" in lines
    for gone in ("spool", "state", "gcroots", "etc/config.toml"):
        assert not (tmp_path / gone).exists()
    assert host.account("ncu") is None and host.group_members("ncu") is None
    # The key is never removed.
    assert (tmp_path / "etc" / "secret-key").exists()
    assert Path(layout.nix_conf).read_bytes() == before
    assert "nothing to do" in run(plan_uninstall(layout, host, purge=True, force=False))


def test_another_hook_stops_install_until_forced(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    original = f"{NIX_CONF}post-build-hook = {OTHER}\n"
    Path(layout.nix_conf).write_text(original)
    before = tree(tmp_path)
    with pytest.raises(ConfigError, match=r"already sets post-build-hook.*--force"):
        run(plan_install(layout, request(tmp_path), host))
    assert tree(tmp_path) == before and host.log == []

    lines = run(plan_install(layout, request(tmp_path, force=True), host))
    assert (
        f"add post-build-hook = {layout.wrapper_path} to {layout.nix_conf}, "
        f"commenting out post-build-hook = {OTHER}"
    ) in lines
    assert hook_settings(Path(layout.nix_conf).read_text()) == [layout.wrapper_path]
    lines = run(plan_uninstall(layout, host, purge=False, force=False))
    assert any(line.endswith(f"restoring post-build-hook = {OTHER}") for line in lines)
    assert Path(layout.nix_conf).read_text() == original


def test_an_existing_config_file_is_kept_unless_forced(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    config = Path(layout.config)
    config.parent.mkdir()
    config.write_text(f'to = "{STORE_URL}"\njobs = 8\n')
    lines: list[str] = []
    with pytest.raises(ConfigError, match="differs from the settings given"):
        execute(plan_install(layout, request(tmp_path), host), dry_run=False,
                echo=lines.append, nothing="")  # fmt: skip
    assert any(line.startswith(f"--- {config}") and "+spool = " in line for line in lines)
    assert config.read_text() == f'to = "{STORE_URL}"\njobs = 8\n'

    # Without path flags, install takes the file as it is.
    plan = plan_install(layout, Request(COMMAND, PATH), host)
    assert not plan.conflicts and not plan.diffs

    run(plan_install(layout, request(tmp_path, to="file:///srv/cache", force=True), host))
    written = tomllib.loads(config.read_text())
    assert written["to"] == "file:///srv/cache" and written["jobs"] == 8


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"to": None}, "--to is required"),
        ({"to": "s3://x"}, "bucket names have at least 3 characters"),
        ({"spool": "relative/spool"}, "spool must be an absolute path"),
    ],
)
def test_unusable_input_is_refused(
    tmp_path: Path, layout: Layout, host: FakeHost, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_install(layout, request(tmp_path, **changes), host)


def test_a_unit_install_did_not_write_is_a_conflict(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    unit = Path(layout.unit_path)
    unit.parent.mkdir()
    unit.write_text("[Service]\nExecStart=/usr/bin/handmade\n")
    plan = plan_install(layout, request(tmp_path), host)
    assert plan.conflicts == [f"{unit} exists and was not written by install; --force replaces it"]
    assert plan_uninstall(layout, host, purge=False, force=False).notes == [
        f"{unit} was not written by install: kept (--force removes it)"
    ]


def test_root_is_no_uploader_user(tmp_path: Path, layout: Layout) -> None:
    host = FakeHost(uids={"root": 0}, primary={"root": "root"}, groups={"root": set()})
    root = Layout(**{**layout.__dict__, "user": "root", "group": "root"})
    plan = plan_install(root, request(tmp_path), host)
    assert "--user root is root: the uploader needs a user of its own" in plan.conflicts


def test_generated_key_stays_roots(tmp_path: Path, layout: Layout, host: FakeHost) -> None:
    lines = run(plan_install(layout, request(tmp_path, generate_key="cache.test-1"), host))
    key = tmp_path / "etc" / "secret-key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # systemd hands the service its copy (LoadCredential=): the user needs none.
    assert host.owner(str(key)) == ("root", "root")
    public = (tmp_path / "etc" / "public-key").read_text().strip()
    assert public == SecretKey.load(str(key)).public_key().to_text()
    assert f"  public key (for trusted-public-keys): {public}" in lines
    plan = plan_install(layout, request(tmp_path, generate_key="cache.test-2"), host)
    assert f"{key} exists: not generating a key (install never replaces one)" in plan.notes
    assert plan.actions == []


def test_systemd_enables_starts_and_restarts(tmp_path: Path, layout: Layout) -> None:
    host = FakeHost(systemd_running=True)
    run(plan_install(layout, request(tmp_path), host))
    # No key yet: enabled, but started only once there is one.
    assert host.log[-2:] == [
        "systemctl daemon-reload",
        "systemctl enable nix-cache-uploader.service",
    ]
    write_secret_key(str(tmp_path / "etc" / "secret-key"), generate("test-1"))
    run(plan_install(layout, request(tmp_path), host))
    assert host.log[-1] == "systemctl enable --now nix-cache-uploader.service"
    assert run(plan_install(layout, request(tmp_path), host))[0] == "nothing to do"
    run(plan_install(layout, request(tmp_path, to="file:///srv/cache", force=True), host))
    assert host.log[-1] == "systemctl restart nix-cache-uploader.service"
    run(plan_uninstall(layout, host, purge=False, force=False))
    assert host.log[-2:] == [
        "systemctl disable --now nix-cache-uploader.service",
        "systemctl daemon-reload",
    ]


def test_a_config_change_alone_restarts_the_service(tmp_path: Path, layout: Layout) -> None:
    """Broken, a new bucket written to the config file would not reach the
    running daemon, which would go on uploading to the old one."""
    host = FakeHost(systemd_running=True)
    (tmp_path / "etc").mkdir()
    write_secret_key(str(tmp_path / "etc" / "secret-key"), generate("test-1"))
    run(plan_install(layout, request(tmp_path), host))
    unit = Path(layout.unit_path).read_bytes()
    # Another bucket: the config file changes, the unit does not.
    run(plan_install(layout, request(tmp_path, to="s3://other-cache", force=True), host))
    assert Path(layout.unit_path).read_bytes() == unit
    assert host.log[-1] == "systemctl restart nix-cache-uploader.service"


def test_the_hook_stays_while_a_nix_daemon_may_run_it(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    run(plan_install(layout, request(tmp_path), host))
    host.daemons = [4242]
    lines = run(plan_uninstall(layout, host, purge=False, force=False))
    assert any(line.startswith(f"note: kept {layout.hook_path}: the nix-daemon (pid 4242)")
               for line in lines)  # fmt: skip
    assert Path(layout.hook_path).exists() and Path(layout.wrapper_path).exists()
    assert Path(layout.nix_conf).read_text() == NIX_CONF
    host.daemons = []  # restarted
    assert run(plan_uninstall(layout, host, purge=False, force=False))[:2] == [
        f"remove {layout.wrapper_path}",
        f"remove {layout.hook_path}",
    ]
    assert not Path(layout.hook_path).parent.exists()


def test_a_failed_action_stops_the_rest(tmp_path: Path, layout: Layout) -> None:
    class Refusing(FakeHost):
        def add_user(self, name: str, group: str, home: str) -> None:
            raise InstallError("useradd failed: no space left")

    host = Refusing()
    with pytest.raises(InstallError, match=r"^create user ncu .*: useradd failed.*stopped there"):
        run(plan_install(layout, request(tmp_path), host))
    assert host.log == ["groupadd ncu"]
    assert not (tmp_path / "spool").exists()


def test_the_service_runs_the_command_that_installed_it(tmp_path: Path) -> None:
    assert service_command("/usr/local/bin/nix-cache-uploader", "/py") == (
        "/usr/local/bin/nix-cache-uploader",
    )
    assert service_command("/src/uploader/__main__.py", "/py") == ("/py", "-m", "uploader")
    nix = tmp_path / "nix"
    nix.write_text("#!/bin/sh\n")
    nix.chmod(0o755)
    assert service_path(str(tmp_path)) == (str(tmp_path), "/usr/local/bin", "/usr/bin", "/bin")
    assert service_path(str(tmp_path / "none"))[0] == "/nix/var/nix/profiles/default/bin"


def test_the_package_ships_the_hook() -> None:
    assert packaged_hook() == (REPO / "hook" / "post-build-hook").read_bytes()
    # A symlink, so there is one hook; wheels and sdists get a copy.
    assert os.readlink(REPO / "uploader" / "post-build-hook") == "../hook/post-build-hook"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "post-build-hook" in pyproject["tool"]["setuptools"]["package-data"]["uploader"]


def test_install_command_line_dry_run(tmp_path: Path, layout: Layout) -> None:
    args = [
        "install", "--dry-run", "--to", STORE_URL, "--user", "ncu-no-such-user",
        "--config", layout.config, "--nix-conf", layout.nix_conf, "--unit-dir", layout.unit_dir,
        "--hook-path", layout.hook_path, "--spool", str(tmp_path / "spool"),
        "--state-dir", str(tmp_path / "state"), "--gc-roots-dir", str(tmp_path / "gcroots"),
    ]  # fmt: skip
    before = tree(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "create user ncu-no-such-user" in result.stdout
    assert tree(tmp_path) == before


# -- check-config ------------------------------------------------------------


def check_config(tmp_path: Path, text: str) -> tuple[int, str, str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["check-config", "--config", str(path)])
    return result.exit_code, result.stdout, result.stderr


def test_check_config_accepts_a_good_file_without_its_key(tmp_path: Path) -> None:
    code, out, err = check_config(
        tmp_path, f'to = "{STORE_URL}"\nsecret-key-file = "/run/keys/absent"\njobs = 8\n'
    )
    assert code == 0
    assert out == f"{tmp_path / 'config.toml'}: ok\n"
    assert "warning: secret-key-file /run/keys/absent does not exist (yet)" in err


@pytest.mark.parametrize(
    "text, message",
    [
        ('to = "s3://bucket"\ncompresion = "xz"\n', "'compresion' (did you mean 'compression'?)"),
        ('to = "s3://bucket"\nthreads = 4\n', "setting(s) threads (known: attest-key-file,"),
        ('to = "s3://bucket"\njobs = "8"\n', "setting 'jobs' must be an integer"),
        ('to = "s3://bucket?regoin=x"\n', "unknown parameter 'regoin'"),
        ('to = "http://bucket"\n', "unsupported scheme 'http'"),
        ('to = "s3://bucket"\ncompression = "gzip"\n', "compression 'gzip' is not one of"),
        ('to = "s3://bucket"\ncompression = "xz"\ncompression-level = 12\n', "out of range"),
        ('to = "s3://bucket"\nmetrics = "localhost"\n', "config.toml: metrics address 'localhost'"),
        ('to = "s3://bucket"\nspool = "spool"\n', "spool must be an absolute path"),
        ("to = s3://bucket\n", "config.toml"),
    ],
)
def test_check_config_refuses_a_bad_file(tmp_path: Path, text: str, message: str) -> None:
    code, _, err = check_config(tmp_path, text)
    assert code == 1
    assert message in err
    assert str(tmp_path / "config.toml") in err


def test_check_config_refuses_a_malformed_key(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("not a key")
    key.chmod(0o600)
    code, _, err = check_config(tmp_path, f'to = "s3://bucket"\nsecret-key-file = "{key}"\n')
    assert code == 1
    assert "not in the form <name>:<base64>" in err


def test_check_config_needs_the_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["check-config", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 1
    assert "does not exist" in result.stderr


def test_check_config_refuses_a_builder_that_holds_the_cache_key(tmp_path: Path) -> None:
    """Broken, check-config would pass a fleet builder's config that also
    names the cache's secret key, which a builder must never hold."""
    code, _, err = check_config(
        tmp_path,
        'to = "s3://bucket"\nsecret-key-file = "/run/keys/cache"\n'
        'attest-key-file = "/run/keys/builder"\n',
    )
    assert code == 1
    assert "attest mode holds no cache key" in err


def test_purge_for_another_user_removes_nothing_of_this_installation(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    run(plan_install(layout, request(tmp_path, generate_key="test-1"), host))
    before = tree(tmp_path)
    stranger = dataclasses.replace(layout, user="someone", group="someone")
    plan = plan_uninstall(stranger, host, purge=True, force=False)
    assert [text for text, _ in plan.actions if "spool" in text or "state" in text] == []
    assert f"kept {tmp_path / 'state'} (state): it belongs to ncu:ncu, not to someone" in " ".join(
        plan.notes
    )
    assert "user someone is not installed here: nothing to purge" in plan.notes
    assert not any("config.toml" in text for text, _ in plan.actions)
    assert tree(tmp_path / "state") == {k: v for k, v in before.items() if "/state/" in k}


def test_a_fleet_builder_is_installed_with_its_builder_key_and_no_cache_key(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    builder_key = str(tmp_path / "etc" / "builder-key")
    run(plan_install(layout, request(tmp_path, attest_key_file=builder_key,
                                     generate_key="ci-a-1"), host))  # fmt: skip
    config = tomllib.loads(Path(layout.config).read_text())
    assert config["attest-key-file"] == builder_key and "secret-key-file" not in config
    assert SecretKey.load(builder_key).name == "ci-a-1"
    unit = Path(layout.unit_path).read_text()
    assert f"LoadCredential=attest-key:{builder_key}\n" in unit
    assert "--attest-key-file %d/attest-key" in unit and "secret-key" not in unit
    # A config file that already names the cache key: refused, not merged.
    with pytest.raises(ConfigError, match="holds no cache key"):
        plan_install(layout, request(tmp_path, secret_key_file=builder_key), host)


def test_uninstall_keeps_a_hook_nix_conf_still_names(
    tmp_path: Path, layout: Layout, host: FakeHost
) -> None:
    """Broken, uninstall would delete a hook the admin's own nix.conf line
    still names, and every build would then run a missing hook."""
    run(plan_install(layout, request(tmp_path), host))
    with open(layout.nix_conf, "a") as f:  # a line of the admin's own, not install's
        f.write(f"post-build-hook = {layout.hook_path}\n")
    lines = run(plan_uninstall(layout, host, purge=False, force=False))
    assert Path(layout.hook_path).exists()
    assert any(line.startswith(f"note: kept {layout.hook_path}: ") and "still names it" in line
               for line in lines)  # fmt: skip


@pytest.mark.parametrize("uid", [0, 1000, 1234])
def test_purge_keeps_a_user_that_is_not_a_system_user(
    tmp_path: Path, layout: Layout, host: FakeHost, uid: int
) -> None:
    """Broken, `uninstall --purge` after `--user alice` by mistake would
    delete a person's account (or root)."""
    run(plan_install(layout, request(tmp_path), host))
    host.uids["ncu"] = uid
    lines = run(plan_uninstall(layout, host, purge=True, force=False))
    assert host.account("ncu") is not None
    assert f"note: user ncu (uid {uid}) is not a system user: kept" in lines


def test_purge_keeps_the_nix_socket_group(tmp_path: Path, host: FakeHost, layout: Layout) -> None:
    """Broken, purging an install made with --group nix-users would delete
    the group Debian's nix-daemon socket belongs to, cutting users off Nix."""
    socket_group = dataclasses.replace(layout, group="nix-users")
    run(plan_install(socket_group, request(tmp_path), host))
    run(plan_uninstall(socket_group, host, purge=True, force=False))
    assert host.group_members("nix-users") is not None
    assert "groupdel nix-users" not in host.log
