"""The queue commands: `run` (the daemon), `status`, `wait`, `retry`, `check-config`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import stat
import time
from typing import Any

import click

from uploader._exceptions import ConfigError, UploaderError
from uploader.cli._common import (
    EXIT_FAILURE,
    EXIT_TIMEOUT,
    Span,
    compression_for,
    fail,
    main,
    make_engine,
    queue_options,
    refuse_cache_key,
    secret_key_file,
    setup_logging,
    verbosity,
)
from uploader.compression import METHODS, check_level
from uploader.config import (
    DEFAULT_CONFIG,
    DEFAULT_GC_ROOTS,
    Settings,
    gc_roots_warning,
    load_settings,
)
from uploader.daemon import Daemon
from uploader.gcroots import GcRoots
from uploader.lock import DirectoryLock
from uploader.metrics import Metrics, parse_listen_address
from uploader.priority import lower_priority
from uploader.progress import human_bytes, plural
from uploader.signing import SecretKey
from uploader.spool import Spool
from uploader.state import (
    STATE_REOPEN_EVERY,
    KnownCache,
    entries_per_status,
    read_status,
    status_touched_at,
)
from uploader.store import NixStore
from uploader.targets import parse_store_url
from uploader.upstream import Upstreams

log = logging.getLogger("nix-cache-uploader")
# How long a forced stop waits for the cache to take the aborts of the
# multipart uploads under way.
_ABORT_WAIT = 5.0


@main.command()
@queue_options
@click.option(
    "--to", "store_url", metavar="STORE_URL",
    help="Binary cache URL, as for push [required unless the config file sets `to`].",
)  # fmt: skip
@click.option(
    "--secret-key-file", metavar="FILE",
    help="Signing key in Nix's format (mode 0600, owned by this user) "
    "[default: the config file's, else the URL's secret-key=].",
)  # fmt: skip
@click.option(
    "--attest-key-file", metavar="FILE",
    help="Attest mode: a builder key; stage NARs and sign attestations, hold no cache key.",
)  # fmt: skip
@click.option(
    "--compression", type=click.Choice(METHODS), default=None,
    help="NAR compression [default: the config file's, else the URL's compression=, else zstd].",
)  # fmt: skip
@click.option("--compression-level", type=int, default=None, help="Level for zstd or xz.")
@click.option(
    "-j", "--jobs", type=click.IntRange(1, 64), default=None, help="Paths at once [default: 4]."
)
@click.option(
    "--upstream", multiple=True, metavar="URL",
    help="Cache whose paths are not uploaded again (repeatable), e.g. https://cache.nixos.org.",
)  # fmt: skip
@click.option(
    "--upstream-key", "upstream_keys", multiple=True, metavar="NAME",
    help="Paths signed by this key name are upstream's (repeatable), e.g. cache.nixos.org-1 "
    "(NAME:KEY as in trusted-public-keys, or a public key file, counts by its name).",
)  # fmt: skip
@click.option(
    "--gc-roots-dir", default=None, metavar="DIR",
    help=f"Where queued outputs are rooted [default: {DEFAULT_GC_ROOTS}].",
)  # fmt: skip
@click.option(
    "--low-priority/--normal-priority", "low_priority", default=None,
    help="Run at nice 19, autogroup nice 19 and idle IO class, behind builds [default: low].",
)  # fmt: skip
@click.option(
    "--write-nar-listing/--no-write-nar-listing", "write_nar_listing", default=None,
    help="A <hash>.ls listing beside each narinfo, as Nix's write-nar-listing "
    "[default: the store URL's write-nar-listing, else no].",
)  # fmt: skip
@click.option(
    "--upload-logs/--no-upload-logs", "upload_logs", default=None,
    help="Publish each uploaded build's log as log/<drv> for `nix log` [default: no].",
)  # fmt: skip
@click.option(
    "--metrics", default=None, metavar="[HOST:]PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (host defaults to 127.0.0.1).",
)  # fmt: skip
@verbosity
def run(config_file: str | None, verbose: int, quiet: bool, **flags: Any) -> None:
    """Upload every build the post-build-hook queues, until stopped.

    Watches the spool (inotify, plus a scan at start-up), uploads each entry's
    closure, and removes the entry once all of it is in the cache.  Failures
    of the cache are retried with backoff, forever; malformed entries and
    paths that cannot be uploaded go to the spool's quarantine/ with a reason.
    SIGTERM finishes in-flight uploads first; a second SIGINT stops at once.
    Run it as a dedicated unprivileged user in the spool's group.
    """
    setup_logging(-1 if quiet else verbose, service=True)
    overrides = {k.replace("_", "-"): v for k, v in flags.items()}
    overrides["to"] = overrides.pop("store-url")
    overrides["upstream-keys"] = overrides.pop("upstream-keys")
    try:
        settings = load_settings(config_file, overrides)
        if config_file is not None:
            # Imported here, as below: boto3 is not for every command.
            from uploader.targets.credentials import service_reads_credentials_from

            service_reads_credentials_from(
                os.path.join(os.path.dirname(os.path.abspath(config_file)), "environment")
            )
        settings.require("to")
        assert settings.to is not None
        if os.geteuid() == 0:
            log.warning(
                "running as root: run the uploader as its own unprivileged user so that "
                "the signing key is out of reach of everything else"
            )
        key, attest = None, None
        if settings.attest_key_file:
            refuse_cache_key(settings.secret_key_file, settings.to)
            attest = SecretKey.load(settings.attest_key_file)
        else:
            key = SecretKey.load(
                secret_key_file(settings.secret_key_file, settings.to, config_file=True)
            )
        if settings.low_priority:
            # Before any thread starts: threads inherit the priority.
            lowered = lower_priority()
            log.info("running at low priority (%s)", ", ".join(lowered) or "refused")
        daemon, locks = _make_daemon(settings, key, attest)
    except UploaderError as e:
        fail(str(e))
    try:
        asyncio.run(daemon.run())
    except UploaderError as e:
        fail(str(e))
    if daemon.forced:
        # A request may hang in a worker thread for its whole timeout; a
        # forced stop does not wait for it (the entries are still queued).
        # The multipart uploads begun are aborted, unless the cache does
        # not answer within a few seconds.
        aborted = daemon.engine.abort_uploads(timeout=_ABORT_WAIT)
        if aborted:
            log.info("aborted %s under way", plural(aborted, "multipart upload"))
        logging.shutdown()
        os._exit(EXIT_FAILURE)
    daemon.engine.close()
    for lock in locks:
        lock.release()


def _make_daemon(
    settings: Settings, key: SecretKey | None, attest: SecretKey | None
) -> tuple[Daemon, list[DirectoryLock]]:
    spool = Spool(settings.spool)
    if not os.path.isdir(spool.path) or not os.access(spool.path, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(
            f"spool {spool.path} is missing or not writable by this user: create it with "
            "`install -d -m 2770 -o root -g GROUP` where GROUP is this user's group"
        )
    for what, directory in (
        ("state directory", settings.state_dir),
        ("gc-roots-dir", settings.gc_roots_dir),
    ):
        # Uploads must not run unprotected from the Nix GC: no roots, no start.
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"{what} {directory} is missing and cannot be created ({e.strerror}): "
                "create it owned by this user (`install` does)"
            ) from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {directory} is not writable by this user")
    # Before anything reads the spool or writes the status: one daemon each.
    locks = [
        DirectoryLock(spool.path, "spool"),
        DirectoryLock(settings.state_dir, "state directory"),
        DirectoryLock(settings.gc_roots_dir, "gc-roots-dir"),
    ]
    assert settings.to is not None
    # In attest mode the memory is of this builder's attestations, not of narinfos.
    memory_of = parse_store_url(settings.to).redacted() + (
        f"#attest={attest.name}" if attest else ""
    )
    known = KnownCache(
        os.path.join(settings.state_dir, "state.sqlite"),
        memory_of,
        ttl=settings.known_ttl,
        must_open=False,
    )
    if known.problem:
        # Only a memory: a full disk or a stray file must not stop uploads.
        log.warning(
            "%s; going on without it, asking the cache instead (tried again every %.0fs)",
            known.problem, STATE_REOPEN_EVERY,
        )  # fmt: skip
    upstreams = Upstreams(settings.upstream, settings.upstream_keys, memory=known)
    store = NixStore()
    engine = make_engine(
        settings.to,
        key,
        store=store,
        compression=settings.compression,
        compression_level=settings.compression_level,
        jobs=settings.jobs,
        tmp_dir=settings.tmp_dir,
        known=known,
        upstreams=upstreams if upstreams else None,
        write_nar_listing=settings.write_nar_listing,
        attest=attest,
        # A builder in attest mode writes no narinfo: nothing for gc to protect.
        root=None if attest is not None else socket.gethostname(),
    )
    metrics = None
    if settings.metrics:
        metrics = Metrics()
        host, port = metrics.serve(settings.metrics)
        log.info("serving metrics at http://%s:%d/metrics", host, port)
    roots = GcRoots(settings.gc_roots_dir)
    if (unprotected := gc_roots_warning(settings.gc_roots_dir)) is not None:
        log.warning("%s", unprotected)
    daemon = Daemon(settings, store=store, engine=engine, spool=spool, roots=roots, metrics=metrics)
    return daemon, locks


def _queue_settings(config_file: str | None, spool: str | None, state_dir: str | None) -> Settings:
    """Where the queue commands look; a spool that does not exist is an error.

    Without --spool, the spool is the one the daemon of that state directory
    serves (its status file says), so `--state-dir X` alone answers for X.
    """
    try:
        settings = load_settings(config_file, {"spool": spool, "state-dir": state_dir})
    except UploaderError as e:
        fail(str(e))
    recorded = (read_status(settings.state_dir) or {}).get("spool")
    if spool is None and isinstance(recorded, str) and recorded != settings.spool:
        settings = dataclasses.replace(settings, spool=recorded)
    try:
        if not stat.S_ISDIR(os.stat(settings.spool).st_mode):
            fail(f"spool {settings.spool} is not a directory")
    except FileNotFoundError:
        fail(
            f"spool {settings.spool} does not exist: give the uploader's --spool "
            "(or --config), or install it first (`nix-cache-uploader install`)"
        )
    except PermissionError:
        pass  # this user may not look inside; the status file still answers
    return settings


def _spool_pending(settings: Settings) -> list[str] | None:
    """Entries in the spool, or None when this user may not look."""
    try:
        return Spool(settings.spool).pending()
    except OSError:
        return None


@main.command()
@queue_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(
    config_file: str | None, spool: str | None, state_dir: str | None, as_json: bool
) -> None:
    """Show the queue: depth, in flight, retrying, quarantined, last errors."""
    settings = _queue_settings(config_file, spool, state_dir)
    report = _read_report(settings.state_dir) or {}
    pending = _spool_pending(settings)
    if pending is not None:
        report["pending"] = len(pending)
    elif "updated_at" in report:
        # A user who may not list the spool: the daemon's count holds while
        # the spool is as the daemon last saw it; otherwise it is unknown
        # (a stopped daemon's count is not updated).
        counted = entries_per_status(report, settings.spool)
        if counted is not None:
            report["pending"] = counted
        elif _daemon_state(report) != "running":
            report["pending"] = None
    try:
        report["quarantined"] = [
            {"entry": n, "reason": r} for n, r in Spool(settings.spool).quarantined()
        ]
    except OSError:
        report.setdefault("quarantined", None)
    report["daemon"] = _daemon_state(report)
    if report["daemon"] == "not responding" and _gone(report.get("pid")):
        # Killed: nothing is in flight in a process that no longer exists.
        report["in_flight"] = 0
    # The documented fields are there even before a daemon ever ran.
    report.setdefault("pending", None)
    for key, empty in (("in_flight", 0), ("retrying", []), ("last_errors", [])):
        report.setdefault(key, empty)
    # An older daemon listed every retrying entry, without a count.
    report.setdefault("retrying_count", len(report["retrying"]))
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    _print_status(report, settings.state_dir)


def _read_report(state_dir: str) -> dict[str, Any] | None:
    """The daemon's status file; with ``status_behind`` (seconds) when the
    daemon is alive but has not been able to write it for a while (a full
    disk): it then keeps touching the file it cannot replace."""
    report = read_status(state_dir)
    if report is None or "updated_at" not in report:
        return report
    touched = status_touched_at(state_dir)
    now = time.time()
    behind = now - float(report["updated_at"])
    if touched is not None and now - touched < _STALE_AFTER and behind >= _STALE_AFTER:
        report["status_behind"] = behind
    return report


def _daemon_state(report: dict[str, Any]) -> str:
    if "updated_at" not in report:
        return "unknown"
    if report.get("status_behind") is not None:
        return "running"  # alive: it touches the status it cannot write
    if not report.get("running"):
        return "stopped"
    age = time.time() - float(report["updated_at"])
    if age >= _STALE_AFTER or _gone(report.get("pid")):
        return "not responding"
    return "running"


def _gone(pid: object) -> bool:
    """Whether the process that wrote the status no longer exists here (it
    was killed before it could say it stopped)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # there, but another user's
    return False


_STALE_AFTER = 15.0


# Entries listed per section by `status`; --json lists all it has (the
# daemon writes the 100 oldest retrying ones).
_SHOWN = 10


def _more(items: list[Any], total: int | None = None) -> None:
    """The line after the first entries of a section, when there are more:
    ``total`` of them, of which --json lists ``items``."""
    total = len(items) if total is None else total
    shown = min(len(items), _SHOWN)
    if total <= shown:
        return
    listed = "see --json" if len(items) >= total else f"--json lists the oldest {len(items)}"
    click.echo(f"  … and {total - shown} more ({listed})")


def _print_status(r: dict[str, Any], state_dir: str) -> None:
    daemon = r["daemon"]
    if daemon == "unknown":
        click.echo("daemon:      unknown (no status file: never started, or another --state-dir)")
    else:
        ago = time.time() - float(r["updated_at"])
        if r.get("status_behind") is not None:
            click.echo(
                f"daemon:      {daemon}, but it has not been able to write its status for "
                f"{ago:.0f}s: the figures below are from then (is {state_dir} full? "
                "see the daemon's log)"
            )
        else:
            click.echo(f"daemon:      {daemon} (pid {r.get('pid')}, last update {ago:.0f}s ago)")
        click.echo(f"target:      {r.get('target')}")
    oldest = r.get("oldest_pending_age")
    pending = r.get("pending")
    line = f"queue:       {'?' if pending is None else pending} pending, "
    line += f"{r.get('in_flight', 0)} in flight"
    if oldest is not None and r.get("pending"):
        line += f", oldest {oldest:.0f}s"
    click.echo(line)
    if r.get("cache_problem") and daemon == "running":
        click.echo(f"problem:     {r['cache_problem']}")
        click.echo("             (entries wait; the daemon asks the cache again with backoff)")
    retrying = r.get("retrying") or []
    retrying_count = r.get("retrying_count", len(retrying))
    click.echo(f"retrying:    {retrying_count}")
    for item in retrying[:_SHOWN]:
        # A countdown only while a daemon is there to keep it.
        when = (
            f"next in {item['next_try_in']:.0f}s"
            if daemon == "running"
            else "retried when the daemon runs"
        )
        click.echo(f"  {item['entry']}: attempt {item['attempts']}, {when}: {item['error']}")
    _more(retrying, retrying_count)
    quarantined = r.get("quarantined")
    if quarantined is None:
        click.echo("quarantined: (spool not readable by this user)")
    else:
        click.echo(f"quarantined: {len(quarantined)}")
        for item in quarantined[:_SHOWN]:
            click.echo(f"  {item['entry']}: {item['reason']}")
        _more(quarantined)
    if "uploaded_paths" in r:
        paths = plural(r["uploaded_paths"], "path")
        size = human_bytes(r.get("uploaded_bytes", 0))
        if r.get("attest"):  # nothing went to the cache: NARs staged, paths attested
            click.echo(f"attested:    {paths}, {size} staged since start")
        else:
            click.echo(f"uploaded:    {paths}, {size} since start")
    errors = r.get("last_errors") or []
    if errors:
        click.echo("last errors:")
        for item in errors[-5:]:
            when = time.strftime("%H:%M:%S", time.localtime(item["time"]))
            # Not twice: many errors begin with the path they are about.
            named = item.get("subject") and not item["error"].startswith(item["subject"])
            subject = f"{item['subject']}: " if named else ""
            click.echo(f"  {when} {subject}{item['error']}")


@main.command()
@queue_options
@click.option(
    "--timeout",
    type=Span("seconds"),
    default=None,
    metavar="SECONDS",
    help="Give up after this many seconds, or a duration such as 10m (exit 3) "
    "[default: wait forever].",
)
def wait(
    config_file: str | None, spool: str | None, state_dir: str | None, timeout: float | None
) -> None:
    """Block until the spool is drained (for the end of a CI job).

    Waits as long as it takes unless --timeout is given.  Exits 0 once every
    queued entry is uploaded (or quarantined), 3 on timeout.  In attest mode
    (a fleet's builder) that is staged and attested: the path is in the cache
    only once the publisher has a quorum.  Users who cannot read the spool
    are answered from the daemon's status file.
    """
    settings = _queue_settings(config_file, spool, state_dir)
    start = time.time()
    warned = False
    while True:
        report = _read_report(settings.state_dir)
        pending = _spool_pending(settings)
        counted = entries_per_status(report, settings.spool) if report else None
        if pending is not None:
            left = len(pending)
        elif counted is not None:
            # The daemon's count, of a spool that has not changed since.
            left = counted
        elif report and float(report["updated_at"]) > start:
            left = int(report["pending"])  # in-flight entries are pending too
        else:
            left = -1  # not known yet
        if left == 0:
            if settings.attest_key_file or (report or {}).get("attest"):
                # A builder's part is done; the publisher signs once enough agree.
                click.echo(
                    "spool drained: every queued build is staged and attested "
                    "(in the cache once the publisher has a quorum)",
                    err=True,
                )
            else:
                click.echo("spool drained", err=True)
            return
        state = _daemon_state(report or {})
        if state != "running" and not warned and time.time() - start > 2:
            why = {
                "unknown": f"has written no status in {settings.state_dir} (not started yet?)",
                "stopped": "is stopped",
                "not responding": "is not responding",
            }[state]
            click.echo(f"warning: the uploader daemon {why}; waiting anyway", err=True)
            warned = True
        if timeout is not None and time.time() - start >= timeout:
            what = (
                f"{plural(left, 'entry', 'entries')} still queued"
                if left > 0
                else ("queue state unknown")
            )
            fail(f"timed out after {timeout:g}s: {what}; see `nix-cache-uploader status`",
                 EXIT_TIMEOUT)  # fmt: skip
        time.sleep(0.25)


@main.command()
@queue_options
def retry(config_file: str | None, spool: str | None, state_dir: str | None) -> None:
    """Requeue quarantined entries and retry waiting ones now.

    Quarantined entries move back into the spool; the daemon also skips the
    backoff of entries waiting after a failure.
    """
    settings = _queue_settings(config_file, spool, state_dir)
    try:
        moved = Spool(settings.spool).requeue()
    except OSError as e:
        fail(f"cannot requeue in {settings.spool}: {e.strerror}; run as root or the uploader")
    click.echo(f"requeued {plural(moved, 'quarantined entry', 'quarantined entries')}")
    report = _read_report(settings.state_dir)
    state = _daemon_state(report) if report else "unknown"
    if report is not None and state == "running":
        try:
            os.kill(int(report["pid"]), signal.SIGUSR1)
            click.echo(f"asked the daemon (pid {report['pid']}) to retry waiting entries now")
            return
        except ProcessLookupError:
            state = "stopped"
        except PermissionError:
            click.echo("not allowed to signal the daemon; waiting entries keep their backoff")
            return
    if state == "not responding":
        click.echo(
            "the daemon is not responding (see `nix-cache-uploader status`); entries wait "
            "until it runs again"
        )
    else:
        click.echo("the daemon is not running; entries wait for its next start")


@main.command("check-config")
@click.option(
    "--config",
    "config_file",
    metavar="FILE",
    default=None,
    help=f"TOML config file [default: {DEFAULT_CONFIG}].",
)
def check_config(config_file: str | None) -> None:
    """Check a config file without the network or the signing key.

    Unknown settings, wrong types, a malformed store URL, compression, paths
    and the metrics address are errors (exit 1).  A missing `to` and a key
    file that is absent or unreadable here are warnings: at NixOS build time
    the key is not there yet.
    """
    setup_logging(0)
    path = config_file or DEFAULT_CONFIG
    try:
        settings = load_settings(path, {})
        warnings = _settings_warnings(settings)
    except UploaderError as e:
        fail(str(e) if path in str(e) else f"config file {path}: {e}")
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{path}: ok")


def _settings_warnings(settings: Settings) -> list[str]:
    """Check what load_settings leaves to the moment of use; return warnings."""
    warnings = []
    if (unprotected := gc_roots_warning(settings.gc_roots_dir)) is not None:
        warnings.append(unprotected)
    url = parse_store_url(settings.to) if settings.to is not None else None
    if url is None:
        warnings.append("`to` is not set: `run` then needs --to")
        # Against the setting or the default: --to may name another method,
        # but a level no method takes is wrong either way.
        check_level(settings.compression or "zstd", settings.compression_level)
    else:
        # As `run` reads them: the setting, else the URL's parameter.
        _, _, unused = compression_for(url, settings.compression, settings.compression_level)
        if unused is not None:
            warnings.append(unused)
    if settings.metrics:
        parse_listen_address(settings.metrics)
    profile = url.params.get("profile") if url is not None else None
    if profile:
        # Imported here: boto3 and aiohttp take 0.15 s to import, which
        # every command would pay for this one check.
        from uploader.targets.s3 import profile_exists

        if not profile_exists(profile):
            warnings.append(f"AWS profile {profile!r} is not configured for this user (yet)")
    if settings.attest_key_file:
        refuse_cache_key(settings.secret_key_file, settings.to)
    setting = "attest-key-file" if settings.attest_key_file else "secret-key-file"
    key = settings.attest_key_file or settings.secret_key_file
    if key is not None and not os.path.exists(key):
        warnings.append(f"{setting} {key} does not exist (yet)")
    elif key is not None and not os.access(key, os.R_OK):
        warnings.append(f"{setting} {key} is not readable by this user; not checked")
    elif key is not None:
        SecretKey.load(key)
    return warnings
