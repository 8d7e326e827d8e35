"""The upload engine shared by `push` and the daemon.

For a set of store paths it takes their closure, skips what the cache (or an
upstream cache) already has, and uploads the rest:

    for each missing path, references first, at most ``jobs`` at a time:
        stream the NAR from disk ▸ hash it ▸ compress into a temp file
        ▸ verify NarHash/NarSize against the Nix database  (else: refuse)
        ▸ upload the NAR
        ▸ wait until every reference has its narinfo in the cache
        ▸ sign and upload the narinfo

so a narinfo never becomes visible before its NAR or before its references'
narinfos, and nothing is signed that differs from what Nix registered.  The
store and the target are passed in, so tests can hand in plain objects.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, TypeVar

from uploader._exceptions import TargetError, UploaderError, VerificationError
from uploader.compression import extension, open_compressor
from uploader.narinfo import NarInfo
from uploader.nixbase32 import encode as nix32
from uploader.nixbase32 import format_hash
from uploader.signing import SecretKey
from uploader.store import PathInfo
from uploader.storepath import basename, hash_part
from uploader.targets import Target

__all__ = [
    "CACHE_INFO",
    "DependencyFailed",
    "Engine",
    "Progress",
    "PushResult",
    "StoreView",
    "narinfo_key",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_INFO = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
# Compressed NARs up to this size stay in memory; larger ones spill to disk.
_IN_MEMORY = 8 << 20
# Skipping an existing NAR costs a HEAD; only worth it when the PUT is large.
_HEAD_NAR_ABOVE = 4 << 20


def narinfo_key(store_path: str) -> str:
    return f"{hash_part(store_path)}.narinfo"


class StoreView(Protocol):
    """What the engine needs from the local Nix store."""

    def path_infos(self, paths: Iterable[str], *, closure: bool = False) -> dict[str, PathInfo]: ...

    def dump(self, path: str) -> Iterator[bytes]: ...


class KnownPaths(Protocol):
    """A local memory of which narinfos the cache holds (saves HEAD requests)."""

    def known(self, hash_parts: Iterable[str]) -> set[str]: ...

    def remember(self, hash_parts: Iterable[str]) -> None: ...


class Progress(Protocol):
    def start(self, total_paths: int, total_bytes: int) -> None: ...

    def advance(self, info: PathInfo, uploaded: bool) -> None: ...


@dataclass
class PushResult:
    """What one push did, path by path."""

    uploaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    skipped_upstream: list[str] = field(default_factory=list)
    failed: dict[str, UploaderError] = field(default_factory=dict)
    nar_bytes: int = 0
    file_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class _Prepared:
    body: IO[bytes]
    file_hash: bytes
    file_size: int


class _HashingWriter:
    """A file-like sink that hashes and counts what the compressor emits."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


class DependencyFailed(UploaderError):
    """A path was held back because one of its references failed (``cause``)."""

    def __init__(self, message: str, *, store_path: str, cause: UploaderError) -> None:
        super().__init__(message, store_path=store_path)
        self.cause = cause


async def _false() -> bool:
    return False


class Engine:
    """Uploads closures from a store view to a target, signing narinfos."""

    def __init__(
        self,
        store: StoreView,
        target: Target,
        key: SecretKey,
        *,
        compression: str = "zstd",
        compression_level: int | None = None,
        jobs: int = 4,
        tmp_dir: str | None = None,
        known: KnownPaths | None = None,
        is_upstream: Callable[[list[PathInfo]], set[str]] | None = None,
    ) -> None:
        extension(compression)  # validates the method early
        self.store = store
        self.target = target
        self._key = key
        self.compression = compression
        self.compression_level = compression_level
        self.jobs = max(1, jobs)
        self.tmp_dir = tmp_dir
        self.known = known
        self.is_upstream = is_upstream
        self._pool = ThreadPoolExecutor(max_workers=self.jobs + 16, thread_name_prefix="upload")
        self._cache_info_checked = False
        self._slots = asyncio.Semaphore(self.jobs)
        # Paths being uploaded right now, by any push_infos call, with their
        # outcome (None, or the error) once known.
        self._inflight: dict[str, asyncio.Future[UploaderError | None]] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def ensure_cache_info(self) -> None:
        """Write ``nix-cache-info`` unless the cache has one."""
        if self._cache_info_checked:
            return
        if not await self._run(self.target.exists, "nix-cache-info"):
            await self._run(
                self.target.put_bytes,
                "nix-cache-info",
                CACHE_INFO.encode(),
                "text/x-nix-cache-info",
            )
            log.info("wrote nix-cache-info to %s", self.target.url)
        self._cache_info_checked = True

    async def push(self, paths: Iterable[str], progress: Progress | None = None) -> PushResult:
        """Upload the closure of ``paths``; per-path failures land in the result."""
        roots = sorted(set(paths))
        infos = await self._run(lambda: self.store.path_infos(roots, closure=True))
        return await self.push_infos(roots, infos, progress)

    async def push_infos(
        self,
        roots: Iterable[str],
        infos: Mapping[str, PathInfo],
        progress: Progress | None = None,
    ) -> PushResult:
        """Upload what the cache lacks of the closure of ``roots`` (``infos``
        must hold that closure).  Paths another call is uploading right now
        are waited for, not uploaded twice."""
        result = PushResult()
        await self.ensure_cache_info()
        missing = await self._plan(roots, infos, result)
        loop = asyncio.get_running_loop()
        mine = [p for p in missing if p not in self._inflight]
        foreign = {p: self._inflight[p] for p in missing if p in self._inflight}
        done = {p: self._inflight.setdefault(p, loop.create_future()) for p in missing}
        if progress:
            progress.start(len(mine), sum(infos[p].nar_size for p in mine))
        tasks = [
            asyncio.create_task(self._upload_one(infos[p], done, result, progress))
            for p in _references_first(mine, infos)
        ]
        try:
            await asyncio.gather(*tasks)
            for path, fut in foreign.items():
                error = await asyncio.shield(fut)
                if error is None:
                    result.present.append(path)
                else:
                    result.failed[path] = error
        finally:
            for t in tasks:
                t.cancel()
            for p in mine:
                if self._inflight.get(p) is done[p] and done[p].done():
                    del self._inflight[p]
        return result

    async def _plan(
        self, roots: Iterable[str], infos: Mapping[str, PathInfo], result: PushResult
    ) -> list[str]:
        """Walk the closure from the roots, level by level, and stop at paths
        the cache (or an upstream cache) has: a cache that holds a path holds
        its closure, so nothing below it needs a request."""
        missing: list[str] = []
        seen: set[str] = set()
        frontier = sorted(set(roots))
        while frontier:
            seen.update(frontier)
            absent = await self._absent(frontier, infos, result)
            missing.extend(absent)
            frontier = sorted({r for p in absent for r in infos[p].references} - seen)
        return missing

    async def _absent(
        self, candidates: list[str], infos: Mapping[str, PathInfo], result: PushResult
    ) -> list[str]:
        """Those of ``candidates`` that neither the cache nor an upstream has."""
        if self.known is not None:
            known = self.known.known(hash_part(p) for p in candidates)
            result.present.extend(p for p in candidates if hash_part(p) in known)
            candidates = [p for p in candidates if hash_part(p) not in known]
        candidates = [p for p in candidates if p not in self._inflight] + [
            p for p in candidates if p in self._inflight
        ]
        exists = await asyncio.gather(
            *(
                self._run(self.target.exists, narinfo_key(p))
                if p not in self._inflight
                else _false()
                for p in candidates
            )
        )
        present = [p for p, e in zip(candidates, exists, strict=True) if e]
        result.present.extend(present)
        if self.known is not None and present:
            self.known.remember(hash_part(p) for p in present)
        absent = [p for p, e in zip(candidates, exists, strict=True) if not e]
        if self.is_upstream is not None and absent:
            upstream = await self._run(self.is_upstream, [infos[p] for p in absent])
            result.skipped_upstream.extend(sorted(upstream))
            absent = [p for p in absent if p not in upstream]
        return absent

    async def _upload_one(
        self,
        info: PathInfo,
        done: Mapping[str, asyncio.Future[UploaderError | None]],
        result: PushResult,
        progress: Progress | None,
    ) -> None:
        path = info.path
        try:
            async with self._slots:
                url, prepared = await self._upload_nar(info)
            # Slot released first: a path waiting on its references must not
            # hold a place its references need.
            for ref in info.references:
                if ref != path and ref in done:
                    error = await asyncio.shield(done[ref])
                    if error is not None:
                        raise DependencyFailed(
                            f"{path} not uploaded: its reference {ref} failed: {error}",
                            store_path=path,
                            cause=error,
                        )
            await self._run(self._put_narinfo, info, url, prepared)
        except UploaderError as e:
            if e.store_path is None:
                e.store_path = path
            result.failed[path] = e
            if not isinstance(e, DependencyFailed):
                log.error("%s", e)
            done[path].set_result(e)
            return
        except BaseException as e:
            done[path].set_result(UploaderError(f"{path}: interrupted ({e!r})", store_path=path))
            raise
        result.uploaded.append(path)
        result.nar_bytes += info.nar_size
        result.file_bytes += prepared.file_size
        if self.known is not None:
            self.known.remember([hash_part(path)])
        done[path].set_result(None)
        if progress:
            progress.advance(info, True)

    async def _upload_nar(self, info: PathInfo) -> tuple[str, _Prepared]:
        prepared = await self._run(self._compress_and_verify, info)
        try:
            url = f"nar/{nix32(prepared.file_hash)}.nar{extension(self.compression)}"
            await self._run(self._put_nar, url, prepared)
        finally:
            prepared.body.close()
        return url, prepared

    def _compress_and_verify(self, info: PathInfo) -> _Prepared:
        """Stream the NAR through sha256 and the compressor into a temp file,
        then compare with the database.  Runs in a worker thread."""
        # Closed by the caller once uploaded (or below, on failure).
        body: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=_IN_MEMORY, dir=self.tmp_dir
        )
        try:
            sink = _HashingWriter(body)
            compressor = open_compressor(
                self.compression,
                sink,  # type: ignore[arg-type]
                level=self.compression_level,
                size_hint=info.nar_size,
                threads=os.cpu_count() or 1,
            )
            nar_sha = hashlib.sha256()
            nar_size = 0
            for chunk in self.store.dump(info.path):
                nar_sha.update(chunk)
                nar_size += len(chunk)
                compressor.write(chunk)
            compressor.close()
            nar_hash = format_hash(nar_sha.digest())
            if nar_hash != info.nar_hash or nar_size != info.nar_size:
                raise VerificationError(
                    f"{info.path} differs from what the Nix database registered "
                    f"(database: {info.nar_hash}, {info.nar_size} bytes; on disk: "
                    f"{nar_hash}, {nar_size} bytes); refusing to sign it. "
                    f"Check it with `nix-store --verify-path {info.path}` and repair "
                    f"with `nix-store --repair-path {info.path}`",
                    store_path=info.path,
                )
            body.seek(0)
            return _Prepared(body=body, file_hash=sink.sha.digest(), file_size=sink.size)
        except BaseException:
            body.close()
            raise

    def _put_nar(self, url: str, prepared: _Prepared) -> None:
        if prepared.file_size > _HEAD_NAR_ABOVE and self.target.exists(url):
            return
        self.target.put(url, prepared.body, prepared.file_size, "application/x-nix-nar")

    def _put_narinfo(self, info: PathInfo, url: str, prepared: _Prepared) -> None:
        unsigned = NarInfo(
            store_path=info.path,
            url=url,
            compression=self.compression,
            file_hash=format_hash(prepared.file_hash),
            file_size=prepared.file_size,
            nar_hash=info.nar_hash,
            nar_size=info.nar_size,
            references=tuple(basename(r) for r in info.references),
            deriver=basename(info.deriver) if info.deriver else None,
            ca=info.ca,
        )
        ours = self._key.sign(unsigned.fingerprint())
        others = tuple(s for s in info.sigs if s.split(":", 1)[0] != self._key.name)
        signed = NarInfo(**{**unsigned.__dict__, "sigs": (*others, ours)})
        try:
            self.target.put_bytes(
                narinfo_key(info.path), signed.render().encode(), "text/x-nix-narinfo"
            )
        except TargetError as e:
            e.store_path = info.path
            raise
        log.info(
            "uploaded %s (%d bytes NAR, %d bytes %s)",
            info.path,
            info.nar_size,
            prepared.file_size,
            self.compression,
        )


def _references_first(paths: Iterable[str], infos: Mapping[str, PathInfo]) -> list[str]:
    """Order paths so that each comes after its references (those in ``paths``)."""
    wanted = set(paths)
    order: list[str] = []
    seen: set[str] = set()
    for root in sorted(wanted):
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(sorted(infos[root].references)))]
        while stack:
            node, refs = stack[-1]
            for ref in refs:
                if ref in wanted and ref not in seen:
                    seen.add(ref)
                    stack.append((ref, iter(sorted(infos[ref].references))))
                    break
            else:
                stack.pop()
                order.append(node)
    return order
