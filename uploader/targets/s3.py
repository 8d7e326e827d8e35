"""A binary cache in an S3-compatible bucket (AWS, SeaweedFS, Garage, MinIO, R2).

boto3 does the work: credentials from the usual chain (environment, profile,
instance role), request-level retries in botocore's standard mode, and
s3transfer's multipart upload with a bounded number of parts in memory.
Small requests take a faster route: signed by botocore, sent by aiohttp from
one event loop (direct.py); the engine awaits them without a thread each.
Queue-level retries (minutes, hours) belong to the daemon, not to this layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import urllib.parse
from typing import IO, Any

import boto3
import botocore.exceptions
from botocore.config import Config
from s3transfer.manager import TransferConfig, TransferManager

from uploader._exceptions import ConfigError, NoBucketError, TargetError, TransientTargetError
from uploader.redact import scrub
from uploader.targets import KeyPage, ObjectPage, Upload
from uploader.targets.credentials import (
    REJECTED_CODES,
    missing_credentials,
    rejected_credentials,
    session_for,
)
from uploader.targets.direct import LIST_PAGE, DirectRequests, Listing, usable_for
from uploader.targets.multipart import S3Upload
from uploader.targets.url import StoreUrl

__all__ = ["S3Target"]

log = logging.getLogger(__name__)

_MiB = 1 << 20
# Parts of 8 MiB (more for NARs over ~78 GiB, to stay under S3's 10,000
# parts), 4 in flight across all the NARs uploading: large NARs upload in
# parallel parts while about 32 MiB of them is in memory, however many there
# are.  Small objects go in a single PUT alongside.
MULTIPART_THRESHOLD = 16 * _MiB
MULTIPART_CHUNK = 8 * _MiB
MULTIPART_CONCURRENCY = 4

_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
    "OperationAborted",
}


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header given in seconds (dates are ignored)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _describe(e: Exception, action: str, where: str, profile: str | None = None) -> TargetError:
    """Turn a botocore failure into our error, transient or not.  What the
    client said is scrubbed: botocore and urllib3 quote the (presigned) URL
    they failed on."""
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return missing_credentials(action, where, profile)
    if isinstance(e, botocore.exceptions.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = _status(e)
        if code in REJECTED_CODES:
            return rejected_credentials(action, where, code)
        msg = _one_line(f"{action} {where}: {code or status} {err.get('Message', '')}")
        if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            headers = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            return TransientTargetError(msg, retry_after=_retry_after(headers.get("retry-after")))
        if code == "NoSuchBucket":
            return _no_bucket(action, where)
        return TargetError(msg)
    if isinstance(e, botocore.exceptions.BotoCoreError | ConnectionError | TimeoutError | OSError):
        error = TransientTargetError(f"{action} {where}: {_one_line(str(e))}")
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            error.args = (f"{error.args[0]}{_UNTRUSTED}",)
        return error
    return TargetError(f"{action} {where}: {_one_line(str(e))}")


# What a TLS certificate the system does not trust needs (docs/s3-providers.md).
_UNTRUSTED = (
    " (the endpoint's TLS certificate is not trusted here: for a private CA, set "
    "AWS_CA_BUNDLE=/path/to/ca.pem in the environment, or ca_bundle in the AWS profile)"
)


def _one_line(text: str) -> str:
    """A server's or botocore's words as one scrubbed line of a log event."""
    return scrub(" ".join(text.split()))


# What a 403 on each kind of request lacks (AWS's names; other servers' are alike).
_PERMISSIONS = {
    "uploading": "s3:PutObject",
    "reading": "s3:GetObject",
    "checking": "s3:GetObject",
    "listing": "s3:ListBucket",
    "deleting": "s3:DeleteObject",
    "aborting the upload of": "s3:AbortMultipartUpload",
}


def _log_retries(client: Any, bucket: str, total: int) -> None:
    """Say when botocore tries a request again (the parts of streamed NARs,
    their multipart calls, gc's deletions), as the small requests say it
    (direct.py): a debug line, or a warning at a timeout, which costs
    minutes before the last attempt gives up.  ``total`` attempts in all."""

    def observe(
        attempts: int,
        operation: Any,
        caught_exception: Exception | None = None,
        response: Any = None,
        request_dict: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        if attempts >= total:
            return  # the last: whoever gives up says so
        level = logging.DEBUG
        if caught_exception is not None:
            failure = type(caught_exception).__name__
            timeouts = botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError
            if isinstance(caught_exception, timeouts):
                failure, level = f"no answer in time ({failure})", logging.WARNING
        elif response is not None:
            status = int(getattr(response[0], "status_code", 0) or 0)
            code = str(response[1].get("Error", {}).get("Code", ""))
            if status < 500 and status != 429 and code not in _TRANSIENT_CODES:
                return  # not retried (or not a failure)
            failure = f"{status} {code}".strip()
        else:
            return
        # The path without its query (``?uploads``; an upload id, elsewhere).
        path = (request_dict or {}).get("url_path", "").split("?", 1)[0]
        key = urllib.parse.unquote(path).lstrip("/")
        log.log(level, "%s s3://%s/%s: %s; attempt %d of %d",
                operation.name, bucket, key, failure, attempts + 1, total)  # fmt: skip

    # First, so that botocore's own handler (which answers whether to retry)
    # does not stop the event before it is seen; it returns nothing.
    client.meta.events.register_first("needs-retry.s3", observe)


def _no_bucket(action: str, where: str) -> NoBucketError:
    if action in ("uploading", "deleting"):
        return NoBucketError(
            f"{action} {where}: the bucket does not exist; create it first (or check "
            "the bucket name in the store URL)"
        )
    return NoBucketError(
        f"{action} {where}: the bucket does not exist; check the bucket name in the store URL"
    )


def _status(e: botocore.exceptions.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _transfer_config() -> TransferConfig:
    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        # s3transfer raises it for NARs that would need more than 10,000 parts.
        multipart_chunksize=MULTIPART_CHUNK,
        # Shared by every upload: at most this many parts are read and sent
        # at once, however many NARs upload together.
        max_request_concurrency=MULTIPART_CONCURRENCY,
        # Parts of a file object read ahead into memory (10 by default).
        max_in_memory_upload_chunks=MULTIPART_CONCURRENCY,
    )


class S3Target:
    """An S3 bucket addressed by a Nix store URL."""

    takes_parts = True

    def __init__(
        self,
        url: StoreUrl,
        *,
        max_connections: int = 16,
        max_attempts: int = 4,
        read_timeout: float = 60,
    ) -> None:
        self.url = url
        self.bucket = url.bucket
        try:
            session = session_for(url.params.get("profile") or None)
        except ConfigError as e:
            raise ConfigError(f"store URL {url}: {e}") from None
        endpoint = url.endpoint_url
        # Self-hosted endpoints rarely have wildcard DNS for bucket names.
        addressing = url.params.get("addressing-style", "path" if endpoint else "auto")
        config = Config(
            region_name=url.params.get("region", "us-east-1"),
            # Request-level retries only; the daemon's queue retries for longer.
            # In all, as the direct requests count them (botocore's
            # max_attempts would be the retries after the first).
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            # Every caller thread, plus s3transfer's part uploads.
            max_pool_connections=max_connections + MULTIPART_CONCURRENCY,
            # Checksums only where S3 requires them: the NAR's integrity is
            # already in the narinfo, and several S3-compatible servers reject
            # the newer checksum headers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=10,
            read_timeout=read_timeout,
            s3={"addressing_style": addressing},
        )
        try:
            self._client: Any = session.client("s3", endpoint_url=endpoint, config=config)
            # The parts of streamed NARs go out with an unsigned payload (as
            # Nix's own S3 store sends everything): signing hashes every part
            # once more here (about 0.5 s of CPU per GiB) and again at the
            # server, and proves nothing the narinfo does not.  Its
            # signed FileHash and NarHash, checked by every substituter,
            # cover the bytes end to end; TLS, where used, the transfer.
            # Small requests (narinfos, the gc protocol's objects) stay signed.
            self._parts_client: Any = session.client(
                "s3",
                endpoint_url=endpoint,
                config=config.merge(
                    Config(s3={"addressing_style": addressing, "payload_signing_enabled": False})
                ),
            )
        except (botocore.exceptions.BotoCoreError, ValueError) as e:
            raise ConfigError(f"store URL {url}: {e}") from e
        for client in (self._client, self._parts_client):
            _log_retries(client, self.bucket, max_attempts)
        self._transfers = TransferManager(self._client, _transfer_config())
        self._listable = True
        self._denied: set[str] = set()
        self._fast = (
            DirectRequests(
                self._client,
                session,
                self.bucket,
                max_connections=max_connections,
                max_attempts=max_attempts,
                read_timeout=read_timeout,
            )
            if usable_for()
            else None
        )

    def _describe(self, e: Exception, action: str, where: str) -> TargetError:
        error = _describe(e, action, where, self.url.params.get("profile"))
        permission = _PERMISSIONS.get(action)
        if (
            permission
            and isinstance(e, botocore.exceptions.ClientError)
            and _status(e) == 403
            and type(error) is TargetError  # not refused credentials: a missing permission
        ):
            error = TargetError(f"{error} (this needs the {permission} permission)")
        endpoint = self.url.params.get("endpoint", "")
        if (
            "ssl" in str(error).lower()
            and endpoint
            and "://" not in endpoint
            and "scheme" not in self.url.params
        ):
            # Nix's older spelling means https unless scheme=http is given.
            error.args = (
                f"{error} (the endpoint {endpoint!r} has no scheme, so HTTPS was used; for "
                f"plain HTTP write endpoint=http://{endpoint})",
                *error.args[1:],
            )
        return error

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _failed_upload(self, e: Exception, key: str, action: str = "uploading") -> TargetError:
        """The error for a failed PUT.  SeaweedFS (and S3 where the caller may
        not list buckets) answer a PUT into a missing bucket with 403
        AccessDenied; one HEAD on the bucket tells that apart from a missing
        permission, so the message points at the right fix."""
        where = self._where(key)
        if (
            isinstance(e, botocore.exceptions.ClientError)
            and _status(e) in (403, 404)
            and self._bucket_missing()
        ):
            return _no_bucket(action, where)
        return self._describe(e, action, where)

    def _bucket_missing(self) -> bool:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as e:
            return _status(e) == 404
        except Exception:  # no answer: keep the original error
            return False
        return False

    def exists(self, key: str) -> bool:
        try:
            if self._fast is not None:
                self._fast.head(key)
            else:
                self._client.head_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            return self._absent(e, key)
        return True

    def _absent(self, e: Exception, key: str) -> bool:
        """False for a HEAD that failed because the object is missing;
        raises our error for any other failure."""
        # An unlistable bucket answers 403 for a missing key: treat both as
        # absent, remembering which keys were only denied (``denied``).
        if isinstance(e, botocore.exceptions.ClientError) and _status(e) in (403, 404):
            if _status(e) == 403:
                self._denied.add(key)
            return False
        raise self._describe(e, "checking", self._where(key)) from e

    def absence_unsure(self, key: str) -> str | None:
        """Whether ``exists(key)`` said False only because S3 answered 403:
        None when it was a plain 404 (or never asked); else, asked again with
        a GET (a HEAD's 403 has no body to say why), "present" when the
        object can be read after all, "denied" when reading it is not allowed
        (no s3:GetObject, or no s3:ListBucket for a missing one).  Rejected
        credentials raise CredentialsError, as any request does."""
        if key not in self._denied:
            return None
        try:
            if self._fast is not None:
                self._fast.get(key)
            else:
                self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except botocore.exceptions.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if _status(e) == 403 and code not in REJECTED_CODES:
                return "denied"
            if _status(e) == 404:
                return None
            raise self._describe(e, "reading", self._where(key)) from e
        except Exception as e:
            raise self._describe(e, "reading", self._where(key)) from e
        return "present"

    async def exists_async(self, key: str) -> bool:
        """``exists``, awaited on the caller's event loop without a thread
        of its own (the many existence checks of a large batch)."""
        if self._fast is None:
            return await asyncio.to_thread(self.exists, key)
        try:
            await self._fast.request("HEAD", key)
        except Exception as e:
            return self._absent(e, key)
        return True

    def list_keys(self, start_after: str) -> KeyPage | None:
        if not self._listable:
            return None
        try:
            page = self._list_page("", start_after)
        except TargetError:
            raise
        except botocore.exceptions.ClientError as e:
            if _status(e) in (403, 405, 501):
                # Not allowed (no s3:ListBucket) or not implemented: HEADs work.
                self._listable = False
                log.info(
                    "cannot list s3://%s (%s); checking narinfos one request each",
                    self.bucket,
                    _status(e),
                )
                return None
            raise self._describe(e, "listing", self._where("")) from e
        except Exception as e:
            raise self._describe(e, "listing", self._where("")) from e
        keys = sorted(page.keys)
        return KeyPage(frozenset(keys), keys[-1] if page.truncated else None)

    def list_objects(self, prefix: str, start_after: str) -> ObjectPage:
        try:
            page = self._list_page(prefix, start_after)
        except TargetError:
            raise
        except Exception as e:
            raise self._describe(e, "listing", self._where(prefix)) from e
        last = max(page.keys) if page.truncated else None
        # A key ending in '/' is a folder marker (S3 consoles make them;
        # SeaweedFS lists a directory emptied by a delete as one), not an
        # object of ours.
        objects = sorted(o for o in page.objects if not o[0].endswith("/"))
        return ObjectPage(tuple(objects), last, tuple(sorted(page.prefixes)))

    def _list_page(self, prefix: str, start_after: str) -> Listing:
        """One page (up to 1000) of what is directly under ``prefix``."""
        if self._fast is not None:
            page = self._fast.list(start_after, prefix)
        else:
            resp = self._client.list_objects_v2(
                Bucket=self.bucket,
                Delimiter="/",
                Prefix=prefix,
                StartAfter=start_after,
                MaxKeys=LIST_PAGE,
            )
            page = Listing(
                [
                    (c["Key"], int(c.get("Size", -1)), _timestamp(c.get("LastModified")))
                    for c in resp.get("Contents", [])
                ],
                [p["Prefix"] for p in resp.get("CommonPrefixes", [])],
                bool(resp.get("IsTruncated")),
            )
        if page.truncated and not page.keys:
            raise TransientTargetError(
                f"listing {self._where(prefix)}: the server said there is more but sent no key"
            )
        return page

    def get(self, key: str) -> bytes | None:
        try:
            if self._fast is not None:
                return self._fast.get(key)
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
            data: bytes = resp["Body"].read()
            return data
        except botocore.exceptions.ClientError as e:
            if _status(e) in (403, 404):
                return None
            raise self._describe(e, "reading", self._where(key)) from e
        except Exception as e:
            raise self._describe(e, "reading", self._where(key)) from e

    def delete(self, key: str) -> None:
        # S3 answers 204 whether or not the key existed.
        try:
            if self._fast is not None:
                self._fast.delete(key)
            else:
                self._client.delete_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as e:
            if _status(e) == 404:
                return
            raise self._describe(e, "deleting", self._where(key)) from e
        except Exception as e:
            raise self._describe(e, "deleting", self._where(key)) from e

    def open_object(self, key: str) -> IO[bytes] | None:
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as e:
            if _status(e) in (403, 404):
                return None
            raise self._describe(e, "reading", self._where(key)) from e
        except Exception as e:
            raise self._describe(e, "reading", self._where(key)) from e
        body: IO[bytes] = resp["Body"]
        return body

    def list_prefix(self, prefix: str) -> list[tuple[str, float]]:
        """Every key under ``prefix`` (at any depth), with its modification time."""
        found: list[tuple[str, float]] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                found.extend(
                    (o["Key"], o["LastModified"].timestamp()) for o in page.get("Contents", [])
                )
        except Exception as e:
            raise self._describe(e, "listing", self._where(prefix)) from e
        return found

    def put(self, key: str, body: IO[bytes], size: int, content_type: str) -> None:
        if size < MULTIPART_THRESHOLD:
            self.put_bytes(key, body.read(size), content_type)
            return
        self._multipart(body, key, content_type)

    def put_file(self, key: str, filename: str, size: int, content_type: str) -> None:
        if size < MULTIPART_THRESHOLD:
            with open(filename, "rb") as f:
                self.put_bytes(key, f.read(), content_type)
            return
        # By name, s3transfer reads each part in the thread that sends it:
        # about 50 MiB less memory than upload_fileobj, which reads ahead.
        self._multipart(filename, key, content_type)

    def _multipart(self, source: object, key: str, content_type: str) -> None:
        try:
            future = self._transfers.upload(
                source, self.bucket, key, extra_args={"ContentType": content_type}
            )
            future.result()
        except Exception as e:
            raise self._failed_upload(e, key) from e

    def start_upload(self, key: str, content_type: str) -> Upload | None:
        return S3Upload.start(
            self._client, self._parts_client, self.bucket, key, content_type, self._failed_upload
        )

    async def put_bytes_async(self, key: str, data: bytes, content_type: str) -> None:
        """``put_bytes``, awaited on the caller's event loop without a thread
        of its own (narinfos and small NARs, thousands at a time)."""
        if self._fast is None:
            await asyncio.to_thread(self.put_bytes, key, data, content_type)
            return
        try:
            await self._fast.request("PUT", key, data, content_type)
        except Exception as e:
            # Telling a missing bucket apart asks the server: not on the loop.
            raise await asyncio.to_thread(self._failed_upload, e, key) from e

    def requests_here(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A block within which the ``*_async`` requests are sent from the
        running loop itself (see DirectRequests.on_this_loop)."""
        if self._fast is None:
            return contextlib.nullcontext()
        return self._fast.on_this_loop()

    def close(self) -> None:
        """Close the connections of the small requests (also done at exit)."""
        if self._fast is not None:
            self._fast.close()

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        try:
            if self._fast is not None:
                self._fast.put(key, data, content_type)
            else:
                self._client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, ContentType=content_type
                )
        except Exception as e:
            raise self._failed_upload(e, key) from e


def _timestamp(value: object) -> float:
    """boto3's LastModified (a datetime) as Unix time."""
    return value.timestamp() if isinstance(value, datetime.datetime) else 0.0


def profile_exists(name: str) -> bool:
    """Whether boto3 finds the AWS profile ``name`` in this user's files."""
    return name in boto3.session.Session().available_profiles
