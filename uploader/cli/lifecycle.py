"""The bucket's lifecycle: `verify` (and `--repair`)."""

from __future__ import annotations

import json
import sys

import click

from uploader._exceptions import ConfigError, UploaderError
from uploader.cli._common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Terminated,
    fail,
    main,
    make_engine,
    run_stoppable,
    setup_logging,
    upstream_checks,
    verbosity,
)
from uploader.cli._common import secret_key_file as key_file_for
from uploader.config import check_upstreams
from uploader.lifecycle import KINDS, RepairResult, Report, VerifyOptions, repair, verify
from uploader.progress import TerminalProgress, human_bytes, plural
from uploader.signing import PublicKey, SecretKey
from uploader.store import NixStore
from uploader.targets import open_target

_KINDS_HELP = "\n".join(f"  {kind}: {meaning}" for kind, meaning in KINDS.items())


def _public_key(value: str) -> PublicKey:
    """NAME:BASE64 as in trusted-public-keys, or a public key file."""
    return PublicKey.from_argument(value)


@main.command(
    "verify",
    epilog="\b\nKinds of damage (each line of the report starts with one):\n"
    + _KINDS_HELP
    + "\n\nA reference missing here is not damage when an --upstream serves it.  Exit "
    "status: 0 clean (or every damaged path repaired), 1 damaged (or the cache could not "
    "be read), 2 usage error.  See docs/lifecycle.md.",
)
@click.option(
    "--to", "store_url", required=True, metavar="STORE_URL",
    help="Binary cache to check: s3://BUCKET?… or file:///DIR.",
)  # fmt: skip
@click.option(
    "--public-key", "public_keys", multiple=True, metavar="NAME:KEY",
    help="Key whose signature makes a narinfo valid (repeatable; NAME:BASE64 as in "
    "trusted-public-keys, or a key file).  Without any, signatures are only checked "
    "to be well-formed.",
)  # fmt: skip
@upstream_checks
@click.option("--deep", is_flag=True, help="Download every NAR and check its hashes and sizes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option(
    "--repair", "do_repair", is_flag=True,
    help="Upload again, from the local Nix store, every damaged or missing path valid there.",
)  # fmt: skip
@click.option(
    "--secret-key-file", type=click.Path(dir_okay=False), default=None,
    help="Signing key for --repair.",
)  # fmt: skip
@click.option(
    "-j", "--jobs", type=click.IntRange(1, 256), default=32, show_default=True,
    help="Narinfos read at once.",
)  # fmt: skip
@verbosity
def verify_command(
    store_url: str,
    public_keys: tuple[str, ...],
    upstreams: tuple[str, ...],
    upstream_keys: tuple[str, ...],
    deep: bool,
    as_json: bool,
    do_repair: bool,
    secret_key_file: str | None,
    jobs: int,
    verbose: int,
    quiet: bool,
) -> None:
    """Check that the cache holds what its narinfos promise a Nix client.

    Every narinfo must parse, carry a signature by one of the --public-key
    keys, name a NAR that exists with FileSize bytes, and have every
    reference in this cache or an --upstream.  --deep also downloads every
    NAR and checks FileHash, and NarHash and NarSize once decompressed.
    NARs that no narinfo names are listed as orphans (wasted bytes, not
    damage).  The cache is only read, unless --repair is given.
    """
    setup_logging(-1 if quiet else verbose)
    try:
        if do_repair:
            # As push takes it: the flag, else the store URL's secret-key=.
            secret_key_file = key_file_for(secret_key_file, store_url)
        keys = tuple(_public_key(k) for k in public_keys)
        check_upstreams(upstreams)
        options = VerifyOptions(
            keys=keys,
            upstream_urls=upstreams,
            upstream_keys=tuple(_public_key(k) for k in upstream_keys),
            deep=deep,
            jobs=jobs,
        )
        secret = SecretKey.load(secret_key_file) if do_repair and secret_key_file else None
        if secret is not None and keys and secret.public_key() not in keys:
            raise ConfigError(
                f"the key in {secret_key_file} ({secret.name}) is not among --public-key: "
                "what --repair signs would not verify"
            )
        # The narinfo fetches, the NAR listing beside them, and a spare.
        target = open_target(store_url, max_connections=jobs + 2)
    except UploaderError as e:
        fail(str(e), EXIT_USAGE)
    show = sys.stderr.isatty() and not quiet and not as_json
    try:
        report = verify(
            target, options, (lambda label: TerminalProgress(label=label)) if show else None
        )
        repaired = _repair(report, store_url, secret) if secret and not report.clean else None
    except UploaderError as e:
        fail(str(e))
    if as_json:
        out = report.to_json()
        out["repair"] = repaired.to_json() if repaired else None
        click.echo(json.dumps(out, indent=2))
    else:
        _print(report, repaired, quiet)
    healthy = report.clean or (repaired is not None and repaired.complete)
    sys.exit(EXIT_OK if healthy else EXIT_FAILURE)


def _repair(report: Report, store_url: str, key: SecretKey) -> RepairResult:
    store = NixStore()
    engine = make_engine(
        store_url, key, compression=None, compression_level=None, jobs=4, store=store
    )
    try:
        return repair(report, engine, store, run_stoppable)
    except Terminated:
        click.echo("verify --repair stopped by SIGTERM; its uploads under way were aborted: "
                   "run it again to finish", err=True)  # fmt: skip
        sys.exit(EXIT_TERMINATED)
    finally:
        engine.close()  # aborts the uploads a stop left under way


def _print(report: Report, repaired: RepairResult | None, quiet: bool) -> None:
    for p in report.problems:
        click.echo(f"{p.kind} {p.store_path or p.key}: {p.detail}")
    if not quiet:
        for key, size in sorted(report.orphans.items()):
            click.echo(f"orphan {key}: {size} bytes")
    if repaired is not None:
        for path in repaired.repaired:
            click.echo(f"repaired {path}")
        for subject, reason in sorted(repaired.not_repaired.items()):
            click.echo(f"not repaired {subject}: {reason}")
    if quiet and report.clean:
        return
    counts = ", ".join(f"{n} {kind}" for kind, n in report.counts().items() if n)
    signatures = "signatures checked" if report.signatures_checked else "signatures unchecked"
    line = (
        f"{plural(report.narinfos, 'narinfo')} ({signatures}), {plural(report.nars, 'NAR')} "
        f"({human_bytes(report.nar_bytes)}){', deep' if report.deep else ''}: "
        + (f"{plural(len(report.problems), 'problem')} ({counts})" if counts else "clean")
    )
    if report.orphans:
        orphans = plural(len(report.orphans), "orphan NAR")
        line += f"; {orphans} ({human_bytes(sum(report.orphans.values()))})"
    if report.upstream_references:
        line += f"; {plural(report.upstream_references, 'reference')} served upstream"
    if repaired is not None:
        line += f"; repaired {len(repaired.repaired)}, not repaired {len(repaired.not_repaired)}"
    click.echo(line, err=True)
