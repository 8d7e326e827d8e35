"""What the publisher needs of the bucket beyond what the engine needs:
reading objects as streams, listing below a prefix, and deleting."""

from __future__ import annotations

from typing import IO, Protocol, cast

from uploader._exceptions import ConfigError
from uploader.targets import Target, open_target

__all__ = ["Bucket", "open_bucket"]


class Bucket(Target, Protocol):
    """A target the publisher can also list, stream from and delete from
    (both S3Target and FileTarget are)."""

    def open_read(self, key: str) -> IO[bytes] | None:
        """A stream of the object's bytes, or None when it does not exist."""
        ...

    def list_prefix(self, prefix: str) -> list[tuple[str, float]]:
        """Every key below ``prefix``, with its modification time (Unix seconds)."""
        ...

    def delete(self, key: str) -> None: ...


def open_bucket(url: str) -> Bucket:
    """The bucket a store URL names (``s3://…`` or ``file://…``)."""
    target = open_target(url)
    if not all(hasattr(target, m) for m in ("open_read", "list_prefix", "delete")):
        raise ConfigError(f"{url}: this kind of store cannot hold a quorum")
    return cast(Bucket, target)
