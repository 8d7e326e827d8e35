"""The `nix-cache-uploader` command line: thin wrappers around the engine.

Every command catches UploaderError, prints one line saying what to do, and
exits with one of the named codes below.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from uploader import __version__
from uploader._exceptions import UploaderError
from uploader.compression import METHODS
from uploader.engine import Engine, PushResult
from uploader.progress import TerminalProgress, human_bytes
from uploader.signing import SecretKey, generate, write_public_key, write_secret_key
from uploader.store import NixStore
from uploader.storepath import to_store_path
from uploader.targets import open_target, parse_store_url

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("nix-cache-uploader")
F = TypeVar("F", bound=Callable[..., Any])


def setup_logging(verbose: int) -> None:
    """One line per event on stderr, no timestamps (journald adds its own)."""
    level = logging.WARNING - 10 * verbose if verbose >= 0 else logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.DEBUG))
    # botocore's debug output would echo request headers; keep it at warnings.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str, code: int = EXIT_FAILURE) -> None:
    click.echo(f"error: {message}", err=True)
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
        url = parse_store_url(store_url)
        key = SecretKey.load(secret_key_file)
        roots = [to_store_path(p) for p in paths]
        method = compression or url.compression or "zstd"
        level = compression_level
        if level is None and "compression-level" in url.params:
            level = int(url.params["compression-level"])
        engine = Engine(
            NixStore(),
            open_target(url, max_connections=jobs * 2),
            key,
            compression=method,
            compression_level=level,
            jobs=jobs,
        )
    except UploaderError as e:
        fail(str(e))
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
        click.echo(f"error: {path}: {error}", err=True)
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
