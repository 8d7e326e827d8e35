"""`install` and `uninstall`: set the uploader up on a systemd host that is not NixOS."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from uploader._exceptions import UploaderError
from uploader.cli._common import EXIT_USAGE, fail, main
from uploader.config import DEFAULT_CONFIG, DEFAULT_STATE_DIR
from uploader.host import LocalHost
from uploader.install import (
    DEFAULT_HOOK_PATH,
    DEFAULT_NIX_CONF,
    DEFAULT_UNIT_DIR,
    DEFAULT_USER,
    Layout,
    Plan,
    Request,
    execute,
    plan_install,
    plan_uninstall,
    service_command,
    service_path,
)
from uploader.spool import DEFAULT_SPOOL

F = TypeVar("F", bound=Callable[..., Any])


def layout_options(fn: F) -> F:
    """Where install puts things (uninstall takes the same, to find them)."""
    options = [
        click.option(
            "--hook-path",
            metavar="FILE",
            default=DEFAULT_HOOK_PATH,
            show_default=True,
            help="Where the post-build hook is installed.",
        ),
        click.option(
            "--unit-dir",
            metavar="DIR",
            default=DEFAULT_UNIT_DIR,
            show_default=True,
            help="Directory of the systemd unit.",
        ),
        click.option(
            "--nix-conf",
            metavar="FILE",
            default=DEFAULT_NIX_CONF,
            show_default=True,
            help="The nix.conf that names the post-build-hook.",
        ),
        click.option(
            "--config",
            "config_file",
            metavar="FILE",
            default=DEFAULT_CONFIG,
            show_default=True,
            help="Config file (the key and credentials default to its directory).",
        ),
        click.option(
            "--group",
            default=None,
            metavar="NAME",
            help="Group owning the spool [default: --user].",
        ),
        click.option(
            "--user",
            metavar="NAME",
            default=DEFAULT_USER,
            show_default=True,
            help="User the uploader runs as (a system user of its own).",
        ),
    ]
    for option in options:
        fn = option(fn)
    return fn


def _layout(
    user: str, group: str | None, config_file: str, nix_conf: str, unit_dir: str, hook_path: str
) -> Layout:
    return Layout(
        user=user,
        group=group or user,
        config=config_file,
        nix_conf=nix_conf,
        unit_dir=unit_dir,
        hook_path=hook_path,
    )


def _needs_root(dry_run: bool) -> None:
    if not dry_run and os.geteuid() != 0:
        fail("this creates a user and writes to /etc: run it as root (or try --dry-run)")


@main.command()
@click.option(
    "--to",
    "store_url",
    metavar="STORE_URL",
    help="Binary cache URL (as for push) [default: the config file's].",
)
@click.option(
    "--secret-key-file",
    metavar="FILE",
    default=None,
    help="Where the signing key is [default: secret-key beside --config].",
)
@click.option(
    "--attest-key-file",
    metavar="FILE",
    default=None,
    help="A fleet's builder: attest with this builder key instead of signing with the "
    "cache key (docs/fleet.md); the config file gets attest-key-file, no secret-key-file.",
)
@click.option(
    "--generate-key",
    metavar="NAME",
    help="Create the signing key NAME there (root's, 0600: systemd hands the service a "
    "copy) if it is missing.",
)
@click.option(
    "--spool", default=None, metavar="DIR", help=f"Spool directory [default: {DEFAULT_SPOOL}]."
)
@click.option(
    "--state-dir",
    default=None,
    metavar="DIR",
    help=f"State directory [default: {DEFAULT_STATE_DIR}].",
)
@click.option(
    "--gc-roots-dir", default=None, metavar="DIR", help="Where queued outputs are rooted."
)
@click.option(
    "--upstream-key",
    "upstream_keys",
    multiple=True,
    metavar="NAME",
    help="Paths signed by this key are not uploaded (repeatable) [cache.nixos.org-1].",
)
@layout_options
@click.option(
    "--force",
    is_flag=True,
    help="Replace a post-build-hook (commented out), config file or unit not install's.",
)
@click.option("-n", "--dry-run", is_flag=True, help="Print each action; change nothing.")
def install(
    user: str,
    group: str | None,
    config_file: str,
    nix_conf: str,
    unit_dir: str,
    hook_path: str,
    store_url: str | None,
    secret_key_file: str | None,
    attest_key_file: str | None,
    generate_key: str | None,
    spool: str | None,
    state_dir: str | None,
    gc_roots_dir: str | None,
    upstream_keys: tuple[str, ...],
    force: bool,
    dry_run: bool,
) -> None:
    """Set up the uploader on a systemd host with multi-user Nix (not NixOS).

    Creates the user and group (added to nix-users where that group exists),
    the spool, state and GC-root directories, installs the post-build hook,
    writes the config file (unless there is one) and a hardened systemd unit
    running this nix-cache-uploader, adds `post-build-hook` to nix.conf and
    enables the service.  Only what differs is done: a second run does
    nothing.  The S3 credentials go into the file `environment` beside the
    config file.  `uninstall` undoes it.
    """
    if secret_key_file and attest_key_file:
        fail("--secret-key-file and --attest-key-file: a builder holds no cache key", EXIT_USAGE)
    _needs_root(dry_run)
    layout = _layout(user, group, config_file, nix_conf, unit_dir, hook_path)
    request = Request(
        command=service_command(sys.argv[0], sys.executable),
        path=service_path(os.environ.get("PATH")),
        to=store_url,
        secret_key_file=secret_key_file,
        attest_key_file=attest_key_file,
        spool=spool,
        state_dir=state_dir,
        gc_roots_dir=gc_roots_dir,
        upstream_keys=upstream_keys or None,
        generate_key=generate_key,
        force=force,
    )
    _carry_out(
        lambda: plan_install(layout, request, LocalHost()),
        dry_run,
        nothing="nothing to do: nix-cache-uploader is installed as asked",
    )


@main.command()
@layout_options
@click.option(
    "--purge",
    is_flag=True,
    help="Also remove spool (and its queue), state, GC roots, config, user, group.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Remove the hook even if a nix-daemon may still run it, and a unit not install's.",
)
@click.option("-n", "--dry-run", is_flag=True, help="Print each action; change nothing.")
def uninstall(
    user: str,
    group: str | None,
    config_file: str,
    nix_conf: str,
    unit_dir: str,
    hook_path: str,
    purge: bool,
    force: bool,
    dry_run: bool,
) -> None:
    """Undo `install`: stop and remove the service, take the hook out of nix.conf.

    nix.conf gets back exactly what it had (a hook that `install --force`
    commented out is restored).  The hook itself is removed once no running
    nix-daemon can still call it.  With --purge, also the spool, state and
    GC-root directories, the config file, and the user and group; the signing
    key and the credentials file are always left alone.
    """
    _needs_root(dry_run)
    layout = _layout(user, group, config_file, nix_conf, unit_dir, hook_path)
    _carry_out(
        lambda: plan_uninstall(layout, LocalHost(), purge=purge, force=force),
        dry_run,
        nothing="nothing to do: nix-cache-uploader is not installed",
    )


def _carry_out(make_plan: Callable[[], Plan], dry_run: bool, *, nothing: str) -> None:
    """Plan, then do (or with --dry-run print) each action; errors exit 1."""
    try:
        execute(make_plan(), dry_run=dry_run, echo=click.echo, nothing=nothing)
    except UploaderError as e:
        fail(str(e))
