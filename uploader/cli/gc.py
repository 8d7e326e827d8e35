"""Keeping the bucket small: `gc` and `pin add|list|rm`."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from typing import Any

import click

from uploader._exceptions import UploaderError
from uploader.cli._common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Span,
    Terminated,
    duration_seconds,
    fail,
    main,
    setup_logging,
    upstream_checks,
    verbosity,
)
from uploader.config import check_upstreams
from uploader.lifecycle import GcResult, Policy, add_pin, collect, list_pins, remove_pin
from uploader.lifecycle.gc import reasons
from uploader.lifecycle.layout import check_name
from uploader.lifecycle.pins import PinRefused
from uploader.lifecycle.upstream import served_upstream
from uploader.progress import TerminalProgress, human_bytes, plural, utc_time
from uploader.signing import PublicKey
from uploader.storepath import STORE_DIR, to_store_path
from uploader.targets import Target, open_target
from uploader.targets.file import FileTarget


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """``0``, ``30s``, ``15m``, ``12h``, ``31d``, ``2w``, ``1h30m``.

    A bare number other than 0 is refused: ``--nar-delay 31`` read as
    seconds would let gc delete NARs that clients still expect."""
    text = value.strip()
    if re.fullmatch(r"0+(?:\.0*)?", text):
        return 0.0
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        raise click.BadParameter(
            f"{value!r} has no unit: write {text}s, {text}m, {text}h, {text}d or {text}w"
        )
    seconds = duration_seconds(text)
    if seconds is None:
        raise click.BadParameter(f"{value!r} is not a duration such as 0, 30s, 12h, 31d or 1h30m")
    return seconds


def _open(store_url: str, jobs: int = 32) -> Target:
    try:
        target = open_target(store_url, max_connections=jobs + 2)
    except UploaderError as e:
        fail(str(e), EXIT_USAGE)
    # A bucket that does not exist fails the first request; a directory
    # would be made by the first write (a gc timer with a typo in its URL
    # would report success every night).
    if isinstance(target, FileTarget) and not os.path.isdir(target.root):
        if os.path.exists(target.root):
            fail(f"the cache {target.root} is not a directory (check the URL)")
        fail(f"the cache {target.root} does not exist (push to it first, or check the URL)")
    return target


_TO = click.option(
    "--to", "store_url", required=True, metavar="STORE_URL",
    help="Binary cache: s3://BUCKET?… or file:///DIR.",
)  # fmt: skip


@main.command("gc", epilog="Exit status: 0 done, 1 failed (or damaged narinfos found), "
              "2 usage error, 143 stopped by SIGTERM.  Safe beside nix-cache-uploader's "
              "own uploads only: see docs/lifecycle.md.")  # fmt: skip
@_TO
@click.option(
    "--keep-days", type=Span("days"), default=30, show_default=True,
    help="Keep the closure of every root younger than this many days (or a duration: 12h, 2w).",
)  # fmt: skip
@click.option(
    "--keep-last", type=click.IntRange(min=0), default=1, show_default=True,
    help="Keep the closure of the newest K complete roots of each name.",
)  # fmt: skip
@click.option(
    "--grace", metavar="DURATION", callback=_duration, default="1d", show_default=True,
    help="Keep narinfos (and their closure) written less than this long ago "
    "(DURATION: 0, 30s, 15m, 12h, 31d, 2w, 1h30m).",
)  # fmt: skip
@click.option(
    "--nar-delay", metavar="DURATION", callback=_duration, default="31d", show_default=True,
    help="Delete a NAR only this long after its last narinfo went (clients remember "
    "narinfos for 30 days).",
)  # fmt: skip
@click.option("--delete", "do_delete", is_flag=True, help="Delete; without it, only say what.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@click.option(
    "-j", "--jobs", type=click.IntRange(1, 256), default=32, show_default=True,
    help="Requests at once.",
)  # fmt: skip
@verbosity
def gc_command(
    store_url: str,
    keep_days: float,
    keep_last: int,
    grace: float,
    nar_delay: float,
    do_delete: bool,
    as_json: bool,
    jobs: int,
    verbose: int,
    quiet: bool,
) -> None:
    """Delete what no pin, kept root or recent upload needs.

    Live: the closure of every pin, of the roots younger than --keep-days and
    the newest --keep-last complete roots of each name, and of every narinfo
    younger than --grace.  A narinfo goes once two `gc --delete` runs in a row
    found it unreachable; a NAR once no narinfo has named it for --nar-delay.
    Without --delete, prints what this run would delete, and writes nothing.
    """
    setup_logging(-1 if quiet else verbose)
    if do_delete and nar_delay < _SHORT_NAR_DELAY:
        # The protocol assumes no upload outlasts it (docs/lifecycle.md).
        click.echo(
            f"warning: --nar-delay {nar_delay:g}s is shorter than an upload may take: a NAR "
            "still being written when this run looks can be deleted under the narinfo that "
            "names it; keep it above any upload's duration (the default is 31d)",
            err=True,
        )
    target = _open(store_url, jobs)
    policy = Policy(keep_days=keep_days, keep_last=keep_last, grace=grace, nar_delay=nar_delay)
    show = sys.stderr.isatty() and not quiet and not as_json
    deleted: dict[str, int] = {}

    def say_deleted(key: str, why: str) -> None:
        # Each line as its object goes: a run stopped part way (a timeout,
        # `systemctl stop`, kill -9) leaves the journal exact.
        click.echo(f"delete {key}: {why}")

    # `systemctl stop` and a unit's timeout send SIGTERM: stop as Ctrl-C does.
    before = signal.signal(signal.SIGTERM, _terminated)
    try:
        result = collect(
            target,
            policy,
            delete=do_delete,
            jobs=jobs,
            progress=(lambda label: TerminalProgress(label=label)) if show else None,
            deleted=deleted,
            on_deleted=say_deleted if do_delete and not quiet and not as_json else None,
        )
    except (UploaderError, KeyboardInterrupt, Terminated) as e:
        # Stopped part way: say what went (what stays keeps its closures).
        gone = " and ".join(plural(n, kind) for kind, n in deleted.items() if n)
        if gone:
            click.echo(f"gc stopped after deleting {gone}; what stays has its closures: "
                       "run `gc --delete` again to finish", err=True)  # fmt: skip
        if isinstance(e, KeyboardInterrupt):
            raise
        if isinstance(e, Terminated):
            click.echo("gc stopped by SIGTERM", err=True)
            sys.exit(EXIT_TERMINATED)
        fail(str(e))
    finally:
        signal.signal(signal.SIGTERM, before)
    if as_json:
        click.echo(json.dumps(_to_json(result, store_url), indent=2))
    else:
        _print(result, quiet)
    sys.exit(EXIT_FAILURE if result.plan.damaged else EXIT_OK)


# A --nar-delay shorter than this is warned about with --delete.
_SHORT_NAR_DELAY = 3600.0


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def _print(result: GcResult, quiet: bool) -> None:
    bucket, done = result.bucket, result.plan
    for h in sorted(done.damaged):
        e = bucket.narinfos[h]
        why = "unreadable" if e.url is None else f"its NAR {e.url} is missing"
        click.echo(f"damaged {e.name}: {why}; kept, with its closure (see `verify`)")
    if not quiet and not result.deleting:  # with --delete, said as each went
        for key, why in reasons(result).items():
            click.echo(f"would delete {key}: {why}")
    objects, nbytes = result.freed()
    waiting = {k: bucket.nars[k][0] for k in done.unreferenced}
    line = (
        f"{plural(len(bucket.narinfos), 'narinfo')}: {len(done.live)} live, "
        f"{len(done.candidates)} unreachable "
        f"({plural(result.seeds.kept_roots, 'root')} kept, {plural(result.seeds.pins, 'pin')}); "
        f"{'deleted' if result.deleting else 'would delete'} {plural(objects, 'object')} "
        f"({human_bytes(nbytes)}): {plural(len(done.narinfos), 'narinfo')}, "
        f"{plural(len(done.nars), 'NAR')}{_bookkeeping(result)}; "
        f"{plural(len(waiting), 'unreferenced NAR')} ({human_bytes(sum(waiting.values()))}) "
        "kept until unreferenced for --nar-delay, from the gc --delete that first finds them"
    )
    if result.previous is None:
        line += (
            "; no earlier run: this one only marks narinfos and NARs"
            if result.deleting
            else "; no gc --delete has marked this bucket yet, so no narinfo or NAR would go "
            "(only lapsed roots and old run records)"
        )
    if done.unreadable:
        line += (
            "; unreadable narinfos: nothing deleted until `verify --repair` fixes them "
            "(or they are deleted by hand)"
        )
    if not quiet or done.damaged:
        click.echo(line, err=True)


def _bookkeeping(result: GcResult) -> str:
    """The roots and run records in the count, when there are any."""
    parts = [plural(len(result.lapsed_roots), "root")] if result.lapsed_roots else []
    if result.pruned_runs:
        parts.append(plural(len(result.pruned_runs), "run record"))
    return "".join(f", {p}" for p in parts)


def _to_json(result: GcResult, store_url: str) -> dict[str, Any]:
    bucket, done = result.bucket, result.plan
    objects, nbytes = result.freed()
    return {
        "store_url": store_url,
        "delete": result.deleting,
        "previous_mark": result.previous.key if result.previous else None,
        "mark": result.record,
        "narinfos": len(bucket.narinfos),
        "live": len(done.live),
        "candidates": len(done.candidates),
        "kept_roots": result.seeds.kept_roots,
        "pins": result.seeds.pins,
        "damaged": sorted(bucket.narinfos[h].name for h in done.damaged),
        "narinfos_deleted": [f"{h}.narinfo" for h in done.narinfos],
        "nars_deleted": done.nars,
        "listings_deleted": done.listings,
        "logs_deleted": done.logs,
        "roots_deleted": [r.key for r in result.lapsed_roots],
        "runs_deleted": result.pruned_runs,
        "freed": {"objects": objects, "bytes": nbytes},
        "unreferenced_nars": {
            "count": len(done.unreferenced),
            "bytes": sum(bucket.nars[k][0] for k in done.unreferenced),
        },
    }


@main.group("pin")
def pin() -> None:
    """Keep the closure of store paths in the cache forever (until `pin rm`)."""


@pin.command(
    "add", short_help="Pin the closure of PATH... (store paths or ./result links) as NAME."
)
@_TO
@upstream_checks
@click.argument("name")
@click.argument("paths", nargs=-1, metavar="PATH...")
@verbosity
def pin_add(
    store_url: str,
    upstreams: tuple[str, ...],
    upstream_keys: tuple[str, ...],
    name: str,
    paths: tuple[str, ...],
    verbose: int,
    quiet: bool,
) -> None:
    """Pin PATH... (store paths or links such as ./result) as NAME.

    The closure must be in the cache already (push it first), apart from
    paths an --upstream cache serves.  A pin of the same name is replaced.
    """
    setup_logging(-1 if quiet else verbose)
    if not paths:
        if "/" in name or name.startswith(".") or os.path.lexists(name):
            fail(f"pin add needs a NAME before the paths, e.g. `pin add --to URL release {name}`",
                 EXIT_USAGE)  # fmt: skip
        fail("pin add needs at least one PATH after the pin's NAME", EXIT_USAGE)
    try:
        check_name(name, "pin")
        store_paths = [to_store_path(p) for p in paths]
        check_upstreams(upstreams)
        keys = tuple(PublicKey.from_argument(k) for k in upstream_keys)
    except UploaderError as e:
        fail(str(e), EXIT_USAGE)
    target = _open(store_url)

    refused: dict[str, str] = {}

    def upstream(names: list[str]) -> set[str]:
        return served_upstream(upstreams, keys, names, jobs=16, refused=refused)

    try:
        added = add_pin(target, name, store_paths, upstream=upstream if upstreams else None)
    except PinRefused as e:
        # An upstream that has the paths, signed by another key than
        # --upstream-key: say so, not only "push them first".
        why = "".join(f"; {STORE_DIR}/{n}: {p}" for n, p in sorted(refused.items())[:5])
        fail(f"{e}{why}")
    except UploaderError as e:
        fail(str(e))
    if quiet:
        return
    if added.upstream:
        click.echo(
            f"pinned {name}: {plural(added.cached, 'path')} of its closure kept in this cache, "
            f"{added.upstream} more served by the upstream cache (not this cache's to keep)",
            err=True,
        )
    else:
        click.echo(f"pinned {name}: {plural(added.cached, 'path')} in its closure", err=True)


@pin.command("list")
@_TO
@click.option("--json", "as_json", is_flag=True, help="Print the pins as JSON on stdout.")
def pin_list(store_url: str, as_json: bool) -> None:
    """List the pins: name, when, paths."""
    try:
        pins = list_pins(_open(store_url))
    except UploaderError as e:
        fail(str(e))
    if as_json:
        out = [
            {"name": p.name, "created": p.created, "paths": [f"{STORE_DIR}/{b}" for b in p.paths]}
            for p in pins
        ]
        click.echo(json.dumps(out, indent=2))
        return
    if not pins:
        click.echo("no pins", err=True)  # stdout stays empty, for scripts
    for p in pins:
        click.echo(
            f"{p.name}\t{utc_time(p.created)}\t" + " ".join(f"{STORE_DIR}/{b}" for b in p.paths)
        )


@pin.command("rm")
@_TO
@click.argument("name")
def pin_rm(store_url: str, name: str) -> None:
    """Remove the pin NAME; its closure goes with a later `gc` if nothing else keeps it."""
    try:
        removed = remove_pin(_open(store_url), check_name(name, "pin"))
    except UploaderError as e:
        fail(str(e))
    if not removed:
        fail(
            f"no pin named {name!r} (`pin list` shows them; without s3:GetObject on "
            "lifecycle/v1/pins/ none can be seen)"
        )
    click.echo(f"removed pin {name}: its closure goes with a later gc unless kept", err=True)
