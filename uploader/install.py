"""`install` and `uninstall` on hosts without the NixOS module.

Each command first makes a :class:`Plan`: the actions that would bring the
host to the wanted state, one line each, and the conflicts that stop it
(a post-build-hook or config file that is not ours).  Running the plan
carries the actions out in order; a dry run only prints them.  An action is
planned only when something differs, so a second install has nothing to do.

What install does to accounts, ownership, systemd and running processes
goes through a ``Host`` (``uploader.host``), so tests can hand in their own;
the files it writes are real files under the paths of the :class:`Layout`.
Their text comes from ``uploader.unit``; ``uploader.nixconf`` edits nix.conf.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import resources

from uploader._exceptions import ConfigError, UploaderError
from uploader.config import DEFAULT_CONFIG, Settings, load_settings
from uploader.host import Host, InstallError
from uploader.nixconf import (
    ForeignHookError,
    add_hook,
    disabled_hooks,
    hook_settings,
    remove_hook,
)
from uploader.progress import plural
from uploader.signing import generate, write_public_key, write_secret_key
from uploader.spool import DEFAULT_SPOOL
from uploader.targets import parse_store_url
from uploader.unit import (
    HEADER,
    UNIT_NAME,
    UnitParams,
    render_config,
    render_unit,
    render_wrapper,
    service_directories,
)

__all__ = [
    "DEFAULT_HOOK_PATH",
    "DEFAULT_NIX_CONF",
    "DEFAULT_UNIT_DIR",
    "DEFAULT_USER",
    "Layout",
    "Plan",
    "Request",
    "execute",
    "packaged_hook",
    "plan_install",
    "plan_uninstall",
    "public_key_path",
    "service_command",
    "service_path",
]

DEFAULT_USER = "nix-cache-uploader"
DEFAULT_NIX_CONF = "/etc/nix/nix.conf"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_HOOK_PATH = "/usr/local/libexec/nix-cache-uploader/post-build-hook"
# Owns the nix-daemon socket's directory with Debian's and Ubuntu's nix-bin.
NIX_SOCKET_GROUP = "nix-users"
DEFAULT_UPSTREAM_KEYS = ["cache.nixos.org-1"]  # as the NixOS module


@dataclass(frozen=True)
class Layout:
    """Where install puts things (tests point every path into a temp dir)."""

    user: str = DEFAULT_USER
    group: str = DEFAULT_USER
    config: str = DEFAULT_CONFIG
    nix_conf: str = DEFAULT_NIX_CONF
    unit_dir: str = DEFAULT_UNIT_DIR
    hook_path: str = DEFAULT_HOOK_PATH

    @property
    def unit_path(self) -> str:
        return os.path.join(self.unit_dir, UNIT_NAME)

    @property
    def wrapper_path(self) -> str:
        return self.hook_path + "-wrapper"

    @property
    def environment_file(self) -> str:
        return os.path.join(os.path.dirname(self.config), "environment")

    @property
    def default_key(self) -> str:
        return os.path.join(os.path.dirname(self.config), "secret-key")

    def check(self) -> None:
        for name in ("config", "nix_conf", "unit_dir", "hook_path"):
            if not os.path.isabs(getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} must be an absolute path")


@dataclass(frozen=True)
class Request:
    """What install was asked for; None: keep what the config file says."""

    command: tuple[str, ...]  # the service's nix-cache-uploader
    path: tuple[str, ...]  # the service's PATH
    to: str | None = None
    secret_key_file: str | None = None
    attest_key_file: str | None = None  # a fleet's builder (docs/fleet.md)
    spool: str | None = None
    state_dir: str | None = None
    gc_roots_dir: str | None = None
    upstream_keys: tuple[str, ...] | None = None
    generate_key: str | None = None
    force: bool = False


@dataclass
class Plan:
    """Actions in order, plus what the user must read or do."""

    # Each action's description and what carries it out (which may return a
    # line to print, such as a new public key).
    actions: list[tuple[str, Callable[[], str | None]]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    diffs: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)

    def add(self, text: str, run: Callable[[], str | None]) -> None:
        self.actions.append((text, run))


# -- files -------------------------------------------------------------------


def packaged_hook() -> bytes:
    """hook/post-build-hook, shipped inside the package (uploader/post-build-hook
    is a symlink to it in the checkout, and a copy in wheels and sdists)."""
    return resources.files("uploader").joinpath("post-build-hook").read_bytes()


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically (through a symlink, e.g. nix.conf on some hosts)."""
    path = os.path.realpath(path)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.nix-cache-uploader-tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _mode(path: str) -> int:
    return os.stat(path).st_mode & 0o7777


def _written_by_us(path: str) -> bool:
    head = (_read(path) or b"")[:300]
    return HEADER.encode() in head or b"# nix-cache-uploader post-build hook" in head


def _diff(path: str, old: str, new: str) -> str:
    lines = difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), path, f"{path} (new)"
    )
    return "".join(lines).rstrip("\n")


def _plan_file(plan: Plan, path: str, data: bytes, mode: int, what: str, *, ours: bool) -> bool:
    """Plan writing ``data``; a different file that is not install's own is a
    conflict unless ``ours`` (--force).  True when it will be written."""
    current = _read(path)
    if current == data and _mode(path) == mode:
        return False
    if current is None:
        plan.add(f"write {path} ({what})", lambda: _write(path, data, mode))
        return True
    if current != data and not (ours or _written_by_us(path)):
        plan.conflicts.append(f"{path} exists and was not written by install; --force replaces it")
        plan.diffs.append(_diff(path, current.decode(errors="replace"), data.decode()))
        return False
    plan.add(f"update {path} ({what})", lambda: _write(path, data, mode))
    return True


def _plan_dir(plan: Plan, host: Host, path: str, owner: str, group: str, mode: int) -> None:
    def make() -> None:
        os.makedirs(path, mode=0o755, exist_ok=True)
        host.chown(path, owner, group)
        os.chmod(path, mode)

    want = f"{owner}:{group}, mode {mode:04o}"
    if not os.path.exists(path):
        plan.add(f"create directory {path} ({want})", make)
    elif not os.path.isdir(path):
        plan.conflicts.append(f"{path} exists and is not a directory")
    elif host.owner(path) != (owner, group) or _mode(path) != mode:
        plan.add(f"set {path} to {want}", make)


def public_key_path(secret: str) -> str:
    directory, name = os.path.split(secret)
    if name == "secret-key":
        return os.path.join(directory, "public-key")
    return secret + ".pub"


# -- install -----------------------------------------------------------------


def _config_values(layout: Layout, req: Request) -> tuple[dict[str, object], bytes | None]:
    """The settings the config file should hold, and its current bytes."""
    asked: dict[str, object | None] = {
        "to": req.to,
        "secret-key-file": req.secret_key_file,
        "attest-key-file": req.attest_key_file,
        "spool": req.spool,
        "state-dir": req.state_dir,
        "gc-roots-dir": req.gc_roots_dir,
        "upstream-keys": None if req.upstream_keys is None else list(req.upstream_keys),
    }
    given = {k: v for k, v in asked.items() if v is not None}
    current = _read(layout.config)
    if current is None:
        if req.to is None:
            raise ConfigError(f"--to is required: there is no config file {layout.config} yet")
        defaults = {
            # A builder's key is only ever given: it holds no cache key.
            **({} if req.attest_key_file else {"secret-key-file": layout.default_key}),
            "spool": DEFAULT_SPOOL,
            "upstream-keys": DEFAULT_UPSTREAM_KEYS,
        }
        # In the order of `asked`: the file reads best with `to` first.
        return {
            k: given.get(k, defaults.get(k)) for k in asked if k in given or k in defaults
        }, None
    try:
        existing = tomllib.loads(current.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(
            f"config file {layout.config}: {e}; fix it (see `nix-cache-uploader check-config`)"
        ) from None
    return {**existing, **given}, current


def _plan_accounts(plan: Plan, host: Host, layout: Layout, home: str) -> None:
    user, group = layout.user, layout.group
    if host.group_members(group) is None:
        plan.add(f"create group {group}", lambda: host.add_group(group))
    account = host.account(user)
    if account is None:
        plan.add(f"create user {user} (system user in group {group}, no login shell)",
                 lambda: host.add_user(user, group, home))  # fmt: skip
    elif account.uid == 0:
        plan.conflicts.append(f"--user {user} is root: the uploader needs a user of its own")
    elif group not in account.groups:
        plan.add(f"add user {user} to group {group}", lambda: host.add_to_group(user, group))
    if host.group_members(NIX_SOCKET_GROUP) is not None and (
        account is None or NIX_SOCKET_GROUP not in account.groups
    ):
        plan.add(
            f"add user {user} to group {NIX_SOCKET_GROUP} (to reach the nix-daemon's socket)",
            lambda: host.add_to_group(user, NIX_SOCKET_GROUP),
        )


def _plan_key(plan: Plan, host: Host, layout: Layout, req: Request, key: str) -> bool:
    """Plan the signing key; True when the service will find one."""
    public = public_key_path(key)
    if os.path.exists(key):
        if req.generate_key:
            plan.notes.append(f"{key} exists: not generating a key (install never replaces one)")
        if _mode(key) & 0o077:
            plan.notes.append(f"{key} is readable by others: run chmod 600 {key}")
        return True
    if not req.generate_key:
        plan.next_steps.append(
            f"create the signing key: nix-cache-uploader keygen NAME {key} {public}"
            " (NAME: e.g. cache.example.org-1); the service starts once it exists"
        )
        return False
    if os.path.exists(public):
        plan.conflicts.append(f"{public} exists without its secret key {key}; move it away")
        return False
    name = req.generate_key

    def make() -> str:
        os.makedirs(os.path.dirname(key), mode=0o755, exist_ok=True)
        secret = generate(name)
        # Root's: systemd hands the service a copy (LoadCredential=), so
        # the uploader's user never needs to read the original.
        write_secret_key(key, secret)
        write_public_key(public, secret.public_key())
        return f"public key (for trusted-public-keys): {secret.public_key().to_text()}"

    plan.add(f"create signing key {name} in {key} (root's, mode 0600) and {public}", make)
    return True


def _plan_nix_conf(plan: Plan, layout: Layout, hook: str, force: bool) -> None:
    current = _read(layout.nix_conf)
    text = (current or b"").decode()
    try:
        new = add_hook(text, hook, force=force)
    except ForeignHookError as e:
        plan.conflicts.append(f"{layout.nix_conf}: {e}")
        return
    if new == text:
        return
    mode = _mode(layout.nix_conf) if current is not None else 0o644
    disabled = disabled_hooks(new)
    what = f"add post-build-hook = {hook} to {layout.nix_conf}"
    if disabled:
        what += f", commenting out post-build-hook = {', '.join(disabled)}"
    plan.add(what, lambda: _write(layout.nix_conf, new.encode(), mode))
    plan.next_steps.append(
        "restart the nix-daemon so that it reads nix.conf: systemctl restart nix-daemon"
    )


def _plan_service(plan: Plan, host: Host, *, reload: bool, restart: bool, key: bool) -> None:
    if not host.systemd():
        plan.notes.append(
            f"systemd is not running here (it is not PID 1): {UNIT_NAME} is not enabled or "
            "started; on a machine booted with systemd, install does that"
        )
        return
    enabled, active = host.unit_state(UNIT_NAME)
    if reload:
        plan.add("systemctl daemon-reload", lambda: host.systemctl("daemon-reload"))
    if not key:
        if not enabled:
            plan.add(f"systemctl enable {UNIT_NAME}", lambda: host.systemctl("enable", UNIT_NAME))
        plan.next_steps.append(f"then start the service: systemctl start {UNIT_NAME}")
    elif not (enabled and active):
        plan.add(f"systemctl enable --now {UNIT_NAME}",
                 lambda: host.systemctl("enable", "--now", UNIT_NAME))  # fmt: skip
    elif restart:
        plan.add(f"systemctl restart {UNIT_NAME}", lambda: host.systemctl("restart", UNIT_NAME))


def plan_install(layout: Layout, req: Request, host: Host) -> Plan:
    """What install would do to this host; ConfigError for unusable input."""
    layout.check()
    plan = Plan()
    values, current = _config_values(layout, req)
    # The values as if given as flags, over an empty file: the same checks as `run`.
    settings = load_settings(os.devnull, values)
    settings.require("to")
    assert settings.to is not None
    parse_store_url(settings.to)
    if settings.attest_key_file and settings.secret_key_file:
        raise ConfigError(
            f"{layout.config} would name both secret-key-file and attest-key-file: a builder "
            "of a fleet holds no cache key; remove secret-key-file from it"
        )
    key = settings.attest_key_file or settings.secret_key_file or layout.default_key
    if not os.path.isabs(key):
        raise ConfigError(f"the key file {key} must be an absolute path: systemd loads it")
    user, group = layout.user, layout.group

    _plan_accounts(plan, host, layout, settings.state_dir)
    _plan_dir(plan, host, settings.spool, "root", group, 0o2770)
    _plan_dir(plan, host, settings.state_dir, user, group, 0o755)
    _plan_dir(plan, host, settings.gc_roots_dir, user, group, 0o755)
    # A file:// cache and tmp-dir may be shared: made when missing, else left alone.
    for directory in service_directories(settings)[1]:
        if not os.path.lexists(directory):
            _plan_dir(plan, host, directory, user, group, 0o755)
    has_key = _plan_key(plan, host, layout, req, key)

    hook = layout.hook_path
    _plan_file(plan, hook, packaged_hook(), 0o755, "post-build hook", ours=req.force)
    if settings.spool != DEFAULT_SPOOL:
        hook = layout.wrapper_path
        wrapper = render_wrapper(layout.hook_path, settings.spool).encode()
        _plan_file(plan, hook, wrapper, 0o755, f"hook wrapper for spool {settings.spool}",
                   ours=req.force)  # fmt: skip

    config = render_config(values).encode()
    config_changed = current is None
    if current is None:
        plan.add(f"write {layout.config} ({', '.join(values)})",
                 lambda: _write(layout.config, config, 0o644))  # fmt: skip
    elif tomllib.loads(current.decode()) != values:
        plan.diffs.append(_diff(layout.config, current.decode(), config.decode()))
        if req.force:
            plan.add(f"rewrite {layout.config} with the settings given",
                     lambda: _write(layout.config, config, 0o644))  # fmt: skip
            config_changed = True
        else:
            plan.conflicts.append(
                f"{layout.config} exists and differs from the settings given (diff above); "
                "edit it, or add --force to rewrite it with them"
            )

    params = UnitParams(req.command, layout.config, key, layout.environment_file, user, group,
                        req.path)  # fmt: skip
    unit = render_unit(params, settings).encode()
    unit_changed = _plan_file(plan, layout.unit_path, unit, 0o644, "systemd unit", ours=req.force)
    _plan_nix_conf(plan, layout, hook, req.force)
    _plan_service(plan, host, reload=unit_changed, restart=unit_changed or config_changed,
                  key=has_key)  # fmt: skip

    if req.command[0].startswith(("/root/", "/home/")):
        plan.notes.append(
            f"the service would run {req.command[0]}, but it runs with ProtectHome=yes as "
            f"{user} and cannot reach it: install nix-cache-uploader outside /root and /home "
            "(e.g. a virtualenv in /opt) and run its install"
        )
    if settings.to.startswith("s3://") and not os.path.exists(layout.environment_file):
        plan.next_steps.append(
            f"unless the machine has an instance role, put the S3 credentials into "
            f"{layout.environment_file} (mode 0600): AWS_ACCESS_KEY_ID=... and "
            "AWS_SECRET_ACCESS_KEY=..., then restart the service"
        )
    status = "" if layout.config == DEFAULT_CONFIG else f" --config {layout.config}"
    plan.next_steps.append(f"check the uploader: nix-cache-uploader status{status}")
    return plan


# -- uninstall ---------------------------------------------------------------


def _installed_settings(layout: Layout, plan: Plan) -> Settings:
    if not os.path.exists(layout.config):
        return Settings()
    try:
        return load_settings(layout.config, {})
    except ConfigError as e:
        plan.notes.append(f"{e}; assuming the default paths")
        return Settings()


def _remove(path: str) -> None:
    """Remove a file or a tree, and its directory if that is left empty."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


def _plan_hook_removal(plan: Plan, host: Host, layout: Layout, named: list[str],
                       nix_conf: str, force: bool) -> None:  # fmt: skip
    """Remove the installed hook unless something may still run it: a
    nix-daemon that has not reread nix.conf would fail every build."""
    still_named = set(hook_settings(nix_conf))
    edited = bool(named)
    since = (
        None if edited or not os.path.exists(layout.nix_conf) else os.stat(layout.nix_conf).st_mtime
    )
    daemons = [] if force else host.nix_daemons(layout.nix_conf, since)
    for path in dict.fromkeys([layout.wrapper_path, *named, layout.hook_path]):
        if not os.path.isfile(path) or not _written_by_us(path):
            continue
        if path in still_named:
            plan.notes.append(f"kept {path}: {layout.nix_conf} still names it (a line install "
                              "did not add); remove that line first")  # fmt: skip
        elif daemons:
            pids = ", ".join(map(str, daemons))
            plan.notes.append(
                f"kept {path}: the nix-daemon (pid {pids}) read {layout.nix_conf} before this "
                "change and may still run it; restart the nix-daemon, then run "
                "`nix-cache-uploader uninstall` again to remove it"
            )
        else:
            plan.add(f"remove {path}", partial(_remove, path))


def _plan_purge(plan: Plan, host: Host, layout: Layout, settings: Settings) -> None:
    """Remove what this installation (its --user) created, and nothing else."""
    account = host.account(layout.user)
    ours = []
    for directory, what in ((settings.spool, "spool"), (settings.state_dir, "state"),
                            (settings.gc_roots_dir, "GC roots")):  # fmt: skip
        if not os.path.lexists(directory):
            continue
        user, group = host.owner(directory)
        if layout.user not in (user, group) and layout.group not in (user, group):
            # Another installation's (another --user), or not an uploader's at all.
            plan.notes.append(
                f"kept {directory} ({what}): it belongs to {user}:{group}, "
                f"not to {layout.user} of this installation"
            )
        else:
            ours.append((directory, what))
    if account is None and not ours:
        plan.notes.append(f"user {layout.user} is not installed here: nothing to purge")
        return
    for directory, what in ours:
        if what == "spool":
            queued = [n for n in os.listdir(directory) if n.endswith(".entry")]
            if queued:
                plan.notes.append(
                    f"{plural(len(queued), 'build')} queued in {directory} not uploaded"
                )
        plan.add(f"remove {directory} ({what})", partial(_remove, directory))
    if os.path.exists(layout.config):
        plan.add(f"remove {layout.config}", lambda: _remove(layout.config))
    key = settings.attest_key_file or settings.secret_key_file or layout.default_key
    kept = [p for p in (key, public_key_path(key), layout.environment_file) if os.path.exists(p)]
    if kept:
        plan.notes.append(f"kept {', '.join(kept)}: delete the key and credentials yourself")
    if account is not None:
        if account.uid == 0 or account.uid >= 1000:
            plan.notes.append(f"user {layout.user} (uid {account.uid}) is not a system user: kept")
        else:
            plan.add(f"remove user {layout.user}", lambda: host.remove_user(layout.user))
    members = host.group_members(layout.group)
    if members is not None:
        others = [m for m in members if m != layout.user]
        if others or layout.group == NIX_SOCKET_GROUP:
            plan.notes.append(f"group {layout.group} has other members ({', '.join(others)}): kept")
        else:
            plan.add(f"remove group {layout.group}", lambda: host.remove_group(layout.group))


def plan_uninstall(layout: Layout, host: Host, *, purge: bool, force: bool) -> Plan:
    """What uninstall would undo; with ``purge`` also the data, config and user."""
    layout.check()
    plan = Plan()
    settings = _installed_settings(layout, plan)
    systemd = host.systemd()
    unit = layout.unit_path
    ours = os.path.exists(unit) and (force or _written_by_us(unit))
    if os.path.exists(unit) and not ours:
        plan.notes.append(f"{unit} was not written by install: kept (--force removes it)")
    if ours and systemd and any(host.unit_state(UNIT_NAME)):
        plan.add(f"systemctl disable --now {UNIT_NAME}",
                 lambda: host.systemctl("disable", "--now", UNIT_NAME))  # fmt: skip

    current = _read(layout.nix_conf)
    text = (current or b"").decode()
    new, named = remove_hook(text)
    if new != text:
        mode = _mode(layout.nix_conf)
        restored = disabled_hooks(text)
        what = f"remove post-build-hook = {', '.join(named)} from {layout.nix_conf}"
        if restored:
            what += f", restoring post-build-hook = {', '.join(restored)}"
        plan.add(what, lambda: _write(layout.nix_conf, new.encode(), mode))
        plan.next_steps.append(
            "restart the nix-daemon so that it stops running the hook: systemctl restart nix-daemon"
        )
    if ours:
        plan.add(f"remove {unit}", lambda: os.unlink(unit))
        if systemd:
            plan.add("systemctl daemon-reload", lambda: host.systemctl("daemon-reload"))
    _plan_hook_removal(plan, host, layout, named, new, force)
    if purge:
        _plan_purge(plan, host, layout, settings)
    return plan


# -- carrying a plan out -----------------------------------------------------


def execute(plan: Plan, *, dry_run: bool, echo: Callable[[str], None], nothing: str) -> None:
    """Print a dry run's actions, or carry them out and print each when done.

    Conflicts stop everything before the first change (ConfigError); a failed
    action stops the rest (InstallError): running the command again carries
    on, since what is done is not planned again.
    """
    if dry_run:
        for text, _ in plan.actions:
            echo(text)
    for diff in plan.diffs:
        echo(diff)
    if plan.conflicts:
        for note in plan.notes:
            echo(f"note: {note}")
        raise ConfigError("; ".join(plan.conflicts) + ("" if dry_run else "; nothing was changed"))
    if not plan.actions:
        echo(nothing)
    elif dry_run:
        echo(f"dry run: {len(plan.actions)} actions, nothing changed")
    else:
        for text, run in plan.actions:
            try:
                output = run()
            except OSError as e:
                where = f"{e.filename}: " if e.filename else ""
                raise InstallError(f"{text}: {where}{e.strerror}; stopped there") from None
            except UploaderError as e:
                raise InstallError(f"{text}: {e}; stopped there") from None
            echo(text)
            if output:
                echo(f"  {output}")
    for note in plan.notes:
        echo(f"note: {note}")
    if plan.next_steps:
        echo("next:" if not dry_run else "then:")
        for step in plan.next_steps:
            echo(f"  - {step}")


def service_command(argv0: str, executable: str) -> tuple[str, ...]:
    """How the service starts this very nix-cache-uploader: the command it was
    run as, else ``python -m uploader`` with this Python."""
    if os.path.basename(argv0) == "nix-cache-uploader":
        path = argv0 if os.sep in argv0 else shutil.which(argv0)
        if path:
            return (os.path.abspath(path),)
    return (executable, "-m", "uploader")


def service_path(search: str | None) -> tuple[str, ...]:
    """PATH for the service: where `nix` is now, then the usual directories."""
    nix = shutil.which("nix", path=search)
    first = [os.path.dirname(nix)] if nix else ["/nix/var/nix/profiles/default/bin"]
    return tuple(dict.fromkeys([*first, "/usr/local/bin", "/usr/bin", "/bin"]))
