"""The `nix-cache-uploader` command line: thin wrappers around the engine.

Every command catches UploaderError, prints one line saying what to do, and
exits with one of the named codes below.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from uploader import __version__, redact
from uploader._exceptions import ConfigError, UploaderError
from uploader.compression import METHODS, check_level
from uploader.config import DEFAULT_CONFIG, DEFAULT_STATE_DIR, Settings, load_settings
from uploader.daemon import Daemon
from uploader.engine import Engine, PushResult, worker_threads
from uploader.gcroots import GcRoots
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
from uploader.malloc import limit_arenas
from uploader.metrics import Metrics, parse_listen_address
from uploader.priority import lower_priority
from uploader.progress import TerminalProgress, human_bytes
from uploader.signing import SecretKey, generate, write_public_key, write_secret_key
from uploader.spool import DEFAULT_SPOOL, Spool
from uploader.state import KnownCache, read_status
from uploader.store import NixStore
from uploader.storepath import to_store_path
from uploader.targets import open_target, parse_store_url
from uploader.upstream import Upstreams

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_TIMEOUT", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

log = logging.getLogger("nix-cache-uploader")
F = TypeVar("F", bound=Callable[..., Any])


def setup_logging(verbose: int) -> None:
    """One line per event on stderr, no timestamps (journald adds its own)."""
    level = logging.WARNING - 10 * verbose if verbose >= 0 else logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(redact.RedactingFormatter("%(levelname)s %(message)s"))
    redact.install()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.DEBUG))
    # botocore's debug output would echo request headers; keep it at warnings.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Stopping the spool watch races with watchdog's reader thread, which then
    # logs a harmless "queue_events() called when the thread is inactive".
    logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)


def fail(message: str, code: int = EXIT_FAILURE) -> None:
    click.echo(f"error: {redact.scrub(message)}", err=True)
    sys.exit(code)


def verbosity(fn: F) -> F:
    fn = click.option("-q", "--quiet", is_flag=True, help="Only print errors.")(fn)
    return click.option(
        "-v", "--verbose", count=True, help="Log each path (-v) or debug detail (-vv)."
    )(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="nix-cache-uploader")
def main() -> None:
    """Sign and upload Nix store paths to an S3-compatible binary cache.

    A post-build-hook drops one spool entry per build; `run` uploads them in
    the background as an unprivileged user holding the signing key; `push`
    uploads given paths right away.  See `nix-cache-uploader COMMAND --help`.
    """
    # Before any thread starts (see malloc.py).
    limit_arenas()


def make_engine(
    store_url: str,
    key: SecretKey,
    *,
    compression: str | None,
    compression_level: int | None,
    jobs: int,
    tmp_dir: str | None = None,
    known: KnownCache | None = None,
    upstreams: Upstreams | None = None,
    store: NixStore | None = None,
) -> Engine:
    """The engine for a store URL; flags win over the URL's own parameters."""
    url = parse_store_url(store_url)
    level = compression_level
    if level is None and "compression-level" in url.params:
        level = int(url.params["compression-level"])
    return Engine(
        store or NixStore(),
        open_target(url, max_connections=worker_threads(jobs)),
        key,
        compression=compression or url.compression or "zstd",
        compression_level=level,
        jobs=jobs,
        tmp_dir=tmp_dir,
        known=known,
        is_upstream=upstreams.served if upstreams else None,
    )


@main.command()
@click.argument("name")
@click.argument("secret_key_file", type=click.Path(dir_okay=False))
@click.argument("public_key_file", type=click.Path(dir_okay=False))
def keygen(name: str, secret_key_file: str, public_key_file: str) -> None:
    """Create a signing key pair, like `nix-store --generate-binary-cache-key`.

    NAME is the key's name, conventionally the cache's host name plus a
    number (e.g. cache.example.org-1).  SECRET_KEY_FILE is created with mode
    0600 and PUBLIC_KEY_FILE with 0644; existing files are never overwritten.
    Put the public key into `trusted-public-keys` on machines that substitute.
    """
    try:
        key = generate(name)
        write_secret_key(secret_key_file, key)
        write_public_key(public_key_file, key.public_key())
    except (UploaderError, ValueError) as e:
        fail(str(e))
    click.echo(key.public_key().to_text())


@main.command()
@click.option(
    "--to",
    "store_url",
    required=True,
    metavar="STORE_URL",
    help="Binary cache: s3://BUCKET?region=R&endpoint=http://HOST:PORT or file:///DIR.",
)
@click.option(
    "--secret-key-file",
    required=True,
    type=click.Path(dir_okay=False),
    help="Signing key in Nix's format (mode 0600 or stricter).",
)
@click.option(
    "--compression",
    type=click.Choice(METHODS),
    default=None,
    help="NAR compression [default: the URL's compression=, else zstd].",
)
@click.option("--compression-level", type=int, default=None, help="Level for zstd or xz.")
@click.option(
    "-j", "--jobs", type=click.IntRange(1, 64), default=4, show_default=True,
    help="Paths processed at once.",
)  # fmt: skip
@verbosity
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
def push(
    store_url: str,
    secret_key_file: str,
    compression: str | None,
    compression_level: int | None,
    jobs: int,
    verbose: int,
    quiet: bool,
    paths: tuple[str, ...],
) -> None:
    """Upload the closure of each PATH to the binary cache now.

    PATH is a store path, a path inside one, or a link to one such as
    ./result.  Paths the cache already has are skipped; a path whose contents
    differ from what the Nix database registered is refused and not signed.
    """
    setup_logging(-1 if quiet else verbose)
    try:
        engine = make_engine(
            store_url,
            SecretKey.load(secret_key_file),
            compression=compression,
            compression_level=compression_level,
            jobs=jobs,
        )
        roots = [to_store_path(p) for p in paths]
    except UploaderError as e:
        fail(str(e))
    method = engine.compression
    progress = TerminalProgress() if sys.stderr.isatty() and not quiet else None
    try:
        result = asyncio.run(engine.push(roots, progress))
    except UploaderError as e:
        fail(str(e))
    finally:
        if progress:
            progress.finish()
        engine.close()
    _report(result, method, quiet)
    if not result.ok:
        sys.exit(EXIT_FAILURE)


def _report(result: PushResult, method: str, quiet: bool) -> None:
    for path, error in sorted(result.failed.items()):
        click.echo(redact.scrub(f"error: {path}: {error}"), err=True)
    if quiet and result.ok:
        return
    line = (
        f"uploaded {len(result.uploaded)} paths ({human_bytes(result.nar_bytes)} NAR, "
        f"{human_bytes(result.file_bytes)} {method}), "
        f"{len(result.present)} already in the cache"
    )
    if result.skipped_upstream:
        line += f", {len(result.skipped_upstream)} served upstream"
    if result.failed:
        line += f", {len(result.failed)} failed"
    click.echo(line, err=True)


def queue_options(fn: F) -> F:
    """--config, --spool and --state-dir: where the queue commands look."""
    fn = click.option(
        "--state-dir", default=None, help=f"Daemon state directory [default: {DEFAULT_STATE_DIR}]."
    )(fn)
    fn = click.option("--spool", default=None, help=f"Spool directory [default: {DEFAULT_SPOOL}].")(
        fn
    )
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        default=None,
        help=f"TOML config file [default: {DEFAULT_CONFIG} if present].",
    )(fn)


@main.command()
@queue_options
@click.option("--to", "store_url", metavar="STORE_URL", help="Binary cache URL (as for push).")
@click.option("--secret-key-file", help="Signing key file (mode 0600, owned by this user).")
@click.option("--compression", type=click.Choice(METHODS), default=None, help="NAR compression.")
@click.option("--compression-level", type=int, default=None, help="Level for zstd or xz.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=None, help="Paths at once [4].")
@click.option(
    "--upstream", multiple=True, metavar="URL",
    help="Cache whose paths are not uploaded again (repeatable), e.g. https://cache.nixos.org.",
)  # fmt: skip
@click.option(
    "--upstream-key", "upstream_keys", multiple=True, metavar="NAME",
    help="Paths signed by this key name are upstream's (repeatable), e.g. cache.nixos.org-1.",
)  # fmt: skip
@click.option("--gc-roots-dir", default=None, help="Where queued outputs are rooted.")
@click.option(
    "--low-priority/--normal-priority", "low_priority", default=None,
    help="Run at nice 19, autogroup nice 19 and idle IO class, behind builds [default: low].",
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
    setup_logging(-1 if quiet else verbose + 1)
    overrides = {k.replace("_", "-"): v for k, v in flags.items()}
    overrides["to"] = overrides.pop("store-url")
    overrides["upstream-keys"] = overrides.pop("upstream-keys")
    try:
        settings = load_settings(config_file, overrides)
        settings.require("to", "secret_key_file")
        if os.geteuid() == 0:
            log.warning(
                "running as root: run the uploader as its own unprivileged user so that "
                "the signing key is out of reach of everything else"
            )
        key = SecretKey.load(str(settings.secret_key_file))
        if settings.low_priority:
            # Before any thread starts: threads inherit the priority.
            lowered = lower_priority()
            log.info("running at low priority (%s)", ", ".join(lowered) or "refused")
        daemon = _make_daemon(settings, key)
    except UploaderError as e:
        fail(str(e))
    try:
        asyncio.run(daemon.run())
    except UploaderError as e:
        fail(str(e))
    if daemon.forced:
        # A request may hang in a worker thread for its whole timeout; a
        # forced stop does not wait for it (the entries are still queued).
        logging.shutdown()
        os._exit(EXIT_FAILURE)
    daemon.engine.close()


def _make_daemon(settings: Settings, key: SecretKey) -> Daemon:
    spool = Spool(settings.spool)
    if not os.path.isdir(spool.path) or not os.access(spool.path, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(
            f"spool {spool.path} is missing or not writable by this user: create it with "
            "`install -d -m 2770 -o root -g GROUP` where GROUP is this user's group"
        )
    try:
        os.makedirs(settings.state_dir, mode=0o755, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"state directory {settings.state_dir}: {e.strerror}") from None
    assert settings.to is not None
    known = KnownCache(
        os.path.join(settings.state_dir, "state.sqlite"),
        parse_store_url(settings.to).redacted(),
        ttl=settings.known_ttl,
    )
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
    )
    metrics = None
    if settings.metrics:
        metrics = Metrics()
        host, port = metrics.serve(settings.metrics)
        log.info("serving metrics at http://%s:%d/metrics", host, port)
        record = metrics.uploaded
        engine.on_uploaded = lambda info, seconds, size: record(seconds, info.nar_size, size)
    roots = GcRoots(settings.gc_roots_dir)
    return Daemon(settings, store=store, engine=engine, spool=spool, roots=roots, metrics=metrics)


def _queue_settings(config_file: str | None, spool: str | None, state_dir: str | None) -> Settings:
    try:
        return load_settings(config_file, {"spool": spool, "state-dir": state_dir})
    except UploaderError as e:
        fail(str(e))
        raise AssertionError("unreachable") from e


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
    report = read_status(settings.state_dir) or {}
    pending = _spool_pending(settings)
    if pending is not None:
        report["pending"] = len(pending)
    try:
        report["quarantined"] = [
            {"entry": n, "reason": r} for n, r in Spool(settings.spool).quarantined()
        ]
    except OSError:
        report.setdefault("quarantined", None)
    report["daemon"] = _daemon_state(report)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    _print_status(report)


def _daemon_state(report: dict[str, Any]) -> str:
    if "updated_at" not in report:
        return "unknown"
    if not report.get("running"):
        return "stopped"
    age = time.time() - float(report["updated_at"])
    return "running" if age < _STALE_AFTER else "not responding"


_STALE_AFTER = 15.0


# Entries listed per section by `status`; --json lists them all.
_SHOWN = 10


def _more(items: list[Any]) -> None:
    if len(items) > _SHOWN:
        click.echo(f"  … and {len(items) - _SHOWN} more (see --json)")


def _print_status(r: dict[str, Any]) -> None:
    daemon = r["daemon"]
    if daemon == "unknown":
        click.echo("daemon:      no status file (never started, or another --state-dir)")
    else:
        ago = time.time() - float(r["updated_at"])
        click.echo(f"daemon:      {daemon} (pid {r.get('pid')}, last update {ago:.0f}s ago)")
        click.echo(f"target:      {r.get('target')}")
    oldest = r.get("oldest_pending_age")
    line = f"queue:       {r.get('pending', '?')} pending, {r.get('in_flight', 0)} in flight"
    if oldest is not None and r.get("pending"):
        line += f", oldest {oldest:.0f}s"
    click.echo(line)
    retrying = r.get("retrying") or []
    click.echo(f"retrying:    {len(retrying)}")
    for item in retrying[:_SHOWN]:
        click.echo(
            f"  {item['entry']}: attempt {item['attempts']}, next in "
            f"{item['next_try_in']:.0f}s: {item['error']}"
        )
    _more(retrying)
    quarantined = r.get("quarantined")
    if quarantined is None:
        click.echo("quarantined: (spool not readable by this user)")
    else:
        click.echo(f"quarantined: {len(quarantined)}")
        for item in quarantined[:_SHOWN]:
            click.echo(f"  {item['entry']}: {item['reason']}")
        _more(quarantined)
    if "uploaded_paths" in r:
        click.echo(
            f"uploaded:    {r['uploaded_paths']} paths, "
            f"{human_bytes(r.get('uploaded_bytes', 0))} since start"
        )
    errors = r.get("last_errors") or []
    if errors:
        click.echo("last errors:")
        for item in errors[-5:]:
            when = time.strftime("%H:%M:%S", time.localtime(item["time"]))
            click.echo(f"  {when} {item.get('subject') or ''}: {item['error']}")


@main.command()
@queue_options
@click.option(
    "--timeout", type=click.FloatRange(min=0), default=None, help="Give up after S seconds."
)
def wait(
    config_file: str | None, spool: str | None, state_dir: str | None, timeout: float | None
) -> None:
    """Block until the spool is drained (for the end of a CI job).

    Exits 0 once every queued entry is uploaded (or quarantined), 3 on
    timeout.  Users who cannot read the spool are answered from the daemon's
    status file.
    """
    settings = _queue_settings(config_file, spool, state_dir)
    start = time.time()
    warned = False
    while True:
        report = read_status(settings.state_dir)
        pending = _spool_pending(settings)
        if pending is not None:
            left = len(pending)
        elif report and float(report["updated_at"]) > start:
            left = int(report["pending"]) + int(report["in_flight"])
        else:
            left = -1  # not known yet
        if left == 0:
            click.echo("spool drained", err=True)
            return
        state = _daemon_state(report or {})
        if state != "running" and not warned and time.time() - start > 2:
            click.echo(f"warning: the uploader daemon is {state}; waiting anyway", err=True)
            warned = True
        if timeout is not None and time.time() - start >= timeout:
            what = f"{left} entries still queued" if left > 0 else "queue state unknown"
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
    click.echo(f"requeued {moved} quarantined entries")
    report = read_status(settings.state_dir)
    if report and _daemon_state(report) == "running":
        try:
            os.kill(int(report["pid"]), signal.SIGUSR1)
            click.echo(f"asked the daemon (pid {report['pid']}) to retry waiting entries now")
        except ProcessLookupError:
            click.echo("the daemon is not running; entries wait for its next start")
        except PermissionError:
            click.echo("not allowed to signal the daemon; waiting entries keep their backoff")


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
    "--generate-key",
    metavar="NAME",
    help="Create the signing key NAME there (owned by --user, 0600) if it is missing.",
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
    _needs_root(dry_run)
    layout = _layout(user, group, config_file, nix_conf, unit_dir, hook_path)
    request = Request(
        command=service_command(sys.argv[0], sys.executable),
        path=service_path(os.environ.get("PATH")),
        to=store_url,
        secret_key_file=secret_key_file,
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


@main.command("check-config")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
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
        fail(str(e) if path in str(e) else f"{path}: {e}")
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{path}: ok")


def _settings_warnings(settings: Settings) -> list[str]:
    """Check what load_settings leaves to the moment of use; return warnings."""
    warnings = []
    if settings.to is None:
        warnings.append("`to` is not set: `run` then needs --to")
    else:
        url = parse_store_url(settings.to)
        check_level(settings.compression or url.compression or "zstd", settings.compression_level)
    if settings.metrics:
        parse_listen_address(settings.metrics)
    key = settings.secret_key_file
    if key is not None and not os.path.exists(key):
        warnings.append(f"secret-key-file {key} does not exist (yet)")
    elif key is not None and not os.access(key, os.R_OK):
        warnings.append(f"secret-key-file {key} is not readable by this user; not checked")
    elif key is not None:
        SecretKey.load(key)
    return warnings
