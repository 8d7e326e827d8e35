"""Upstream caches: paths they serve are never uploaded again.

A path is upstream when it carries a signature by a trusted upstream key
(it was substituted from there, no request needed), or when an upstream
cache answers for its narinfo.  Answers are remembered in the state
database: hits like the cache's own entries, misses for an hour.
"""

from __future__ import annotations

import functools
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from uploader.state import KnownCache
from uploader.store import PathInfo
from uploader.storepath import hash_part

__all__ = ["Upstreams"]

log = logging.getLogger(__name__)


class Upstreams:
    """Decides which paths an upstream cache already serves."""

    def __init__(
        self,
        urls: Iterable[str] = (),
        key_names: Iterable[str] = (),
        *,
        memory: KnownCache | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.key_names = set(key_names)
        self.memory = memory
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="upstream")

    def __bool__(self) -> bool:
        return bool(self.urls or self.key_names)

    def served(self, infos: list[PathInfo]) -> set[str]:
        """The paths among ``infos`` that an upstream serves."""
        found = {i.path for i in infos if any(s.split(":", 1)[0] in self.key_names for s in i.sigs)}
        remaining = [i.path for i in infos if i.path not in found]
        for url in self.urls:
            if not remaining:
                break
            hashes = {hash_part(p): p for p in remaining}
            answers = self.memory.upstream_answers(url, hashes) if self.memory else {}
            unknown = [h for h in hashes if h not in answers]
            asked = self._pool.map(functools.partial(self._has, url), unknown)
            fresh = dict(zip(unknown, asked, strict=True))
            if self.memory and fresh:
                self.memory.remember_upstream(
                    url, {h: v for h, v in fresh.items() if v is not None}
                )
            answers.update({h: bool(v) for h, v in fresh.items()})
            hits = {hashes[h] for h, present in answers.items() if present}
            found |= hits
            remaining = [p for p in remaining if p not in hits]
        return found

    def _has(self, url: str, hash_part_: str) -> bool | None:
        """Whether ``url`` has the narinfo; None when it could not be asked."""
        if url.startswith("file://"):
            # A local cache (a mirror, another job's output): a file or not.
            # urllib would answer a HEAD there with no status at all.
            directory = urllib.request.url2pathname(url.removeprefix("file://"))
            if not os.path.isdir(directory):
                log.warning("upstream %s does not exist; uploading the path ourselves", url)
                return None
            return os.path.isfile(os.path.join(directory, f"{hash_part_}.narinfo"))
        request = urllib.request.Request(f"{url}/{hash_part_}.narinfo", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as e:
            if e.code in (403, 404):
                return False
            log.warning("upstream %s answered %s; uploading the path ourselves", url, e.code)
        except (urllib.error.URLError, OSError) as e:
            log.warning("upstream %s unreachable (%s); uploading the path ourselves", url, e)
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
