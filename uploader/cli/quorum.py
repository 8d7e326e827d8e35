"""The publisher of a fleet with a quorum: `publish` and `quorum status`."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any

import click

from uploader._exceptions import ConfigError, KeyFileError, UploaderError
from uploader.cli._common import EXIT_USAGE, Span, fail, main, setup_logging, verbosity
from uploader.cli._common import secret_key_file as cache_key_file
from uploader.config import check_upstreams
from uploader.progress import plural
from uploader.quorum import PassResult, Publisher, check_builder_name, open_bucket, quorum_status
from uploader.quorum.metrics import PublisherMetrics
from uploader.quorum.reports import describe_claims
from uploader.signing import PublicKey, SecretKey
from uploader.store import PathInfo
from uploader.upstream import Upstreams

log = logging.getLogger("nix-cache-uploader")


def _builder_keys(values: tuple[str, ...], trusted: tuple[str, ...]) -> dict[str, PublicKey]:
    """``NAME:KEY`` (or a public key file) per --builder-key, by builder name."""
    keys: dict[str, PublicKey] = {}
    for value in values:
        try:
            key = PublicKey.load(value) if os.path.isfile(value) else PublicKey.parse(value)
        except (KeyFileError, ValueError) as e:
            raise ConfigError(f"--builder-key {value}: {e}") from None
        check_builder_name(key.name)
        if key.name in keys:
            raise ConfigError(f"--builder-key: two keys named {key.name}")
        same = next((name for name, k in keys.items() if k.raw == key.raw), None)
        if same is not None:
            # One machine's attestations would count twice toward the quorum.
            raise ConfigError(
                f"--builder-key: {same} and {key.name} are the same key; each builder "
                "needs a key of its own"
            )
        keys[key.name] = key
    for name in trusted:
        if name not in keys:
            raise ConfigError(f"--trusted-builder {name} has no --builder-key")
    return keys


@main.command()
@click.option("--to", "store_url", required=True, metavar="STORE_URL", help="The fleet's bucket.")
@click.option(
    "--secret-key-file", default=None, metavar="FILE",
    help="The cache key, which signs narinfos [default: the URL's secret-key=].",
)  # fmt: skip
@click.option(
    "--quorum", type=click.IntRange(1), required=True, metavar="N",
    help="Distinct builders that must agree on a path before it is signed.",
)  # fmt: skip
@click.option(
    "--builder-key", "builder_keys", multiple=True, required=True, metavar="NAME:KEY",
    help="A builder's public key, or a file holding it (repeatable).",
)  # fmt: skip
@click.option(
    "--trusted-builder", "trusted", multiple=True, metavar="NAME",
    help="A builder whose attestation alone suffices (repeatable).",
)  # fmt: skip
@click.option(
    "--upstream", multiple=True, metavar="URL",
    help="A cache whose paths count as published references (repeatable).",
)  # fmt: skip
@click.option("--once", is_flag=True, help="One pass, then exit (for a timer or a test).")
@click.option(
    "--interval", type=Span("seconds"), default=30.0, show_default=True,
    metavar="SECONDS", help="Pause between passes (seconds, or a duration such as 5m).",
)  # fmt: skip
@click.option(
    "--expire-days", type=Span("days"), default=14.0, show_default=True, metavar="DAYS",
    help="Attestations that waited this long without a quorum are reported, then removed "
    "(days, or a duration such as 36h).",
)  # fmt: skip
@click.option("--tmp-dir", default=None, metavar="DIR", help="Where staged NARs are checked.")
@click.option(
    "--metrics", default=None, metavar="[HOST:]PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (host defaults to 127.0.0.1).",
)  # fmt: skip
@verbosity
def publish(
    store_url: str,
    secret_key_file: str | None,
    quorum: int,
    builder_keys: tuple[str, ...],
    trusted: tuple[str, ...],
    upstream: tuple[str, ...],
    once: bool,
    interval: float,
    expire_days: float,
    tmp_dir: str | None,
    metrics: str | None,
    verbose: int,
    quiet: bool,
) -> None:
    """Sign what enough builders agree on, for a fleet that trusts no single builder.

    Builders run `push`/`run` with --attest-key-file.  A path is signed with
    the cache key when --quorum N of the --builder-key keys attest the same
    NarHash, NarSize and references (or one --trusted-builder does, or its
    content address gives its name), after its references, once its staged
    NAR is checked.  Disagreements are reported in quorum/v1/conflicts/ and
    never signed.  See docs/fleet.md.
    """
    setup_logging(-1 if quiet else verbose, service=True)
    if interval < 0.1:
        fail(f"--interval {interval:g}: give at least 0.1 seconds between passes", EXIT_USAGE)
    try:
        keys = _builder_keys(builder_keys, trusted)
    except UploaderError as e:
        fail(str(e), EXIT_USAGE)  # the command line's keys
    try:
        if quorum > len(keys) and not trusted:
            fail(
                f"--quorum {quorum} can never be reached with {plural(len(keys), 'builder key')}: "
                "give at least as many --builder-key keys",
                EXIT_USAGE,
            )
        cache_key = SecretKey.load(cache_key_file(secret_key_file, store_url))
        _check_separate(cache_key.public_key(), keys)
        publisher = Publisher(
            open_bucket(store_url),
            cache_key,
            keys,
            quorum=quorum,
            trusted=trusted,
            upstream=_upstream(upstream),
            tmp_dir=tmp_dir,
            expire_after=expire_days * 86400,
        )
    except UploaderError as e:
        fail(str(e))
    gauges = None
    if metrics:
        try:
            gauges = PublisherMetrics()
            host, port = gauges.serve(metrics)
        except UploaderError as e:
            fail(str(e))
        log.info("serving metrics at http://%s:%d/metrics", host, port)
    if once:
        try:
            result = _timed_pass(publisher, gauges)
        except UploaderError as e:
            fail(str(e))
        if not quiet:
            click.echo(_summary(result), err=True)
        return
    _serve(publisher, interval, gauges)


def _check_separate(cache: PublicKey, keys: dict[str, PublicKey]) -> None:
    """Exit (usage) when the cache key is also a builder's: a builder holding
    it could sign narinfos alone, and a builder's attestation signed with it
    would be counted."""
    for name, key in keys.items():
        if key.raw == cache.raw:
            fail(
                f"--builder-key {name} is the cache key's public key: a builder never "
                "holds the cache key (give each builder its own key)",
                EXIT_USAGE,
            )
        if name == cache.name:
            fail(
                f"--builder-key {name} has the cache key's name: builder keys and the "
                "cache key need different names",
                EXIT_USAGE,
            )


def _timed_pass(publisher: Publisher, gauges: PublisherMetrics | None) -> PassResult:
    started = time.monotonic()
    try:
        result = publisher.run_pass()
    except (UploaderError, OSError) as e:
        if gauges is not None:
            gauges.failed()
        if isinstance(e, OSError):  # the machine's (a full disk): the pass is retried
            raise UploaderError(f"{e.strerror or e}: {e.filename or 'a local file'}") from e
        raise
    if gauges is not None:
        gauges.record(result, time.monotonic() - started)
    return result


def _upstream(urls: tuple[str, ...]) -> Any:
    if not urls:
        return None
    check_upstreams(urls)
    upstreams = Upstreams(urls)
    # Only the URLs are asked (a HEAD of the narinfo); the rest is unused.
    return lambda paths: upstreams.served([PathInfo(p, "", 0, ()) for p in paths])


def _summary(result: PassResult) -> str:
    line = f"published {plural(len(result.published), 'path')}"
    line += f", {len(result.waiting)} waiting, {plural(len(result.conflicts), 'conflict')}"
    if result.rejected:
        line += f", {plural(len(result.rejected), 'attestation')} not counted"
    if result.expired:
        line += f", {len(result.expired)} expired"
    return line


def _serve(publisher: Publisher, interval: float, gauges: PublisherMetrics | None) -> None:
    """Passes until SIGTERM or SIGINT; a failed pass is logged and retried."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("publishing to %s every %gs", publisher.bucket.url, interval)
    while not stop.is_set():
        started = time.monotonic()
        try:
            result = _timed_pass(publisher, gauges)
            if result.published or result.conflicts or result.expired:
                log.info("%s", _summary(result))
        except UploaderError as e:
            log.error("pass failed, retrying in %gs: %s", interval, e)
        stop.wait(max(0.0, interval - (time.monotonic() - started)))
    log.info("stopped")


@main.group()
def quorum() -> None:
    """Inspect a fleet's quorum: what waits, what is disputed, what was published."""


@quorum.command("status")
@click.option("--to", "store_url", required=True, metavar="STORE_URL", help="The fleet's bucket.")
@click.option(
    "--quorum", "needed", type=click.IntRange(1), default=None, metavar="N",
    help="Attestations needed [default: the publisher's, from its last pass].",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(store_url: str, needed: int | None, as_json: bool) -> None:
    """Waiting paths (attestations of N, and why), conflicts and recent publications."""
    try:
        report = quorum_status(open_bucket(store_url), needed)
    except UploaderError as e:
        fail(str(e))
    if as_json:
        click.echo(json.dumps(report, indent=1, sort_keys=True))
        return
    n = report["quorum"] or "?"
    click.echo(f"waiting: {len(report['waiting'])}")
    for w in report["waiting"]:
        click.echo(f"  {w['storePath']}: {w['attestations']} of {w['needed'] or n} ({w['why']})")
    click.echo(f"conflicts: {len(report['conflicts'])}")
    for c in report["conflicts"]:
        click.echo(f"  {c['storePath']}: {'; '.join(describe_claims(c))}")
    if report["rejected"]:
        click.echo(f"not counted: {len(report['rejected'])}")
        for r in report["rejected"]:
            click.echo(f"  {r['key']}: {r['reason']}")
    click.echo(f"recently published: {len(report['recentlyPublished'])}")
    for p in report["recentlyPublished"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p["publishedAt"] or 0))
        click.echo(f"  {when} {p['storePath']} ({', '.join(p['builders'] or [])})")
