"""`push`: upload the closure of given paths now."""

from __future__ import annotations

import logging
import socket
import sys

import click

from uploader import redact
from uploader._exceptions import ConfigError, KeyFileError, UploaderError
from uploader.cli._common import (
    EXIT_FAILURE,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Terminated,
    fail,
    main,
    make_engine,
    refuse_cache_key,
    run_stoppable,
    setup_logging,
    verbosity,
)
from uploader.cli._common import secret_key_file as cli_key_file
from uploader.compression import METHODS
from uploader.config import check_upstreams, upstream_key_names
from uploader.engine import Engine, PushResult
from uploader.lifecycle.layout import check_name
from uploader.progress import TerminalProgress, human_bytes, plural
from uploader.quorum import Attester
from uploader.signing import SecretKey
from uploader.store import NixStore
from uploader.storepath import to_store_path
from uploader.upstream import Upstreams

log = logging.getLogger(__name__)


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
    "--attest-key-file",
    default=None,
    metavar="FILE",
    help="Attest mode: stage NARs and sign attestations with this builder key for a "
    "quorum publisher; never holds the cache key (see docs/fleet.md).",
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
    "--write-nar-listing/--no-write-nar-listing", default=None,
    help="A <hash>.ls listing beside each narinfo, as Nix's write-nar-listing "
    "[default: the store URL's write-nar-listing, else no].",
)  # fmt: skip
@click.option(
    "--root", "root_name", default=None, metavar="NAME",
    help="Name of the root this push records for gc (the newest --keep-last roots of each "
    "name are kept) [default: this host's name].",
)  # fmt: skip
@click.option(
    "--upstream", "upstream_urls", multiple=True, metavar="URL",
    help="Cache whose paths are not uploaded (repeatable), e.g. https://cache.nixos.org; "
    "as `run --upstream`.",
)  # fmt: skip
@click.option(
    "--upstream-key", "upstream_keys", multiple=True, metavar="NAME",
    help="Paths signed by this key name are upstream's (repeatable), e.g. cache.nixos.org-1 "
    "(NAME:KEY as in trusted-public-keys, or a public key file, counts by its name).",
)  # fmt: skip
@verbosity
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
def push(
    store_url: str,
    secret_key_file: str | None,
    attest_key_file: str | None,
    compression: str | None,
    compression_level: int | None,
    jobs: int,
    write_nar_listing: bool | None,
    root_name: str | None,
    upstream_urls: tuple[str, ...],
    upstream_keys: tuple[str, ...],
    verbose: int,
    quiet: bool,
    paths: tuple[str, ...],
) -> None:
    """Upload the closure of each PATH to the binary cache now.

    PATH is a store path, a path inside one, or a link to one such as
    ./result.  Paths the cache already has are skipped; a path whose contents
    differ from what the Nix database registered is refused and not signed.
    With --attest-key-file, the paths of the closure this machine built
    itself are staged and attested instead, for `publish` to sign.
    """
    setup_logging(-1 if quiet else verbose)
    try:
        if root_name is not None:
            check_name(root_name, "root")
        check_upstreams(upstream_urls)
        upstream_keys = upstream_key_names(upstream_keys)
        roots = [to_store_path(p) for p in paths]
    except UploaderError as e:
        fail(str(e), EXIT_USAGE)
    # Made only when asked for: it holds a thread pool for its lookups.
    upstreams = Upstreams(upstream_urls, upstream_keys) if upstream_urls or upstream_keys else None
    try:
        # Nix is asked for the closure while the cache is opened (boto3's
        # start-up is a quarter of a second of one core).
        store = NixStore()
        store.prefetch_closure(roots)
        key, attest = None, None
        if attest_key_file is not None:
            refuse_cache_key(secret_key_file, store_url)
            attest = SecretKey.load(attest_key_file)
        else:
            key = SecretKey.load(cli_key_file(secret_key_file, store_url))
        engine = make_engine(
            store_url,
            key,
            attest=attest,
            compression=compression,
            compression_level=compression_level,
            jobs=jobs,
            write_nar_listing=write_nar_listing,
            root=None if attest is not None else (root_name or socket.gethostname()),
            upstreams=upstreams,
            store=store,
        )
    except KeyFileError as e:
        fail(str(e))
    except ConfigError as e:
        # The store URL or an option cannot work: fix the command line.
        fail(str(e), EXIT_USAGE)
    except UploaderError as e:
        fail(str(e))
    method = engine.compression
    log.debug(
        "pushing the closures of %s to %s (%s, %d at once)",
        plural(len(roots), "path"), engine.target.url, method, engine.jobs,
    )  # fmt: skip
    progress = TerminalProgress() if sys.stderr.isatty() and not quiet else None
    try:
        result = run_stoppable(engine.push(roots, progress))
    except UploaderError as e:
        fail(str(e))
    except Terminated:
        result = None
    finally:
        if progress:
            progress.finish()
        engine.close()  # aborts the uploads a stop left under way
    if result is None:
        click.echo(
            "push stopped by SIGTERM; its uploads under way were aborted: run it again to finish",
            err=True,
        )
        sys.exit(EXIT_TERMINATED)
    _report(result, method, quiet, engine)
    if not result.ok:
        sys.exit(EXIT_FAILURE)


def _report(result: PushResult, method: str, quiet: bool, engine: Engine) -> None:
    for path, error in sorted(result.failed.items()):
        text = str(error)
        said = text if text.startswith(f"{path}:") else f"{path}: {text}"
        click.echo(redact.scrub(f"error: {said}"), err=True)
    if quiet and result.ok:
        return
    done = f"{plural(len(result.uploaded), 'path')} ({human_bytes(result.nar_bytes)} NAR, "
    done += f"{human_bytes(result.file_bytes)} {'uncompressed' if method == 'none' else method})"
    upstream = set(result.skipped_upstream)
    if isinstance(engine.recorder, Attester):
        line = f"attested {done}, {len(result.present)} attested before"
        published = upstream & engine.recorder.published
        foreign = upstream & engine.recorder.not_built_here
        upstream -= published | foreign
        if published:
            line += f", {len(published)} published already"
        if foreign:
            line += f", {len(foreign)} not built here (substituted: not attested)"
    else:
        line = f"uploaded {done}, {len(result.present)} already in the cache"
        # A path found there is not looked under: its closure is there too.
        if result.present:
            line += " with its closure" if len(result.present) == 1 else " with their closures"
    if upstream:
        line += f", {len(upstream)} served upstream"
    if result.failed:
        line += f", {len(result.failed)} failed"
    click.echo(line, err=True)
