"""What the publisher needs of the bucket beyond what the engine needs:
listing below a prefix, and deleting."""

from __future__ import annotations

from typing import Protocol, cast

from uploader._exceptions import ConfigError
from uploader.targets import Target, open_target

__all__ = ["Bucket", "open_bucket"]


class Bucket(Target, Protocol):
    """A target the publisher can also list below a prefix and delete from
    (both S3Target and FileTarget are)."""

    def list_prefix(self, prefix: str) -> list[tuple[str, float]]:
        """Every key below ``prefix``, with its modification time (Unix seconds)."""
        ...

    def delete(self, key: str) -> None: ...


def open_bucket(url: str) -> Bucket:
    """The bucket a store URL names (``s3://…`` or ``file://…``)."""
    target = open_target(url)
    if not all(hasattr(target, m) for m in ("list_prefix", "delete")):
        raise ConfigError(f"{url}: this kind of store cannot hold a quorum")
    return cast(Bucket, target)
