"""Attest mode: what a builder writes instead of narinfos.

The engine streams, hashes, compresses and verifies each NAR against the Nix
database as always; this recorder then stages it under the builder's name
and writes the builder's attestation.  Only paths the machine built itself
are attested: a substituted path (not ``ultimate`` in the Nix database) was
built by someone else, a path an upstream serves needs no quorum, and a path
the cache has published is done.  The engine walks no further below them.
A content-addressed path whose address gives its name is attested however
it came here (``nix-store --add``, a source a derivation refers to: Nix 2.8
does not mark those ``ultimate``): its name proves its content, whoever
made it.

Attestations are write-once, which needs the builder to read its own: before
its first attestation it checks that it can read back an object of its own
(``read_check_key``), since S3 answers a read it forbids like a missing
object, and a forbidden read taken for "absent" would overwrite the first
attestation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from uploader._exceptions import TargetError
from uploader.engine import StoredNar, narinfo_key
from uploader.progress import PATH_EVENTS
from uploader.quorum.attestation import VERSION, Attestation, Claim, StagedNar
from uploader.quorum.ca import ca_gives_path
from uploader.quorum.layout import (
    attestation_key,
    check_builder_name,
    read_check_key,
    staging_key,
)
from uploader.signing import SecretKey
from uploader.store import PathInfo
from uploader.targets import Target

__all__ = ["Attester"]

log = logging.getLogger(__name__)
path_log = logging.getLogger(PATH_EVENTS)


class Attester:
    """The engine's recorder for a builder holding ``key`` (never the cache key)."""

    def __init__(
        self,
        target: Target,
        key: SecretKey,
        *,
        upstream: Callable[[list[PathInfo]], set[str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.builder = check_builder_name(key.name)
        self.target = target
        self._key = key
        self._upstream = upstream
        self._clock = clock
        self._lock = threading.Lock()
        self._reads_checked = False
        # What the last pushes left out, and why (for the summary).
        self.not_built_here: set[str] = set()
        self.published: set[str] = set()

    def done_key(self, path: str) -> str:
        return attestation_key(path, self.builder)

    def nar_key(self, file_hash: bytes, extension: str) -> str:
        return staging_key(self.builder, file_hash, extension)

    def skip(self, infos: list[PathInfo]) -> set[str]:
        """The paths among ``infos`` this builder does not attest (the
        engine's upstream check, in attest mode)."""
        skipped = self._upstream(infos) if self._upstream else set()
        foreign = {i.path for i in infos if not _made_here(i) and i.path not in skipped}
        rest = [i.path for i in infos if i.path not in skipped | foreign]
        published = {p for p in rest if self.target.exists(narinfo_key(p))}
        if len(rest) > len(published):
            self.check_reads()  # before anything is staged
        with self._lock:
            self.not_built_here |= foreign
            self.published |= published
        return skipped | foreign | published

    def record(self, info: PathInfo, nar: StoredNar) -> None:
        """Write this builder's attestation of ``info``, once: a second
        attestation of the same result writes nothing, and a different result
        later (a non-reproducible build) does not replace the first."""
        attestation = Attestation(
            builder=self.builder,
            store_path=info.path,
            nar_hash=info.nar_hash,
            nar_size=info.nar_size,
            references=info.references,
            deriver=info.deriver,
            ca=info.ca,
            nar=StagedNar(nar.url, nar.compression, nar.file_hash, nar.file_size),
            attested_at=int(self._clock()),
        ).signed(self._key)
        self.check_reads()
        key = self.done_key(info.path)
        existing = self.target.get(key)
        if existing is not None:
            self._differs(info, existing)
            return
        self.target.put_bytes(key, attestation.to_json(), "application/json")
        path_log.info("attested %s as %s (%d bytes NAR)", info.path, self.builder, info.nar_size)

    def rebuilt_differently(self, infos: list[PathInfo]) -> set[str]:
        """Those of ``infos`` this builder built again whose result is not
        what it attested first (each is warned about; the first stays).
        The daemon asks for outputs it finds attested already: Nix built
        them again, after a garbage collection or with ``--check``."""
        return {
            info.path
            for info in infos
            if info.ultimate
            and (existing := self.target.get(self.done_key(info.path))) is not None
            and self._differs(info, existing)
        }

    def _differs(self, info: PathInfo, existing: bytes) -> bool:
        try:
            first: Claim | None = Attestation.parse(existing).claim
        except ValueError:
            first = None
        if first == Claim(info.nar_hash, info.nar_size, info.references):
            return False
        log.warning(
            "%s: %s attested it before with another result; keeping the first "
            "(this build is not reproducible, or the first attestation was altered)",
            info.path,
            self.builder,
        )
        return True

    def check_reads(self) -> None:
        """Raise TargetError unless this builder can read its own attestations
        (checked once: an object of its own is read, else written and read back)."""
        with self._lock:
            if self._reads_checked:
                return
            key = read_check_key(self.builder)
            if self.target.get(key) is None:
                doc = f'{{"version": {VERSION}, "builder": "{self.builder}"}}\n'
                self.target.put_bytes(key, doc.encode(), "application/json")
                if self.target.get(key) is None:
                    raise TargetError(
                        f"{self.target.url.redacted()}: {self.builder} cannot read back {key}, "
                        "which it just wrote: its credentials need read access (s3:GetObject) "
                        f"to quorum/v1/attestations/*/{self.builder}.json, or it could "
                        "overwrite its own attestations; nothing attested (docs/fleet.md)"
                    )
            self._reads_checked = True


def _made_here(info: PathInfo) -> bool:
    """Built here (``ultimate``), or content-addressed: a path whose content
    address gives its name is the same whoever made it."""
    if info.ultimate:
        return True
    return info.ca is not None and ca_gives_path(info.path, info.ca, info.references)
