"""Attest mode: what a builder writes instead of narinfos.

The engine streams, hashes, compresses and verifies each NAR against the Nix
database as always; this recorder then stages it under the builder's name
and writes the builder's attestation.  Only paths the machine built itself
are attested: a substituted path (not ``ultimate`` in the Nix database) was
built by someone else, a path an upstream serves needs no quorum, and a path
the cache has published is done.  The engine walks no further below them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from uploader.engine import StoredNar, narinfo_key
from uploader.quorum.attestation import Attestation, StagedNar
from uploader.quorum.layout import attestation_key, check_builder_name, staging_key
from uploader.signing import SecretKey
from uploader.store import PathInfo
from uploader.targets import Target

__all__ = ["Attester"]

log = logging.getLogger(__name__)


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
        foreign = {i.path for i in infos if not i.ultimate and i.path not in skipped}
        rest = [i.path for i in infos if i.path not in skipped | foreign]
        published = {p for p in rest if self.target.exists(narinfo_key(p))}
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
        key = self.done_key(info.path)
        existing = self.target.get(key)
        if existing is not None:
            try:
                first = Attestation.parse(existing)
            except ValueError:
                first = None
            if first is None or first.claim != attestation.claim:
                log.warning(
                    "%s: %s attested it before with another result; keeping the first "
                    "(this build is not reproducible, or the first attestation was altered)",
                    info.path,
                    self.builder,
                )
            return
        self.target.put_bytes(key, attestation.to_json(), "application/json")
        log.info("attested %s as %s (%d bytes NAR)", info.path, self.builder, info.nar_size)
