"""Small S3 requests (HEAD, PUT of narinfos and small NARs, GET, DELETE,
listings) without boto3's per-request pipeline, and without a thread each.

Thousands of tiny store paths need thousands of small requests; far from S3
most of them must be in flight at once.  A thread per request in flight
costs more than the requests: measured here with 2000 tiny paths against
SeaweedFS on loopback, the threads' contention for the interpreter lock
(over a million futex calls) made the uploader's system time almost its
user time.  So the requests run as coroutines on one event loop: aiohttp's
connection pool and parser, on one thread (for every bucket), started on
first use.  Callers in threads wait for the answer (``head``, ``put``…);
the engine awaits it from its own loop (``submit``) without a thread.

botocore still does what needs care: credentials (environment, profile,
instance role, refreshed when they expire), the endpoint and addressing
style, and the SigV4 signature of each request (in its headers; the URL
carries nothing secret).

Failures come back as botocore ``ClientError``s shaped like boto3's, so the
S3 target maps them to our errors in one place.  Each request is tried up to
``max_attempts`` times on connection errors and on 429, 500, 502, 503, 504
(0.2 s backoff doubling, with jitter; a ``Retry-After`` in seconds of up to
``_RETRY_AFTER_MAX`` is waited out, a longer one is left to the caller's
queue).  When a proxy is configured the target keeps to boto3, which knows
how to use it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import datetime
import hashlib
import html
import logging
import os
import random
import re
import ssl
import threading
import urllib.request
import weakref
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import botocore.exceptions
import botocore.httpsession
from yarl import URL

from uploader.redact import remember_credentials, scrub
from uploader.targets.sigv4 import EMPTY_SHA256, Signer

__all__ = ["DirectRequests", "Listing", "parse_time", "usable_for"]

T = TypeVar("T")
log = logging.getLogger(__name__)

_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_BACKOFF = 0.2
# Longer Retry-After answers are not waited out request by request: the
# error carries them to the daemon's queue, which retries the entry later.
_RETRY_AFTER_MAX = 20.0
_PROBE = "nix-cache-uploader-probe"
# Keys per listing page: S3's maximum.
LIST_PAGE = 1000


def usable_for() -> bool:
    """Whether requests may go straight to the endpoint (no proxy configured)."""
    return not urllib.request.getproxies()


class _Sessions:
    """One event loop on a daemon thread, started on first use, shared by
    every bucket's requests; and the HTTP sessions living on it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._open: set[_Session] = set()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop())

    def opened(self, session: _Session) -> None:
        with self._lock:
            self._open.add(session)

    def close(self, session: _Session) -> None:
        """Close ``session`` on the loop, soon; never waits (it may be called
        by the garbage collector, on any thread)."""
        with self._lock:
            self._open.discard(session)
            loop = self._loop
        if loop is not None and session.http is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: so is it
                loop.call_soon_threadsafe(_close_soon, session)

    def stop(self) -> None:
        """At exit: close every session, then end the thread."""
        with self._lock:
            loop, thread, sessions = self._loop, self._thread, list(self._open)
            self._loop = self._thread = None
            self._open.clear()
        if loop is None or thread is None:
            return

        async def close_all() -> None:
            await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
            # And those being closed already (by close()), and any request
            # still running: none is left pending when the loop stops.
            others = asyncio.all_tasks() - {asyncio.current_task()}
            if others:
                await asyncio.wait(others, timeout=5)

        with contextlib.suppress(Exception):  # closing is best effort
            asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()


class _Session:
    """One bucket's aiohttp session (made on the loop, on first use)."""

    http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        http, self.http = self.http, None
        if http is not None:
            await http.close()


def _close_soon(session: _Session) -> None:
    asyncio.get_running_loop().create_task(session.close())


_SESSIONS = _Sessions("s3-requests")
atexit.register(_SESSIONS.stop)


class DirectRequests:
    """Small requests to one bucket, signed by botocore, sent by aiohttp."""

    def __init__(
        self,
        client: Any,
        session: Any,
        bucket: str,
        *,
        max_connections: int,
        max_attempts: int,
        read_timeout: float,
    ) -> None:
        self._credentials = session
        self._client = client
        self._bucket = bucket
        self._signer = Signer(client.meta.region_name)
        # Where objects live: scheme://host, the Host header, the path.
        self._where: tuple[str, str, str] | None = None
        self._attempts = max(1, max_attempts)
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=read_timeout)
        # The longest a request can take with its retries: callers in
        # threads never wait longer, whatever happens on the loop.
        self._patience = self._attempts * (10 + read_timeout + _RETRY_AFTER_MAX) + 10
        self._session = _Session()
        # The session of the running loop, inside on_this_loop.
        self._scoped: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
            "direct_requests_session", default=None
        )
        # Closed with this object (or at exit): aiohttp warns of a session
        # that is not.
        self._closer = weakref.finalize(self, _SESSIONS.close, self._session)

    # -- for callers in threads ------------------------------------------

    def head(self, key: str) -> None:
        """Succeeds when the object exists; raises ClientError (404, 403…) otherwise."""
        self._wait(self.submit("HEAD", key))

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._wait(self.submit("PUT", key, data, content_type))

    def get(self, key: str) -> bytes:
        """A small object's bytes (narinfos); raises ClientError (404, 403…)."""
        return self._wait(self.submit("GET", key))

    def delete(self, key: str) -> None:
        self._wait(self.submit("DELETE", key))

    def _wait(self, future: concurrent.futures.Future[bytes]) -> bytes:
        try:
            return future.result(timeout=self._patience)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ConnectionError(f"no answer within {self._patience:.0f}s") from None

    def list(self, start_after: str, prefix: str = "") -> Listing:
        """One ListObjectsV2 page of the objects directly under ``prefix``
        (the top level by default) after ``start_after``.  Parsed with expat
        alone: botocore's parser costs as much for one page of 1000 keys as a
        few dozen HEADs."""
        query = {
            "delimiter": "/",
            "list-type": "2",
            "max-keys": str(LIST_PAGE),
            "prefix": prefix,
            "start-after": start_after,
        }
        return Listing.parse(self._wait(self.submit("GET", "", query=query)))

    def close(self) -> None:
        self._closer()

    # -- for callers on an event loop ------------------------------------

    def submit(
        self,
        method: str,
        key: str,
        body: bytes | None = None,
        content_type: str | None = None,
        *,
        query: Mapping[str, str] | None = None,
    ) -> concurrent.futures.Future[bytes]:
        """Send the request on the requests' own loop; the answer's body (or
        a ClientError, or a ConnectionError) in the future."""
        headers = {"Content-Type": content_type} if content_type else {}
        return _SESSIONS.submit(self._send(self._session, method, key, body, headers, query))

    async def request(
        self, method: str, key: str, body: bytes | None = None, content_type: str | None = None
    ) -> bytes:
        """The request, awaited from the caller's loop: sent from that loop
        inside ``on_this_loop``, else from the requests' own thread."""
        session = self._scoped.get()
        if session is None:
            return await asyncio.wrap_future(self.submit(method, key, body, content_type))
        headers = {"Content-Type": content_type} if content_type else {}
        return await self._send(session, method, key, body, headers, None)

    @contextlib.asynccontextmanager
    async def on_this_loop(self) -> AsyncIterator[None]:
        """Within this block, ``request`` sends from the running loop itself,
        on connections of its own (closed at the end): no hand-off to another
        thread and back for each request."""
        if self._scoped.get() is not None:
            yield
            return
        session = _Session()
        token = self._scoped.set(session)
        try:
            yield
        finally:
            self._scoped.reset(token)
            await session.close()

    # -- on the requests' loop -------------------------------------------

    @property
    def _prefix(self) -> tuple[str, str, str]:
        """Where objects live (endpoint, addressing style): the origin, the
        Host header, and the path objects are under.  It does not depend on
        the key, so botocore resolves it once, from a presigned URL for a
        placeholder key.  On first use, not at start: signing needs
        credentials, which may come later."""
        if self._where is None:
            probe = self._client.generate_presigned_url(
                "head_object", Params={"Bucket": self._bucket, "Key": _PROBE}, ExpiresIn=60
            )
            parts = urlsplit(probe.split("?", 1)[0])
            if not parts.path.endswith("/" + _PROBE):
                raise ValueError(f"unexpected presigned URL shape: {parts.path}")
            host = parts.hostname or ""
            if ":" in host:
                host = f"[{host}]"
            default = {"http": 80, "https": 443}.get(parts.scheme)
            if parts.port is not None and parts.port != default:
                host += f":{parts.port}"
            origin = f"{parts.scheme}://{parts.netloc}"
            self._where = (origin, host, parts.path[: -len(_PROBE)])
        return self._where

    def _client_session(self, session: _Session) -> aiohttp.ClientSession:
        if session.http is None:
            ca = _ca_bundle(self._credentials) or botocore.httpsession.get_cert_path(True)
            context = ssl.create_default_context(cafile=ca if isinstance(ca, str) else None)
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, ssl=context
            )
            session.http = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
            if session is self._session:
                _SESSIONS.opened(session)
        return session.http

    def _signed(
        self,
        method: str,
        host: str,
        path: str,
        query: str,
        body: bytes | None,
        headers: dict[str, str],
    ) -> dict[str, str]:
        credentials = self._credentials.get_credentials()
        if credentials is None:
            raise botocore.exceptions.NoCredentialsError()
        frozen = credentials.get_frozen_credentials()
        remember_credentials(frozen)
        return self._signer.headers(
            method,
            host,
            path,
            query,
            headers,
            hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256,
            access_key=frozen.access_key,
            secret_key=frozen.secret_key,
            token=frozen.token,
        )

    async def _send(
        self,
        session: _Session,
        method: str,
        key: str,
        body: bytes | None,
        headers: dict[str, str],
        query: Mapping[str, str] | None,
    ) -> bytes:
        origin, host, base = self._prefix
        path = base + quote(key, safe="/~") if key else base.rstrip("/") or "/"
        canonical_query = "&".join(
            f"{k}={v}"
            for k, v in sorted(
                (quote(k, safe="~"), quote(v, safe="~")) for k, v in (query or {}).items()
            )
        )
        url = URL(origin + path + (f"?{canonical_query}" if canonical_query else ""), encoded=True)
        http = self._client_session(session)
        where = f"s3://{self._bucket}/{key}"
        for attempt in range(self._attempts):
            last = attempt + 1 == self._attempts
            # Signed again for each attempt: the signature carries the time.
            signed = self._signed(method, host, path, canonical_query, body, headers)
            level = logging.DEBUG
            try:
                async with http.request(method, url, data=body, headers=signed) as response:
                    data = await response.read()
                    status = response.status
                    if status < 300:
                        return data
                    wait = _retry_after(response.headers.get("Retry-After"))
                    if status not in _TRANSIENT_STATUS or last or wait > _RETRY_AFTER_MAX:
                        raise _client_error(
                            status, response.reason or "", dict(response.headers), data
                        )
                    failure = f"{status} {response.reason or ''}".rstrip()
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                # One line, and short: aiohttp quotes whole raw responses.
                failure = scrub(" ".join(f"{type(e).__name__}: {e}".split()))[:300]
                if last and isinstance(e, TimeoutError):
                    raise ConnectionError(
                        f"no answer in time in {self._attempts} attempts ({failure}): the "
                        "server is not answering; check that it is up and reachable"
                    ) from None
                if last:
                    raise ConnectionError(failure) from None
                wait = 0.0
                # A server that stopped answering costs a read timeout per
                # attempt (minutes in all): say so now, not at the end.
                if isinstance(e, TimeoutError):
                    failure = f"no answer in time ({failure})"
                    level = logging.WARNING
            wait = max(wait, _BACKOFF * 2**attempt * random.uniform(0.5, 1.5))
            # Otherwise debug only: whoever gives up or retries later says it once.
            log.log(
                level,
                "%s %s: %s; attempt %d of %d in %.2fs",
                method, where, failure, attempt + 2, self._attempts, wait,
            )  # fmt: skip
            await asyncio.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header given in seconds (dates are ignored)."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


class Listing:
    """The objects (key, size, LastModified as Unix time) and common prefixes
    of one ListObjectsV2 page."""

    def __init__(
        self, objects: list[tuple[str, int, float]], prefixes: list[str], truncated: bool
    ) -> None:
        self.objects = objects
        self.prefixes = prefixes
        self.truncated = truncated

    @property
    def keys(self) -> list[str]:
        """Object keys and prefixes together, as the existence checks want them."""
        return [k for k, _, _ in self.objects] + self.prefixes

    @classmethod
    def parse(cls, body: bytes) -> Listing:
        try:
            root = ET.fromstring(body)
        except ET.ParseError as e:
            raise ValueError(f"unreadable ListObjectsV2 answer: {e}") from e
        objects: list[tuple[str, int, float]] = []
        prefixes: list[str] = []
        truncated = False
        for child in root:
            tag = _local(child.tag)
            if tag == "Contents":
                fields = {_local(c.tag): c.text or "" for c in child}
                size = fields.get("Size", "")
                objects.append(
                    (
                        fields.get("Key", ""),
                        int(size) if size.isdigit() else -1,
                        parse_time(fields.get("LastModified", "")),
                    )
                )
            elif tag == "CommonPrefixes":
                prefixes.extend(c.text or "" for c in child if _local(c.tag) == "Prefix")
            elif tag == "IsTruncated":
                truncated = (child.text or "").strip().lower() == "true"
        return cls(objects, prefixes, truncated)


def parse_time(text: str) -> float:
    """LastModified as S3 writes it (ISO 8601, ``2024-05-01T12:00:00.000Z``)
    as Unix time; 0 (the oldest possible) when missing or unreadable."""
    try:
        stamp = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    return stamp.timestamp()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _client_error(status: int, reason: str, headers: dict[str, str], body: bytes) -> Exception:
    text = body.decode("utf-8", "replace") if body else ""
    code = _tag(text, "Code") or str(status)
    message = _tag(text, "Message") or reason
    error: Exception = botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {
                "HTTPStatusCode": status,
                "HTTPHeaders": {k.lower(): v for k, v in headers.items()},
            },
        },
        "S3",
    )
    return error


def _ca_bundle(session: Any) -> str | None:
    """The CA bundle boto3's clients use too: AWS_CA_BUNDLE, else the
    profile's ``ca_bundle``."""
    core = getattr(session, "_session", None)
    ca = core.get_config_variable("ca_bundle") if core is not None else None
    return ca if isinstance(ca, str) and ca else os.environ.get("AWS_CA_BUNDLE") or None


def _tag(xml: str, name: str) -> str | None:
    match = re.search(rf"<{name}>(.*?)</{name}>", xml, re.S)
    # XML's escapes (the server&#39;s time) read as the text they stand for.
    return html.unescape(match.group(1)) if match else None
