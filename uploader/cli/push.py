"""`push`: upload the closure of given paths now."""

from __future__ import annotations

import asyncio
import socket
import sys

import click

from uploader._exceptions import UploaderError
from uploader.cli._common import EXIT_FAILURE, fail, main, make_engine, setup_logging, verbosity
from uploader.cli._common import secret_key_file as cli_key_file
from uploader.compression import METHODS
from uploader.engine import PushResult
from uploader.progress import TerminalProgress, human_bytes, plural
from uploader.signing import SecretKey
from uploader.storepath import to_store_path


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
    default=None,
    metavar="FILE",
    help="Signing key in Nix's format (mode 0600 or stricter) [default: the URL's secret-key=].",
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
@click.option(
    "--root", "root_name", default=None, metavar="NAME",
    help="Name of the root this push records for gc (the newest --keep-last roots of each "
    "name are kept) [default: this host's name].",
)  # fmt: skip
@verbosity
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
def push(
    store_url: str,
    secret_key_file: str | None,
    compression: str | None,
    compression_level: int | None,
    jobs: int,
    root_name: str | None,
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
            SecretKey.load(cli_key_file(secret_key_file, store_url)),
            compression=compression,
            compression_level=compression_level,
            jobs=jobs,
            root=root_name or socket.gethostname(),
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
        click.echo(f"error: {path}: {error}", err=True)
    if quiet and result.ok:
        return
    line = (
        f"uploaded {plural(len(result.uploaded), 'path')} ({human_bytes(result.nar_bytes)} NAR, "
        f"{human_bytes(result.file_bytes)} {method}), "
        f"{len(result.present)} already in the cache"
    )
    if result.skipped_upstream:
        line += f", {len(result.skipped_upstream)} served upstream"
    if result.failed:
        line += f", {len(result.failed)} failed"
    click.echo(line, err=True)
