"""Upstream caches and signatures: whether a reference this cache leaves
out is served elsewhere, and whether a narinfo is signed by a trusted key."""

from __future__ import annotations

import base64
import binascii
import http.client
import logging
import threading
import urllib.error
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
    lock = threading.Lock()

    def get(url: str, name: str) -> bytes | None:
        if url in down:
            return None
        try:
            return _http_get(f"{url}/{name[:HASH_LENGTH]}.narinfo", timeout)
        except _Unreachable as e:
            with lock:
                if url not in down:
                    down.add(url)
                    log.warning("upstream %s cannot be asked (%s); not asking it again", url, e)
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
                return True
            if refused is not None:
                refused[name] = f"{url} has it, but {problem}"
        return False

    with ThreadPoolExecutor(max_workers=min(jobs, 16), thread_name_prefix="upstream") as pool:
        return {n for n, ok in zip(names, pool.map(served, names), strict=True) if ok}


class _Unreachable(Exception):
    """An upstream that does not answer, or not in HTTP."""


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
        raise _Unreachable(str(e.reason)) from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _Unreachable(f"{type(e).__name__}: {e}") from e
