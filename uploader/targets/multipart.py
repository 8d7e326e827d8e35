"""An S3 multipart upload driven part by part: what lets a large NAR go out
while it is still being compressed (narstream.py).

boto3's own transfer manager wants a file or a readable stream and decides
itself when the upload completes; here the caller completes it only once the
NAR is verified, or aborts it, so that nothing unverified becomes visible
and no incomplete upload is left behind.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from uploader._exceptions import TargetError

__all__ = ["S3Upload"]


class S3Upload:
    """One multipart upload (CreateMultipartUpload already sent); its parts
    go through ``parts_client`` (the same bucket, payloads unsigned)."""

    def __init__(
        self,
        client: Any,
        parts_client: Any,
        bucket: str,
        key: str,
        upload_id: str,
        failed: Callable[[Exception, str, str], TargetError],
    ) -> None:
        self.key = key
        self._client = client
        self._parts_client = parts_client
        self._bucket = bucket
        self._id = upload_id
        self._failed = failed
        self._etags: dict[int, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def start(
        cls,
        client: Any,
        parts_client: Any,
        bucket: str,
        key: str,
        content_type: str,
        failed: Callable[[Exception, str, str], TargetError],
    ) -> S3Upload:
        try:
            resp = client.create_multipart_upload(Bucket=bucket, Key=key, ContentType=content_type)
        except Exception as e:
            raise failed(e, key, "uploading") from e
        return cls(client, parts_client, bucket, key, str(resp["UploadId"]), failed)

    def put_part(self, number: int, data: bytes | bytearray) -> None:
        try:
            # A bytearray is sent as it is; bytes would be wrapped in a
            # stream and sent 16 KiB at a time.
            resp = self._parts_client.upload_part(
                Bucket=self._bucket, Key=self.key, UploadId=self._id, PartNumber=number, Body=data
            )
        except Exception as e:
            raise self._failed(e, self.key, "uploading") from e
        with self._lock:
            self._etags[number] = str(resp["ETag"])

    def complete(self) -> None:
        with self._lock:
            parts = [{"ETag": etag, "PartNumber": n} for n, etag in sorted(self._etags.items())]
        try:
            self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self.key,
                UploadId=self._id,
                MultipartUpload={"Parts": parts},
            )
        except Exception as e:
            raise self._failed(e, self.key, "uploading") from e

    def abort(self) -> None:
        try:
            self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=self.key, UploadId=self._id
            )
        except Exception as e:
            raise self._failed(e, self.key, "aborting the upload of") from e
