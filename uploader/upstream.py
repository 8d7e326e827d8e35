"""Upstream caches: paths they serve are never uploaded again.

A path is upstream when it carries a signature by a trusted upstream key
(it was substituted from there, no request needed), or when an upstream
cache serves its narinfo (fetched and read: a server that answers 200 to
anything serves nothing).  Answers are remembered in the state database:
hits like the cache's own entries, misses for an hour.  An upstream that
cannot be asked (unreachable, timing out, answering something that is not
a narinfo) is not asked again for a minute, doubling up to ten while it
stays so: meanwhile its paths are uploaded here.
"""

from __future__ import annotations

import functools
import http.client
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from uploader._exceptions import InvalidPathError
from uploader.narinfo import NarInfo
from uploader.state import KnownCache
from uploader.store import PathInfo
from uploader.storepath import hash_part

__all__ = ["Upstreams"]

log = logging.getLogger(__name__)

# How long an upstream that could not be asked is left alone: doubled each
# time it still cannot be, up to the most.
_DOWN_FIRST = 60.0
_DOWN_MOST = 600.0
# A narinfo is a few hundred bytes; a larger answer is not one.
_NARINFO_MOST = 1 << 20


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
        self._lock = threading.Lock()
        # Per upstream that could not be asked: until when it is left alone,
        # for how long the next time, and why (said once per call).
        self._down_until: dict[str, float] = {}
        self._down_for: dict[str, float] = {}
        self._trouble: dict[str, str] = {}

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
            unasked = sum(1 for v in fresh.values() if v is None)
            with self._lock:
                trouble = self._trouble.pop(url, None)
                down_for = max(0.0, self._down_until.get(url, 0.0) - time.monotonic())
            if unasked:
                # Once per call, not once per path.
                log.warning(
                    "upstream %s %s; uploading %d %s ourselves, and not asking it again for %.0fs",
                    url, trouble or "could not be asked", unasked,
                    "path" if unasked == 1 else "paths", down_for,
                )  # fmt: skip
            answers.update({h: bool(v) for h, v in fresh.items()})
            hits = {hashes[h] for h, present in answers.items() if present}
            found |= hits
            remaining = [p for p in remaining if p not in hits]
        return found

    def _has(self, url: str, hash_part_: str) -> bool | None:
        """Whether ``url`` serves the narinfo; None when it could not be asked."""
        with self._lock:
            if time.monotonic() < self._down_until.get(url, 0.0):
                return None
        try:
            text = self._narinfo(url, hash_part_)
        except _CannotAsk as e:
            self._down(url, str(e))
            return None
        if text is None:
            self._up(url)
            return False
        try:
            info = NarInfo.parse(text)
        except (InvalidPathError, ValueError) as e:
            self._down(url, f"answered something that is not a narinfo for {hash_part_} ({e})")
            return None
        if hash_part(info.store_path) != hash_part_:
            self._down(url, f"answered {hash_part_}.narinfo with {info.store_path}'s")
            return None
        self._up(url)
        return True

    def _narinfo(self, url: str, hash_part_: str) -> str | None:
        """The text of the narinfo at ``url``; None when it has none.
        Raises _CannotAsk when that cannot be told."""
        if url.startswith("file://"):
            # A local cache (a mirror, another job's output): a file or not.
            directory = urllib.request.url2pathname(url.removeprefix("file://"))
            if not os.path.isdir(directory):
                raise _CannotAsk("does not exist")
            try:
                with open(os.path.join(directory, f"{hash_part_}.narinfo"), "rb") as f:
                    return f.read(_NARINFO_MOST).decode("utf-8", "replace")
            except FileNotFoundError:
                return None
            except OSError as e:
                raise _CannotAsk(f"cannot be read ({e})") from e
        try:
            with urllib.request.urlopen(
                f"{url}/{hash_part_}.narinfo", timeout=self.timeout
            ) as response:
                return bytes(response.read(_NARINFO_MOST)).decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            if e.code in (403, 404):
                return None
            raise _CannotAsk(f"answered {e.code}") from e
        except urllib.error.URLError as e:
            raise _CannotAsk(f"unreachable ({e.reason})") from e
        except (OSError, http.client.HTTPException, ValueError) as e:
            # A timeout, a reset, or a server that does not speak HTTP.
            raise _CannotAsk(f"unreachable ({e!r})") from e

    def _down(self, url: str, why: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._down_until.get(url, 0.0):
                return  # another thread's request found it so first
            down_for = self._down_for.get(url, _DOWN_FIRST)
            self._down_until[url] = now + down_for
            self._down_for[url] = min(_DOWN_MOST, down_for * 2)
            self._trouble.setdefault(url, why)

    def _up(self, url: str) -> None:
        with self._lock:
            self._down_for.pop(url, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _CannotAsk(Exception):
    """The upstream could not tell whether it has the narinfo."""
