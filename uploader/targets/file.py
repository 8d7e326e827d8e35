"""A binary cache in a local directory (``file:///DIR``).

Objects are written to a temporary file in the destination directory and
renamed into place, so a reader never sees a partial NAR or narinfo.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import IO, BinaryIO

from uploader._exceptions import TargetError
from uploader.targets import KeyPage, ObjectPage, Upload
from uploader.targets.url import StoreUrl

__all__ = ["FileTarget"]


class FileTarget:
    """A binary cache directory on the local file system."""

    takes_parts = False

    def __init__(self, url: StoreUrl) -> None:
        self.url = url
        self.root = url.path

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise TargetError(f"refusing object key {key!r} outside the cache directory")
        return os.path.join(self.root, key)

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def list_keys(self, start_after: str) -> KeyPage | None:
        return None  # a stat per key is as cheap as reading the directory

    def list_objects(self, prefix: str, start_after: str) -> ObjectPage:
        directory = self._path(prefix) if prefix else self.root
        objects: list[tuple[str, int, float]] = []
        prefixes: list[str] = []
        try:
            with os.scandir(directory) as it:
                for e in it:
                    if e.name.startswith(".tmp-"):
                        continue  # an upload under way
                    if e.is_dir(follow_symlinks=False):
                        prefixes.append(prefix + e.name + "/")
                    elif e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        objects.append((prefix + e.name, st.st_size, st.st_mtime))
        except FileNotFoundError:
            if not prefix:
                raise TargetError(f"the cache {self.root} does not exist") from None
        except OSError as e:
            raise TargetError(f"listing {directory}: {e}") from e
        # One page: the directory was read whole anyway.
        return ObjectPage(
            tuple(sorted(o for o in objects if o[0] > start_after)),
            None,
            tuple(sorted(p for p in prefixes if p > start_after)),
        )

    def delete(self, key: str) -> None:
        path = self._path(key)
        # Empty directories stay: removing one would race with a writer
        # that has just made it.
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise TargetError(f"deleting {path}: {e}") from e

    def open_object(self, key: str) -> IO[bytes] | None:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TargetError(f"reading {self._path(key)}: {e}") from e

    def get(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TargetError(f"reading {self._path(key)}: {e}") from e

    def list_prefix(self, prefix: str) -> list[tuple[str, float]]:
        """Every key under ``prefix`` (a directory), with its modification time."""
        found: list[tuple[str, float]] = []
        top = self._path(prefix)
        for directory, _, files in os.walk(top):
            for name in files:
                if name.startswith(".tmp-"):
                    continue  # a write in progress
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    found.append((os.path.relpath(path, self.root), os.stat(path).st_mtime))
        return found

    def put(self, key: str, body: IO[bytes], size: int, content_type: str) -> None:
        self._write(key, lambda out: shutil.copyfileobj(body, out, 1 << 20))

    def put_file(self, key: str, filename: str, size: int, content_type: str) -> None:
        def copy(out: BinaryIO) -> None:
            with open(filename, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)

        self._write(key, copy)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self._write(key, lambda out: out.write(data))

    def start_upload(self, key: str, content_type: str) -> Upload | None:
        # A local file is renamed into place whole: compress into it first.
        return None

    def _write(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        dest = self._path(key)
        directory = os.path.dirname(dest)
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as out:
                    fill(out)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, dest)
            except BaseException:
                os.unlink(tmp)
                raise
            # The rename itself must reach the disk before the caller writes
            # the next object: else after a power cut a narinfo could survive
            # while the NAR it names (in nar/, another directory) did not.
            _fsync_directory(directory)
        except OSError as e:
            raise TargetError(f"writing {dest}: {e}") from e


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
