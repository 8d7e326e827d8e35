"""The files `nix-cache-uploader install` writes: the systemd unit, the config
file and the hook wrapper.

Pure functions of their parameters, with no I/O: install writes their output,
and docs/quickstart.md shows the unit rendered for the default paths (a test
compares the two).  The unit mirrors the service of nixos-module/module.nix,
directive for directive; tests/integration/test_nixos_module.py compares
them.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from uploader.config import DEFAULT_STATE_DIR, Settings
from uploader.targets.url import parse_store_url

__all__ = [
    "HEADER",
    "UNIT_NAME",
    "UnitParams",
    "render_config",
    "render_unit",
    "render_wrapper",
    "service_directories",
]

UNIT_NAME = "nix-cache-uploader.service"
# The first line of every file install writes: install rewrites (and
# uninstall removes) only files that start with it, unless --force.
HEADER = "# Written by `nix-cache-uploader install`"
# The NixOS module's StateDirectory=: systemd creates /var/lib/<this>.
_STATE_DIRECTORY = "nix-cache-uploader"


@dataclass(frozen=True)
class UnitParams:
    """What the unit depends on besides the settings."""

    command: Sequence[str]  # how to start nix-cache-uploader: an absolute path, or python -m
    config: str
    secret_key_file: str  # the key the service signs with (a builder key in attest mode)
    environment_file: str
    user: str
    group: str
    path: Sequence[str]  # PATH of the service: must hold `nix` and `nix-store`


def _word(word: str, *, command: bool = False) -> str:
    """One word in systemd's syntax: specifiers are expanded everywhere (so
    % is doubled), variables in command lines (so $ is doubled there)."""
    word = word.replace("%", "%%")
    if command:
        word = word.replace("$", "$$")
    if re.fullmatch(r"[^\s\"'\\;]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def service_directories(settings: Settings) -> tuple[list[str], list[str]]:
    """The directories the service writes besides StateDirectory=: those
    install makes, and those it makes only when missing (the file:// cache
    and tmp-dir, which may be shared with others).  The unit names the
    second kind with '-', so that one that is gone does not stop systemd from
    starting the program, which then says what is missing."""
    made = [settings.spool, settings.gc_roots_dir]
    if settings.state_dir != DEFAULT_STATE_DIR:  # StateDirectory= covers the default
        made.append(settings.state_dir)
    if_missing = []
    if settings.to is not None and settings.to.startswith("file:"):
        if_missing.append(parse_store_url(settings.to).path)
    # /tmp and /var/tmp are private and writable already (PrivateTmp=).
    if settings.tmp_dir and settings.tmp_dir not in ("/tmp", "/var/tmp"):
        if_missing.append(settings.tmp_dir)
    return made, if_missing


def render_unit(p: UnitParams, settings: Settings) -> str:
    """The hardened nix-cache-uploader.service, as the NixOS module runs it."""
    # %d: the credentials directory, where systemd puts the service's private
    # copy of the key (the original may stay root's own).  A fleet's builder
    # holds a builder key instead, under the NixOS module's name for it.
    credential = "attest-key" if settings.attest_key_file else "secret-key"
    exec_start = " ".join(
        [
            *(_word(w, command=True) for w in p.command),
            "run",
            "--config",
            _word(p.config, command=True),
            f"--{credential}-file",
            f"%d/{credential}",
        ]
    )
    made, if_missing = service_directories(settings)
    writable = [*made, *("-" + d for d in if_missing)]
    # Background work: builds and interactive users come first.
    priority = "Nice=19\nCPUWeight=20\nIOSchedulingClass=idle\n" if settings.low_priority else ""
    stop_timeout = math.ceil(settings.drain_timeout) + 30
    # systemd makes the default state directory; install makes another one.
    state = (
        f"StateDirectory={_STATE_DIRECTORY}\n" if settings.state_dir == DEFAULT_STATE_DIR else ""
    )
    return f"""\
{HEADER}; the next install overwrites it.
# Local changes belong in a drop-in: systemctl edit nix-cache-uploader
[Unit]
Description=Upload Nix builds to a signed binary cache
Wants=network-online.target
After=network-online.target nix-daemon.socket

[Service]
ExecStart={exec_start}
LoadCredential={credential}:{p.secret_key_file.replace("%", "%%")}
# S3 credentials (AWS_ACCESS_KEY_ID=..., AWS_SECRET_ACCESS_KEY=...); optional.
EnvironmentFile=-{p.environment_file.replace("%", "%%")}
# `nix` and `nix-store`; HOME for the Nix client's cache directory.
Environment={_word("PATH=" + ":".join(p.path))}
Environment={_word("HOME=" + settings.state_dir)}
User={p.user}
Group={p.group}
{state}Restart=on-failure
RestartSec=10
# SIGTERM to the daemon only: it finishes in-flight uploads (drain-timeout) first.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={stop_timeout}
{priority}NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ReadWritePaths={" ".join(_word(w) for w in writable)}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
# AF_UNIX for the nix-daemon's socket; AF_INET/AF_INET6 for S3.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6

[Install]
WantedBy=multi-user.target
"""


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string (same escapes).
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as a TOML setting")


def render_config(values: Mapping[str, object]) -> str:
    """The config file for settings ``values`` (TOML keys, in order)."""
    lines = [f"{HEADER}; every setting is in docs/configuration.md."]
    if "upstream-keys" in values:
        lines.append("# upstream-keys: paths signed by these keys are not uploaded again.")
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def render_wrapper(hook: str, spool: str) -> str:
    """The post-build-hook nix.conf names when the spool is not the default:
    it tells the hook where the spool is, as the NixOS module's wrapper does.
    Like the hook, it never fails a build, even when the hook is missing or
    cannot run: it runs the hook rather than exec it, since a shell whose
    exec fails exits 126 or 127."""
    return f"""\
#!/bin/sh
{HEADER}: the nix-daemon's post-build-hook.
export NIX_CACHE_UPLOADER_SPOOL={shlex.quote(spool)}
{shlex.quote(hook)} && exit 0
echo "nix-cache-uploader: hook "{shlex.quote(hook)}" is missing or failed; build not queued" >&2
exit 0
"""
