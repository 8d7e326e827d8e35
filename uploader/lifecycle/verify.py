"""`verify`: does the cache hold what its narinfos promise a Nix client?

For every narinfo: it parses; a signature verifies with one of the given
keys (without keys: each ``Sig`` is well-formed); the NAR its URL names
exists and has FileSize bytes; every reference has a narinfo here or in an
upstream cache.  With ``deep``, every NAR is downloaded and its FileHash,
and its NarHash and NarSize once decompressed, are recomputed.  NARs that
no narinfo names are orphans: waste, not damage.

The narinfos are listed before the NARs, so a push running meanwhile (NAR
first, narinfo last) cannot make a narinfo look as if its NAR were missing.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from uploader._exceptions import UploaderError
from uploader.lifecycle.deep import check_nar
from uploader.lifecycle.listing import (
    PathRecord,
    fetch_narinfos,
    list_narinfos,
    list_nars,
    narinfo_key,
    to_record,
)
from uploader.lifecycle.report import Problem, Report
from uploader.lifecycle.roots import Pin, list_pins
from uploader.lifecycle.upstream import served_upstream, signature_problem
from uploader.narinfo import NarInfo
from uploader.signing import PublicKey
from uploader.storepath import HASH_LENGTH, STORE_DIR
from uploader.targets import Target

__all__ = ["Progress", "VerifyOptions", "verify"]

log = logging.getLogger(__name__)


class Progress(Protocol):
    """A progress display, made by the caller for each phase (``label``)."""

    def start(self, total_paths: int, total_bytes: int) -> None: ...

    def step(self, items: int, nbytes: int) -> None: ...

    def finish(self) -> None: ...


@dataclass(frozen=True)
class VerifyOptions:
    keys: tuple[PublicKey, ...] = ()
    upstream_urls: tuple[str, ...] = ()
    upstream_keys: tuple[PublicKey, ...] = ()
    deep: bool = False
    jobs: int = 32  # narinfo GETs at once
    deep_jobs: int = 4  # NAR downloads at once


def verify(
    target: Target,
    options: VerifyOptions,
    progress: Callable[[str], Progress] | None = None,
) -> Report:
    """Check the whole cache; ``progress(label)`` makes a display per phase.
    Raises TargetError when the cache cannot be listed or read."""
    report = Report(str(target.url), options.deep, bool(options.keys or options.upstream_keys))
    hashes = list_narinfos(target)
    report.narinfos = len(hashes)
    keys = (*options.keys, *options.upstream_keys)
    records: dict[str, PathRecord] = {}
    missing: dict[str, list[str]] = defaultdict(list)  # reference -> referrers
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="list-nars") as lister:
        # Listed after the narinfos, beside their fetches (see the docstring).
        nars_future = lister.submit(list_nars, target)
        shown = progress("narinfos") if progress else None
        if shown:
            shown.start(len(hashes), 0)
        for hash_part, data in fetch_narinfos(target, sorted(hashes), jobs=options.jobs):
            if shown:
                shown.step(1, 0)
            if data is None:
                continue  # deleted since it was listed
            record = _check_narinfo(hash_part, data, keys, report)
            if record is None:
                continue
            records[hash_part] = record
            for ref in record.references:
                if ref[:HASH_LENGTH] not in hashes:
                    missing[ref].append(record.name)
        nars = nars_future.result()
        if shown:
            shown.finish()
    report.nars = len(nars)
    report.nar_bytes = sum(nars.values())
    # A pin promises its paths stay substitutable: one gone is damage too.
    for pin in _pins(target):
        for name in pin.paths:
            if name[:HASH_LENGTH] not in hashes:
                missing[name].append(f"pin {pin.name!r}")
    for hash_part, record in sorted(records.items()):
        _check_nar_object(hash_part, record, nars, report)
    _check_references(target, missing, options, report)
    named = {r.url for r in records.values()}
    report.orphans = {k: n for k, n in nars.items() if k not in named}
    if options.deep:
        _deep(target, records, nars, options, report, progress("NARs") if progress else None)
    return report


def _check_narinfo(
    hash_part: str, data: bytes, keys: tuple[PublicKey, ...], report: Report
) -> PathRecord | None:
    key = narinfo_key(hash_part)
    try:
        info = NarInfo.parse(data.decode())
        if not info.store_path.startswith(f"{STORE_DIR}/{hash_part}-"):
            raise ValueError(f"its StorePath {info.store_path} is not the path {key} is for")
    except (ValueError, UnicodeDecodeError) as e:
        path = _store_path_line(data, hash_part)
        report.problems.append(Problem("unreadable-narinfo", key, path, str(e)))
        return None
    bad_signature = signature_problem(info, keys)
    if bad_signature:
        report.problems.append(Problem("bad-signature", key, info.store_path, bad_signature))
    return to_record(info)


def _store_path_line(data: bytes, hash_part: str) -> str | None:
    """The store path an unreadable narinfo is for, if its StorePath line
    says so (then --repair can upload it again)."""
    for line in data.decode(errors="replace").splitlines():
        path = line.removeprefix("StorePath: ").strip()
        if line.startswith("StorePath: ") and path.startswith(f"{STORE_DIR}/{hash_part}-"):
            return path
    return None


def _check_nar_object(
    hash_part: str, record: PathRecord, nars: dict[str, int], report: Report
) -> None:
    path = f"{STORE_DIR}/{record.name}"
    size = nars.get(record.url)
    if size is None:
        report.problems.append(
            Problem(
                "missing-nar", narinfo_key(hash_part), path, f"{record.url} is not in the cache"
            )
        )
    elif record.file_size is not None and size != record.file_size:
        report.problems.append(
            Problem(
                "wrong-nar-size",
                narinfo_key(hash_part),
                path,
                f"{record.url} has {size} bytes, FileSize says {record.file_size}",
            )
        )


def _pins(target: Target) -> list[Pin]:
    """The pins, or none when they cannot be read (verify reads caches of
    newer layouts too; gc and `pin list` say what is wrong with them)."""
    try:
        return list_pins(target)
    except UploaderError as e:
        log.warning("pins not checked: %s", e)
        return []


def _check_references(
    target: Target, missing: dict[str, list[str]], options: VerifyOptions, report: Report
) -> None:
    # Asked again one by one: a push running meanwhile may have added them
    # after the listing passed their place.
    refs = sorted(missing)
    with ThreadPoolExecutor(max_workers=options.jobs, thread_name_prefix="recheck") as pool:
        there = pool.map(lambda r: target.exists(narinfo_key(r[:HASH_LENGTH])), refs)
        absent = [r for r, present in zip(refs, there, strict=True) if not present]
    served = served_upstream(options.upstream_urls, options.upstream_keys, absent, options.jobs)
    report.upstream_references = len(served)
    for ref in absent:
        if ref in served:
            continue
        referrers = sorted(missing[ref])
        more = f" and {len(referrers) - 3} more" if len(referrers) > 3 else ""
        report.problems.append(
            Problem(
                "missing-reference",
                narinfo_key(ref[:HASH_LENGTH]),
                f"{STORE_DIR}/{ref}",
                f"referenced by {', '.join(referrers[:3])}{more}",
            )
        )


def _deep(
    target: Target,
    records: dict[str, PathRecord],
    nars: dict[str, int],
    options: VerifyOptions,
    report: Report,
    progress: Progress | None,
) -> None:
    """Download each NAR once (narinfos naming the same NAR with the same
    claims share the check) and report every narinfo it fails.  Progress
    counts the bytes of each object as listed (a narinfo may omit
    FileSize)."""
    damaged = {p.key for p in report.problems if p.kind in ("missing-nar", "wrong-nar-size")}
    claims: dict[tuple[object, ...], list[str]] = defaultdict(list)
    for hash_part, r in sorted(records.items()):
        if narinfo_key(hash_part) not in damaged:
            claim = (r.url, r.compression, r.file_hash, r.file_size, r.nar_hash, r.nar_size)
            claims[claim].append(hash_part)
    checked = [(records[hash_parts[0]], hash_parts) for hash_parts in claims.values()]
    if progress:
        progress.start(len(checked), sum(nars.get(r.url, 0) for r, _ in checked))
    with ThreadPoolExecutor(max_workers=options.deep_jobs, thread_name_prefix="deep") as pool:
        outcomes = pool.map(lambda item: check_nar(target, item[0]), checked)
        for (record, hash_parts), outcome in zip(checked, outcomes, strict=True):
            if progress:
                progress.step(1, nars.get(record.url, 0))
            if outcome is None:
                continue
            for hash_part in hash_parts:
                name = records[hash_part].name
                report.problems.append(
                    Problem("corrupt-nar", narinfo_key(hash_part), f"{STORE_DIR}/{name}", outcome)
                )
    if progress:
        progress.finish()
