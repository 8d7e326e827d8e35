"""The publisher: signs what enough builders agree on, references first.

One pass (``Publisher.run_pass``) reads every pending attestation and then:

- paths whose narinfo exists are published already (perhaps by a pass that
  was killed before it tidied up): their narinfo is never touched, their
  record is written if missing, their attestations and staged NARs go;
- disputed paths get a conflict report and are never signed;
- ready paths are published bottom-up, each only once every reference has
  a narinfo in the cache or is served by an upstream: every attestation's
  staged NAR is downloaded and checked (those that differ stop counting and
  are reported), then the checked NAR goes to ``nar/``, then the narinfo
  signed with the cache key, then the record; a kill between any two steps
  leaves the cache closed under references, and the next pass finishes;
- attestations that waited longer than ``expire_after`` are reported, then
  removed with their staged NARs.

The publisher writes ``nix-cache-info`` when the bucket has none (builders
never do).  Its root for gc is written again only when the paths it lists
change, or once an hour (``ROOT_REFRESH``): an idle publisher adds no object
per pass; the mark is read every pass all the same.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from uploader._exceptions import TargetError
from uploader.compression import extension
from uploader.engine import NAR_TYPE, narinfo_key
from uploader.lifecycle.protect import Protection
from uploader.narinfo import NarInfo
from uploader.progress import PATH_EVENTS
from uploader.quorum.attestation import MAX_SIZE as ATTESTATION_MAX
from uploader.quorum.attestation import VERSION, Attestation
from uploader.quorum.bucket import Bucket
from uploader.quorum.layout import (
    ATTESTATIONS,
    CONFLICTS,
    STAGING,
    attestation_key,
    conflict_key,
    is_read_check,
    parse_attestation_key,
    published_key,
)
from uploader.quorum.reports import (
    STATUS_KEY,
    conflict_report,
    describe_claims,
    dump,
    publication_record,
)
from uploader.quorum.staged import StagedMismatch, VerifiedNar, fetch_verified
from uploader.quorum.tally import CONFLICT, READY, Verdict, judge
from uploader.signing import PublicKey, SecretKey
from uploader.storepath import basename, hash_part

__all__ = ["PassResult", "Publisher"]

# The name of the publisher's roots (docs/lifecycle.md).
ROOT_NAME = "quorum-publisher"
# A root listing the same paths is written again after this long, so that
# gc's --keep-days keeps one even with --keep-last 0 (docs/fleet.md).
ROOT_REFRESH = 3600.0

log = logging.getLogger(__name__)
path_log = logging.getLogger(PATH_EVENTS)
_JSON = "application/json"


@dataclass
class PassResult:
    published: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    waiting: dict[str, dict[str, Any]] = field(default_factory=dict)  # by hash part
    conflicts: list[str] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    # Attestation objects this pass deleted (published or expired paths').
    removed: set[str] = field(default_factory=set)

    @property
    def still_rejected(self) -> list[dict[str, str]]:
        """The attestations not counted that are still in the bucket."""
        return [r for r in self.rejected if r["key"] not in self.removed]


@dataclass
class _Path:
    hashpart: str
    found: list[tuple[str, bytes]]
    newest: float
    verdict: Verdict


class Publisher:
    def __init__(
        self,
        bucket: Bucket,
        key: SecretKey,
        builder_keys: Mapping[str, PublicKey],
        *,
        quorum: int,
        trusted: Iterable[str] = (),
        upstream: Callable[[list[str]], set[str]] | None = None,
        tmp_dir: str | None = None,
        expire_after: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bucket = bucket
        self._key = key
        self.keys = dict(builder_keys)
        self.quorum = quorum
        self.trusted = frozenset(trusted)
        self.upstream = upstream
        self.tmp_dir = tmp_dir
        self.expire_after = expire_after
        self.clock = clock
        # Attestations whose staged NAR was found to differ from their claim.
        self.excluded: dict[str, str] = {}
        # What the publisher publishes, and the references it finds in the
        # cache, are a root for gc, written before it trusts them to be there
        # (docs/lifecycle.md); the gc's mark is followed as uploaders do.
        self._guard = Protection(bucket, ROOT_NAME)
        # What the last completed root lists, and when it was written.
        self._root: tuple[frozenset[str], float] | None = None
        self._cache_info_checked = False
        self._removed: set[str] = set()

    def run_pass(self) -> PassResult:
        result = PassResult()
        self._removed = result.removed
        self._ensure_cache_info()
        paths = self._read()
        self._has: dict[str, bool] = {}
        ready = [p.verdict for p in paths.values() if p.verdict.state == READY]
        protect = frozenset(
            {v.store_path for v in ready if v.store_path}
            | {r for v in ready for a in v.support for r in a.references}
        )
        written = self._protect(protect) if ready else None
        in_use = collections.Counter(
            a.nar.url for p in paths.values() for a in _parsed(p.found) if a is not None
        )
        pending: list[_Path] = []
        for p in paths.values():
            result.rejected.extend(r.__dict__ for r in p.verdict.rejected)
            if self._published(p.hashpart, p.verdict.store_path):
                self._tidy(p, in_use, record=True)
                result.already.append(p.verdict.store_path or p.hashpart)
            elif p.verdict.state == CONFLICT:
                self._report_conflict(p.verdict)
                result.conflicts.append(p.verdict.store_path or p.hashpart)
            elif p.verdict.state == READY:
                pending.append(p)
        done = self._publish_bottom_up(pending, in_use, result)
        for p in paths.values():
            if p.hashpart in done or p.hashpart in result.waiting or self._has.get(p.hashpart):
                continue
            if p.verdict.state != CONFLICT:
                claimed = next(
                    (
                        a.store_path
                        for a in _parsed(p.found)
                        if a is not None and hash_part(a.store_path) == p.hashpart
                    ),
                    None,
                )
                result.waiting[p.hashpart] = _waiting(p.verdict, self.quorum, "", claimed)
        self._expire(paths, done, in_use, result)
        self._settle_conflicts({p.hashpart for p in paths.values() if p.verdict.state == CONFLICT})
        self._write_status(result)
        self._guard.complete()
        if written is not None:
            self._root = (protect, written)
        return result

    def _ensure_cache_info(self) -> None:
        """The cache's ``nix-cache-info``, written when missing (builders never do)."""
        if self._cache_info_checked:
            return
        if not self.bucket.exists("nix-cache-info"):
            info = self.bucket.url.cache_info().encode()
            self.bucket.put_bytes("nix-cache-info", info, "text/x-nix-cache-info")
            log.info("wrote nix-cache-info to %s", self.bucket.url)
        self._cache_info_checked = True

    def _protect(self, paths: frozenset[str]) -> float | None:
        """Begin a root listing ``paths`` unless the last complete one lists
        the same and is recent; either way, read the mark.  Returns when the
        new root was begun (None: none was)."""
        now = self.clock()
        if self._root is not None and self._root[0] == paths and now - self._root[1] < ROOT_REFRESH:
            self._guard.reread_mark()
            return None
        self._root = None  # until this one is complete
        self._guard.begin(paths)
        return now

    def _read(self) -> dict[str, _Path]:
        """Every pending attestation, grouped by path and judged."""
        groups: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
        for key, mtime in self.bucket.list_prefix(ATTESTATIONS):
            if is_read_check(key):
                continue  # a builder's own, not an attestation
            parsed = parse_attestation_key(key)
            if parsed is None:
                log.warning("ignoring %s: not an attestation's key", key)
                continue
            groups[parsed[0]].append((key, mtime))
        paths = {}
        for hashpart, objects in sorted(groups.items()):
            found = [
                (k, data) for k, _ in objects if (data := _read_bounded(self.bucket, k)) is not None
            ]
            verdict = self._judge(hashpart, found)
            newest = max(m for _, m in objects)
            paths[hashpart] = _Path(hashpart, found, newest, verdict)
        return paths

    def _judge(self, hashpart: str, found: list[tuple[str, bytes]], **extra: str) -> Verdict:
        excluded = {**self.excluded, **extra}
        return judge(
            hashpart, found, self.keys, quorum=self.quorum, trusted=self.trusted, excluded=excluded
        )

    def _published(self, hashpart: str, store_path: str | None = None) -> bool:
        if hashpart not in self._has:
            present = self._signed_here(hashpart)
            # A gc candidate is asked again (and kept) before it counts.
            if present and store_path is not None and self._guard.gone([store_path]):
                present = False
            self._has[hashpart] = present
        return self._has[hashpart]

    def _signed_here(self, hashpart: str, *, quiet: bool = False) -> bool:
        """Whether the cache has a narinfo for the path that the cache key
        signed.  One it did not sign (written with a builder's or a stolen
        write access) is not taken for published: Nix clients refuse it,
        and it is reported rather than recorded."""
        data = self.bucket.get(f"{hashpart}.narinfo")
        if data is None:
            return False
        public = self._key.public_key()
        try:
            info = NarInfo.parse(data.decode())
            signed = any(public.verify(info.fingerprint(), sig) for sig in info.sigs)
        except (ValueError, UnicodeDecodeError):
            signed = False
        if not signed and not quiet:
            log.warning(
                "%s.narinfo is not signed by the cache key %s: not taken as published, and "
                "never overwritten; delete it to have the publisher publish the path",
                hashpart, public.name,
            )  # fmt: skip
        return signed

    def _publish_bottom_up(
        self, pending: list[_Path], in_use: collections.Counter[str], result: PassResult
    ) -> set[str]:
        """Publish ready paths, each after its references; returns their hash parts."""
        done: set[str] = set()
        progress = True
        while pending and progress:
            progress = False
            for p in list(pending):
                unmet = self._unmet(p.verdict, {q.hashpart for q in pending})
                if unmet is None:
                    continue  # a reference is ready too: after it
                pending.remove(p)
                progress = True
                if unmet:
                    why = f"waiting for its reference {unmet[0]} to be published"
                    result.waiting[p.hashpart] = _waiting(p.verdict, self.quorum, why)
                elif self._publish(p, in_use, result):
                    done.add(p.hashpart)
                    self._has[p.hashpart] = True
        for p in pending:  # a cycle through other paths cannot happen in Nix
            result.waiting[p.hashpart] = _waiting(p.verdict, self.quorum, "reference cycle")
        return done

    def _unmet(self, verdict: Verdict, ready: set[str]) -> list[str] | None:
        """References neither in the cache nor upstream; None while one is ready."""
        path = verdict.store_path
        refs = [r for r in verdict.support[0].references if r != path]
        if any(hash_part(r) in ready for r in refs):
            return None
        missing = [r for r in refs if not self._published(hash_part(r), r)]
        if missing and self.upstream is not None:
            served = self.upstream(missing)
            missing = [r for r in missing if r not in served]
        return missing

    def _publish(self, p: _Path, in_use: collections.Counter[str], result: PassResult) -> bool:
        verdict = p.verdict
        if self.bucket.exists(f"{p.hashpart}.narinfo") and not self._signed_here(
            p.hashpart, quiet=True
        ):
            # Not the cache key's (else it would count as published): never
            # overwritten, never recorded as published (see _signed_here).
            why = "a narinfo the cache key did not sign is in the way: delete it"
            result.waiting[p.hashpart] = _waiting(verdict, self.quorum, why)
            return False
        checked: list[tuple[Attestation, VerifiedNar]] = []
        missing: dict[str, str] = {}
        try:
            for a in sorted(verdict.support, key=lambda a: a.builder):
                key = attestation_key(a.store_path, a.builder)
                try:
                    checked.append((a, fetch_verified(self.bucket, a, self.tmp_dir)))
                except StagedMismatch as e:
                    if e.missing and self._signed_here(p.hashpart, quiet=True):
                        # Another publisher published it meanwhile and
                        # tidied: nothing to reject (docs/fleet.md).
                        log.info("%s: published meanwhile by another pass", a.store_path)
                        result.already.append(a.store_path)
                        return True
                    reason = f"not counted: {e}"
                    log.warning("%s: %s's attestation %s", a.store_path, a.builder, reason)
                    (missing if e.missing else self.excluded)[key] = reason
                    result.rejected.append({"key": key, "builder": a.builder, "reason": reason})
            counted = self._judge(p.hashpart, p.found, **missing)
            if counted.state != READY or not checked:
                why = "staged NARs that differ from their attestations do not count"
                result.waiting[p.hashpart] = _waiting(counted, self.quorum, why)
                return False
            first, nar = checked[0]
            url = f"nar/{nar.file_hash.removeprefix('sha256:')}.nar"
            url += extension(first.nar.compression)
            if not self.bucket.exists(url):
                self.bucket.put_file(url, nar.file.name, nar.file_size, NAR_TYPE)
            self._put_narinfo(first, counted, url, nar)
        finally:
            for _, nar in checked:
                nar.file.close()
        now = self.clock()
        builders = [a for a in counted.support if a.builder in {c.builder for c, _ in checked}]
        record = publication_record(counted, url, builders, now)
        self.bucket.put_bytes(published_key(p.hashpart), dump(record), _JSON)
        path_log.info(
            "published %s (attested by %s)", first.store_path, ", ".join(record["builders"])
        )
        result.published.append(first.store_path)
        self._tidy(p, in_use, record=False)
        return True

    def _put_narinfo(self, a: Attestation, verdict: Verdict, url: str, nar: VerifiedNar) -> None:
        info = NarInfo(
            store_path=a.store_path,
            url=url,
            compression=a.nar.compression,
            file_hash=nar.file_hash,
            file_size=nar.file_size,
            nar_hash=a.nar_hash,
            nar_size=a.nar_size,
            references=tuple(basename(r) for r in a.references),
            deriver=basename(a.deriver) if a.deriver else None,
            ca=verdict.ca,
        )
        signed = NarInfo(**{**info.__dict__, "sigs": (self._key.sign(info.fingerprint()),)})
        key = narinfo_key(a.store_path)
        if self.bucket.exists(key):
            return  # published meanwhile: a published narinfo is never changed
        self.bucket.put_bytes(key, signed.render().encode(), "text/x-nix-narinfo")

    def _tidy(self, p: _Path, in_use: collections.Counter[str], *, record: bool) -> None:
        """Remove a published path's attestations and the staged NARs no other
        attestation names (a NAR can stand for several paths)."""
        attestations = [a for a in _parsed(p.found) if a is not None]
        counted = p.verdict.support
        if record and counted and not self.bucket.exists(published_key(p.hashpart)):
            # The pass that published it was stopped before its record.
            doc = publication_record(p.verdict, "", counted, self.clock())
            self.bucket.put_bytes(published_key(p.hashpart), dump(doc), _JSON)
        self._remove(p, attestations, in_use)
        self.bucket.delete(conflict_key(p.hashpart))

    def _remove(
        self, p: _Path, attestations: list[Attestation], in_use: collections.Counter[str]
    ) -> None:
        for a in attestations:
            in_use[a.nar.url] -= 1
            # Only in the builder's own staging area: an attestation must not
            # make the publisher delete anything else.
            if in_use[a.nar.url] <= 0 and a.nar.url.startswith(f"{STAGING}{a.builder}/"):
                self.bucket.delete(a.nar.url)
        for key, _ in p.found:
            self.bucket.delete(key)
            self._removed.add(key)

    def _settle_conflicts(self, disputed: set[str]) -> None:
        """Remove the conflict reports of paths no longer disputed: a
        builder's key was dropped, or its attestations expired.  `quorum
        status` reads the reports; they say what this pass found."""
        for key, _ in self.bucket.list_prefix(CONFLICTS):
            hashpart = key.removeprefix(CONFLICTS).removesuffix(".json")
            if key == conflict_key(hashpart) and hashpart not in disputed:
                self.bucket.delete(key)
                log.info("no longer disputed: %s (its conflict report is removed)", hashpart)

    def _report_conflict(self, verdict: Verdict) -> None:
        key = conflict_key(verdict.hashpart)
        doc = conflict_report(verdict, self.clock())
        old = self.bucket.get(key)
        if old is not None and _same_claims(old, doc):
            return
        self.bucket.put_bytes(key, dump(doc), _JSON)
        claims = "; ".join(describe_claims(doc))
        log.warning("CONFLICT %s: builders disagree: %s; not signed", verdict.store_path, claims)

    def _expire(
        self,
        paths: dict[str, _Path],
        done: set[str],
        in_use: collections.Counter[str],
        result: PassResult,
    ) -> None:
        if self.expire_after is None:
            return
        limit = self.clock() - self.expire_after
        for p in paths.values():
            if p.hashpart in done or self._has.get(p.hashpart) or p.newest > limit:
                continue
            name = p.verdict.store_path or p.hashpart
            builders = sorted({k.rsplit("/", 1)[-1].removesuffix(".json") for k, _ in p.found})
            log.warning(
                "expiring %s: attested by %s, never published; removing its attestations",
                name,
                ", ".join(builders) or "nobody",
            )
            self._remove(p, [a for a in _parsed(p.found) if a is not None], in_use)
            result.waiting.pop(p.hashpart, None)
            result.expired.append(name)

    def _write_status(self, result: PassResult) -> None:
        doc = {
            "version": VERSION,
            "updatedAt": int(self.clock()),
            "quorum": self.quorum,
            "builders": sorted(self.keys),
            "trusted": sorted(self.trusted),
            "waiting": sorted(result.waiting.values(), key=lambda w: w["storePath"]),
            "conflicts": sorted(result.conflicts),
            "rejected": result.still_rejected,
            "expired": result.expired,
            "published": result.published,
        }
        self.bucket.put_bytes(STATUS_KEY, dump(doc), _JSON)


def _read_bounded(bucket: Bucket, key: str) -> bytes | None:
    """An attestation's bytes, but never more than one past the largest an
    attestation may be: a builder may write anything below its name, and a
    pass holds every attestation it read."""
    stream = bucket.open_object(key)
    if stream is None:
        return None
    with stream:
        try:
            return stream.read(ATTESTATION_MAX + 1)
        except Exception as e:  # botocore's read errors have no common base
            raise TargetError(f"reading {key}: {type(e).__name__}: {e}") from e


def _parsed(found: list[tuple[str, bytes]]) -> list[Attestation | None]:
    out: list[Attestation | None] = []
    for _, data in found:
        try:
            out.append(Attestation.parse(data))
        except ValueError:
            out.append(None)
    return out


def _waiting(verdict: Verdict, quorum: int, why: str, claimed: str | None = None) -> dict[str, Any]:
    """A waiting path as status.json and `quorum status` show it; ``claimed``
    names it when no attestation counted (an unparsable or untrusted one's
    claim, shown only as a name)."""
    builders = sorted(a.builder for a in verdict.support)
    needed = verdict.needed or quorum
    if not why and not builders:
        why = "no attestation counts (see the ones not counted)"
    elif not why:
        more = needed - len(builders)
        why = f"needs {more} more builder{'s' if more != 1 else ''} to build and attest it"
    return {
        "storePath": verdict.store_path or claimed or verdict.hashpart,
        "have": len(builders),
        "needed": needed,
        "builders": builders,
        "why": why,
    }


def _same_claims(old: bytes, doc: dict[str, Any]) -> bool:
    try:
        return bool(json.loads(old).get("claims") == doc["claims"])
    except ValueError:
        return False
