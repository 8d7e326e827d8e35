"""Upstream caches and signatures: whether a reference this cache leaves
out is served elsewhere, and whether a narinfo is signed by a trusted key."""

from __future__ import annotations

import base64
import binascii
import http.client
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from uploader.narinfo import NarInfo
from uploader.signing import PublicKey
from uploader.storepath import HASH_LENGTH, STORE_DIR

__all__ = ["served_upstream", "signature_problem"]

log = logging.getLogger(__name__)


def signature_problem(info: NarInfo, keys: tuple[PublicKey, ...]) -> str | None:
    """What keeps the narinfo's signatures from verifying under ``keys``
    (without keys: from being well formed), or None when nothing does."""
    if not info.sigs:
        return "it has no signature"
    if not keys:
        # Unchecked: a well-formed Sig is all that can be asked.
        malformed = [s for s in info.sigs if not _well_formed(s)]
        return f"malformed signature {malformed[0]!r}" if malformed else None
    fingerprint = info.fingerprint()
    if any(k.verify(fingerprint, s) for s in info.sigs for k in keys):
        return None
    names = ", ".join(sorted({s.partition(":")[0] for s in info.sigs}))
    return f"no signature verifies with the given keys (signed by {names})"


def _well_formed(sig: str) -> bool:
    name, _, payload = sig.partition(":")
    if not name or any(c.isspace() for c in name):
        return False
    try:
        return len(base64.b64decode(payload, validate=True)) == 64
    except binascii.Error:
        return False


def served_upstream(
    urls: Iterable[str],
    keys: tuple[PublicKey, ...],
    names: list[str],
    jobs: int,
    refused: dict[str, str] | None = None,
    timeout: float = 30,
) -> set[str]:
    """Those of the store path basenames an upstream cache serves: its
    narinfo for that path, signed by one of ``keys`` when keys are given.
    ``refused`` receives the names an upstream answers for but does not
    count, each with why.  An upstream that cannot be asked is said once
    and not asked again in this call."""
    urls = [u.rstrip("/") for u in urls]
    if not urls or not names:
        return set()
    down: set[str] = set()
    for url in urls:
        if (missing := _missing_directory(url)) is not None:
            down.add(url)
            log.warning("upstream %s cannot be asked (no directory %s)", url, missing)
    # Lookups that failed in a row, per upstream: a dropped connection is
    # tried again; an upstream that keeps failing is let be.
    failures: dict[str, int] = {}
    lock = threading.Lock()

    def get(url: str, name: str) -> bytes | None:
        for attempt in range(_TRIES):
            if url in down:
                return None
            if attempt:
                time.sleep(_RETRY_PAUSE)  # past the blip that failed the first try
            try:
                data = _http_get(f"{url}/{name[:HASH_LENGTH]}.narinfo", timeout)
            except _Unreachable as e:
                # No answer in time is waited for once: asked again, it
                # would cost the same wait for every path.
                if e.timed_out or attempt + 1 == _TRIES:
                    with lock:
                        # Lookups that failed every try, in a row (parallel
                        # lookups failing in one blip count once each try).
                        failures[url] = failures.get(url, 0) + 1
                        if (e.timed_out or failures[url] >= _DOWN_AFTER) and url not in down:
                            down.add(url)
                            log.warning(
                                "upstream %s cannot be asked (%s); not asking it again", url, e
                            )
                    return None
                continue
            with lock:
                failures[url] = 0
            return data
        return None

    def served(name: str) -> bool:
        for url in urls:
            data = get(url, name)
            if data is None:
                continue
            # Parsed whatever the keys: a mistyped URL, a captive portal or
            # a CDN's error page answers 200 to anything.
            try:
                info = NarInfo.parse(data.decode())
            except (ValueError, UnicodeDecodeError):
                info = None
            if info is None or info.store_path != f"{STORE_DIR}/{name}":
                if refused is not None:
                    refused[name] = f"{url} answers, but not with a narinfo of this path"
                continue
            problem = signature_problem(info, keys) if keys else None
            if problem is None:
                if refused is not None:
                    refused.pop(name, None)  # what an upstream before said does not matter
                return True
            if refused is not None:
                refused[name] = f"{url} has it, but {problem}"
        return False

    with ThreadPoolExecutor(max_workers=min(jobs, 16), thread_name_prefix="upstream") as pool:
        return {n for n, ok in zip(names, pool.map(served, names), strict=True) if ok}


# Each lookup is tried this often; an upstream whose tries failed this often
# in a row is not asked again in the call.
_TRIES = 2
_DOWN_AFTER = 3
_RETRY_PAUSE = 1.0


class _Unreachable(Exception):
    """An upstream that does not answer, or not in HTTP."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def _missing_directory(url: str) -> str | None:
    """The directory a file:// upstream names, when it does not exist."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "file":
        return None
    directory = urllib.request.url2pathname(parsed.path)
    return None if os.path.isdir(directory) else directory


def _http_get(url: str, timeout: float) -> bytes | None:
    """The body of a 200 answer; None for any other status (said unless
    403 or 404); _Unreachable when there is no HTTP answer at all."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data: bytes = response.read()
            return data
    except urllib.error.HTTPError as e:
        if e.code not in (403, 404):
            log.warning("upstream %s answered %s", url, e.code)
        return None
    except urllib.error.URLError as e:
        if isinstance(e.reason, FileNotFoundError) and url.startswith("file:"):
            return None  # a file:// upstream's 404
        raise _Unreachable(str(e.reason), timed_out=isinstance(e.reason, TimeoutError)) from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        timed_out = isinstance(e, TimeoutError)
        raise _Unreachable(f"{type(e).__name__}: {e}", timed_out=timed_out) from e
