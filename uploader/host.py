"""What install changes outside its files: accounts, ownership, systemd, and
the running nix-daemons it must not break.

:class:`Host` is what install needs; :class:`LocalHost` does it on this
machine, and tests hand in their own.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from typing import Protocol

from uploader._exceptions import InstallError

__all__ = ["Account", "Host", "InstallError", "LocalHost"]


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    groups: frozenset[str]  # primary and supplementary


class Host(Protocol):
    """Accounts, ownership, systemd and the nix-daemons of a machine."""

    def account(self, name: str) -> Account | None: ...
    def group_members(self, name: str) -> list[str] | None: ...
    def add_group(self, name: str) -> None: ...
    def add_user(self, name: str, group: str, home: str) -> None: ...
    def add_to_group(self, user: str, group: str) -> None: ...
    def remove_user(self, name: str) -> None: ...
    def remove_group(self, name: str) -> None: ...
    def chown(self, path: str, user: str, group: str) -> None: ...
    def owner(self, path: str) -> tuple[str, str]: ...
    def systemd(self) -> bool: ...
    def systemctl(self, *args: str) -> None: ...
    def unit_state(self, unit: str) -> tuple[bool, bool]: ...
    def nix_daemons(self, nix_conf: str, since: float | None) -> list[int]: ...


class LocalHost:
    """This machine: useradd and friends, os.chown, systemctl, /proc."""

    def account(self, name: str) -> Account | None:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        groups = {g.gr_name for g in grp.getgrall() if name in g.gr_mem}
        with contextlib.suppress(KeyError):
            groups.add(grp.getgrgid(entry.pw_gid).gr_name)
        return Account(name, entry.pw_uid, frozenset(groups))

    def group_members(self, name: str) -> list[str] | None:
        """Users in group ``name`` (primary or not); None: no such group."""
        try:
            group = grp.getgrnam(name)
        except KeyError:
            return None
        primary = [p.pw_name for p in pwd.getpwall() if p.pw_gid == group.gr_gid]
        return sorted({*group.gr_mem, *primary})

    def _run(self, *argv: str) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise InstallError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")

    def add_group(self, name: str) -> None:
        self._run("groupadd", "--system", name)

    def add_user(self, name: str, group: str, home: str) -> None:
        shells = ("/usr/sbin/nologin", "/sbin/nologin")
        shell = next((s for s in shells if os.path.exists(s)), "/bin/false")
        self._run(
            "useradd", "--system", "--gid", group, "--home-dir", home, "--no-create-home",
            "--shell", shell, "--comment", "nix-cache-uploader daemon", name,
        )  # fmt: skip

    def add_to_group(self, user: str, group: str) -> None:
        self._run("usermod", "--append", "--groups", group, user)

    def remove_user(self, name: str) -> None:
        self._run("userdel", name)

    def remove_group(self, name: str) -> None:
        if self.group_members(name) is not None:  # userdel may have removed it
            self._run("groupdel", name)

    def chown(self, path: str, user: str, group: str) -> None:
        shutil.chown(path, user, group)

    def owner(self, path: str) -> tuple[str, str]:
        st = os.stat(path)
        try:
            user = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            user = str(st.st_uid)
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        return user, group

    def systemd(self) -> bool:
        """Whether systemd is PID 1 (sd_booted(3))."""
        return os.path.isdir("/run/systemd/system")

    def systemctl(self, *args: str) -> None:
        self._run("systemctl", *args)

    def unit_state(self, unit: str) -> tuple[bool, bool]:
        """(enabled, active)."""

        def ok(verb: str) -> bool:
            argv = ["systemctl", "--quiet", verb, unit]
            return subprocess.run(argv, capture_output=True).returncode == 0

        return ok("is-enabled"), ok("is-active")

    def nix_daemons(self, nix_conf: str, since: float | None) -> list[int]:
        """The nix-daemons that read ``nix_conf`` before ``since`` (None: now)
        and so may still hold its older contents.

        The daemon reads nix.conf when it starts; the process it forks for
        each client keeps the parent's settings, so a daemon's age is the age
        of its topmost nix-daemon ancestor."""
        daemons = _nix_daemon_processes()
        found = set()
        for pid in daemons:
            top = pid
            while daemons[top][0] in daemons:
                top = daemons[top][0]
            _, started, conf_dir = daemons[top]
            with contextlib.suppress(OSError):
                # btime has a resolution of one second.
                reads = os.path.samefile(conf_dir, os.path.dirname(nix_conf))
                if reads and (since is None or started < since + 1):
                    found.add(top)
        return sorted(found)


def _nix_daemon_processes() -> dict[int, tuple[int, float, str]]:
    """pid: (parent pid, start time, NIX_CONF_DIR) of each nix-daemon process."""
    try:
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration):
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "nix-daemon":
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.partition(b"=")[::2] for v in f.read().split(b"\0") if v)
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone, or not ours to read
        conf_dir = env.get(b"NIX_CONF_DIR", b"/etc/nix").decode(errors="replace")
        found[int(pid)] = (int(fields[1]), boot + int(fields[19]) / ticks, conf_dir)
    return found
