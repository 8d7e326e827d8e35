"""What every command shares: the group, exit codes, logging, errors, option blocks.

Every command catches UploaderError, prints one line saying what to do, and
exits with one of the named codes below.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click

from uploader import __version__, redact
from uploader._exceptions import ConfigError
from uploader.compression import check_level
from uploader.config import DEFAULT_CONFIG, DEFAULT_STATE_DIR
from uploader.engine import Engine, worker_threads
from uploader.fdlimit import raise_open_files
from uploader.lifecycle.layout import check_name
from uploader.lifecycle.protect import Protection
from uploader.malloc import limit_arenas
from uploader.progress import PATH_EVENTS
from uploader.quorum import Attester
from uploader.signing import SecretKey
from uploader.spool import DEFAULT_SPOOL
from uploader.state import KnownCache
from uploader.store import NixStore
from uploader.targets import StoreUrl, open_target, parse_store_url
from uploader.upstream import Upstreams

log = logging.getLogger(__name__)

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "Terminated",
    "fail",
    "main",
    "make_engine",
    "queue_options",
    "refuse_cache_key",
    "run_stoppable",
    "secret_key_file",
    "setup_logging",
    "verbosity",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_TERMINATED = 128 + signal.SIGTERM

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class Terminated(Exception):
    """The command was stopped by SIGTERM (`systemctl stop`, a CI job's
    timeout, `timeout(1)`)."""


def run_stoppable(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, stopped by SIGTERM as by Ctrl-C: ``main`` is
    cancelled, so that the engine, closed after, aborts the uploads under
    way instead of leaving them incomplete in the bucket; then Terminated
    is raised."""

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stopped: list[bool] = []

        def stop() -> None:
            stopped.append(True)
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, stop)
        try:
            return await main
        except asyncio.CancelledError:
            if stopped:
                raise Terminated from None
            raise
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(guarded())


def setup_logging(verbose: int, *, service: bool = False) -> None:
    """One line per event on stderr, no timestamps (journald adds its own).

    Commands: warnings; -v each path; -vv debug detail.  Services (``run``,
    ``publish``): their events (start, stop, each entry, retries) by
    default, each path too with -v, debug detail with -vv."""
    per_path = logging.getLogger(PATH_EVENTS)
    per_path.setLevel(logging.NOTSET)
    if service and verbose >= 0:
        if verbose == 0:
            per_path.setLevel(logging.WARNING)
        verbose = max(verbose, 1)
    level = logging.WARNING - 10 * verbose if verbose >= 0 else logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(redact.RedactingFormatter("%(levelname)s %(message)s"))
    redact.install()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.DEBUG))
    # botocore's debug output would echo request headers; keep it at warnings.
    # asyncio's debug lines ("Using selector: EpollSelector") say nothing of ours.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "watchdog", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Stopping the spool watch races with watchdog's reader thread, which then
    # logs a harmless "queue_events() called when the thread is inactive".
    logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"error: {redact.scrub(message)}", err=True)
    sys.exit(code)


def verbosity(fn: F) -> F:
    fn = click.option("-q", "--quiet", is_flag=True, help="Only print errors.")(fn)
    return click.option(
        "-v", "--verbose", count=True, help="Log each path (-v) or debug detail (-vv)."
    )(fn)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_TERM = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def duration_seconds(text: str) -> float | None:
    """``30s``, ``15m``, ``12h``, ``31d``, ``2w``, ``1h30m`` in seconds; None
    when ``text`` is not such a duration."""
    text = text.strip()
    if not DURATION.fullmatch(text):
        return None
    return sum(float(n) * DURATION_UNITS[unit] for n, unit in _TERM.findall(text))


class Span(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.3 on
    """A number in the option's own unit (seconds or days), or a duration
    with units as gc's --grace takes it (``90s``, ``5m``, ``30d``)."""

    name = "span"

    def __init__(self, unit: str) -> None:
        self.unit = unit

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            seconds = duration_seconds(text)
            if seconds is None:
                self.fail(f"{value!r} is not a number of {self.unit} nor a duration such as "
                          "90s, 5m, 12h or 30d", param, ctx)  # fmt: skip
            number = seconds / DURATION_UNITS[self.unit[0]]
        if not 0 <= number < float("inf"):
            self.fail(f"{value!r} must be 0 or more", param, ctx)
        return number


def upstream_checks(fn: F) -> F:
    """--upstream and --upstream-key NAME:KEY, as the lifecycle commands
    (verify, pin add) take them: caches that serve what this one leaves out."""
    fn = click.option(
        "--upstream-key", "upstream_keys", multiple=True, metavar="NAME:KEY",
        help="An upstream's narinfo counts only when signed by one of these (repeatable).",
    )(fn)  # fmt: skip
    return click.option(
        "--upstream", "upstreams", multiple=True, metavar="URL",
        help="Cache that serves the paths this one leaves out, e.g. https://cache.nixos.org "
        "(repeatable; as given to `run`).",
    )(fn)  # fmt: skip


class _Group(click.Group):
    """click's group, with its own errors in our one style (``error: …``, as Nix)."""

    # Subgroups (pin, quorum) list their commands the same way.
    group_class = type

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list with each command's whole first sentence
        (wrapped), not cut off at the terminal's width with "..."."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The program's entry point (tests call main() instead).
        try:
            return self.main(*args, **kwargs)
        except SystemExit as e:
            _exit_now(e.code)

    def main(  # type: ignore[override]
        self, args: Any = None, prog_name: str | None = None, **extra: Any
    ) -> Any:
        if extra.pop("standalone_mode", True) is False:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as e:
            if e.ctx is not None:
                click.echo(e.ctx.get_usage(), err=True)
                hint = e.ctx.help_option_names[0]
                click.echo(f"Try '{e.ctx.command_path} {hint}' for help.", err=True)
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(EXIT_FAILURE)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def _exit_now(code: object) -> NoReturn:
    """End the process once the command is done: output flushed and exit
    handlers run, as at any exit, but without the interpreter's teardown,
    which only frees memory one object at a time (0.1 s and more once
    boto3 and aiohttp are loaded, on every command)."""
    if code is None:
        status = EXIT_OK
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = EXIT_FAILURE
    # What the interpreter does at exit before its teardown: wait for the
    # threads that are not daemons, then run the exit handlers (logging's
    # flush among them).
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120  # a closed pipe, as Python exits then
    os._exit(status)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="nix-cache-uploader")
def main() -> None:
    """Sign and upload Nix store paths to an S3-compatible binary cache.

    A post-build-hook drops one spool entry per build; `run` uploads them in
    the background as an unprivileged user holding the signing key; `push`
    uploads given paths right away.  See `nix-cache-uploader COMMAND --help`.
    """
    # Before any thread starts (see malloc.py).
    limit_arenas()
    raise_open_files()


def make_engine(
    store_url: str,
    key: SecretKey | None,
    *,
    compression: str | None,
    compression_level: int | None,
    jobs: int,
    tmp_dir: str | None = None,
    known: KnownCache | None = None,
    upstreams: Upstreams | None = None,
    store: NixStore | None = None,
    write_nar_listing: bool | None = None,
    attest: SecretKey | None = None,
    root: str | None = None,
) -> Engine:
    """The engine for a store URL; flags win over the URL's own parameters.
    With ``attest`` (a builder key, and no cache ``key``) it attests instead
    of signing narinfos.  With ``root``, its uploads record roots of that
    name for gc, and follow gc's mark (docs/lifecycle.md)."""
    url = parse_store_url(store_url)
    # Before anything touches the cache.
    method, level, unused = compression_for(url, compression, compression_level)
    if unused is not None:
        log.warning("%s", unused)
    target = open_target(url, max_connections=worker_threads(jobs))
    is_upstream = upstreams.served if upstreams else None
    recorder = None
    if attest is not None:
        recorder = Attester(target, attest, upstream=is_upstream)
        is_upstream = recorder.skip
    guard = None
    if root is not None:
        guard = Protection(target, check_name(root, "root"), forget=known.forget if known else None)
    return Engine(
        store or NixStore(),
        target,
        key,
        compression=method,
        compression_level=level,
        jobs=jobs,
        tmp_dir=tmp_dir,
        known=known,
        is_upstream=is_upstream,
        recorder=recorder,
        write_nar_listing=url.write_nar_listing if write_nar_listing is None else write_nar_listing,
        guard=guard,
    )


def compression_for(
    url: StoreUrl, method: str | None, level: int | None
) -> tuple[str, int | None, str | None]:
    """The compression method and level a command uses: the flag or setting,
    else the store URL's parameter, else zstd at its default level; and a
    warning when the level means nothing for the method.  A level the method
    cannot use is refused, saying where it came from."""
    from_url = level is None and "compression-level" in url.params
    if from_url:
        level = int(url.params["compression-level"])
    method = method or url.compression or "zstd"
    try:
        check_level(method, level)
    except ConfigError as e:
        if not from_url:
            raise
        raise ConfigError(
            f"{e}: the level is the store URL's compression-level={level}; change it there, "
            f"or set a compression level for {method}"
        ) from None
    unused = None
    if method == "none" and level is not None:
        where = "the store URL's compression-level" if from_url else "compression-level"
        unused = f"compression is none: {where} {level} is ignored"
    return method, level, unused


def secret_key_file(flag: str | None, store_url: str, *, config_file: bool = False) -> str:
    """The signing key's file: the flag (or, with ``config_file``, the
    config file's setting), else the store URL's ``secret-key=``."""
    path = flag or parse_store_url(store_url).secret_key_file
    if path is None:
        also = ", or secret-key-file in the config file" if config_file else ""
        raise ConfigError(
            f"--secret-key-file is required (or secret-key=PATH in the store URL{also})"
        )
    return path


def refuse_cache_key(flag: str | None, store_url: str | None) -> None:
    """Attest mode holds no cache key: given one, refuse before opening it."""
    if flag or (store_url and parse_store_url(store_url).secret_key_file):
        raise ConfigError(
            "attest mode holds no cache key: drop --secret-key-file (or secret-key-file in "
            "the config file, secret-key= in the store URL); builders sign attestations with "
            "--attest-key-file, and only the publisher holds the cache key"
        )


def queue_options(fn: F) -> F:
    """--config, --spool and --state-dir: where the queue commands look."""
    fn = click.option(
        "--state-dir",
        default=None,
        metavar="DIR",
        help=f"Daemon state directory [default: {DEFAULT_STATE_DIR}].",
    )(fn)
    fn = click.option(
        "--spool", default=None, metavar="DIR", help=f"Spool directory [default: {DEFAULT_SPOOL}]."
    )(fn)
    return click.option(
        "--config",
        "config_file",
        metavar="FILE",
        default=None,
        help=f"TOML config file [default: {DEFAULT_CONFIG} if present].",
    )(fn)
