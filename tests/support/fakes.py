"""Plain objects standing in for the local Nix and the bucket, for unit tests
of the engine and the daemon (side effects passed in, not mocked).

``FakeStore`` serves small directories as store paths and registers the hashes
Nix would; ``RecordingTarget`` keeps objects in memory and records, in order,
when each put began and when its object became visible (and, for uploads in
parts, each part and an abort).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from uploader import nar
from uploader._exceptions import TransientTargetError
from uploader.engine import narinfo_key
from uploader.narinfo import NarInfo
from uploader.nixbase32 import encode as nix32
from uploader.nixbase32 import format_hash
from uploader.store import PathInfo
from uploader.storepath import STORE_DIR, basename, is_store_path
from uploader.targets import KeyPage, ObjectPage, StoreUrl, Upload

__all__ = ["FakeStore", "MiB", "RecordingTarget"]

MiB = 1 << 20


class FakeStore:
    """Store paths backed by directories under ``root``, registered as Nix would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: dict[str, Path] = {}
        self._references: dict[str, tuple[str, ...]] = {}
        self._registered: dict[str, PathInfo] = {}
        self._lies: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        # Derivation path -> its outputs, for entries that name only a .drv.
        self.outputs_of: dict[str, list[str]] = {}

    def add(
        self,
        name: str,
        references: Iterable[str] = (),
        *,
        self_reference: bool = False,
        contents: bytes | None = None,
    ) -> str:
        """A new store path holding a directory (a data file, an executable
        and a symlink); the data file names the references, as in real outputs."""
        path = f"{STORE_DIR}/{nix32(hashlib.sha1(name.encode()).digest())}-{name}"
        assert is_store_path(path) and path not in self._dirs
        refs = sorted({*references, *([path] if self_reference else [])})
        directory = self.root / basename(path)
        (directory / "bin").mkdir(parents=True)
        data = contents if contents is not None else f"{name}\n{' '.join(refs)}\n".encode()
        (directory / "data").write_bytes(data)
        (directory / "bin" / name).write_bytes(b"#!/bin/sh\n")
        (directory / "bin" / name).chmod(0o755)
        (directory / "link").symlink_to("data")
        self._dirs[path] = directory
        self._references[path] = tuple(refs)
        return path

    def lie(self, path: str, **fields: Any) -> None:
        """Make the 'database' register ``fields`` (e.g. a wrong nar_hash) for ``path``."""
        self._lies[path] = fields

    def nar(self, path: str) -> bytes:
        return b"".join(nar.dump(str(self._dirs[path])))

    def registered(self, path: str) -> PathInfo:
        with self._lock:
            if path not in self._registered:
                data = self.nar(path)
                info = PathInfo(
                    path=path,
                    nar_hash=format_hash(hashlib.sha256(data).digest()),
                    nar_size=len(data),
                    references=self._references[path],
                )
                self._registered[path] = dataclasses.replace(info, **self._lies.get(path, {}))
            return self._registered[path]

    def closure(self, paths: Iterable[str]) -> set[str]:
        found: set[str] = set()
        todo = list(paths)
        while todo:
            path = todo.pop()
            if path not in found:
                found.add(path)
                todo.extend(self._references[path])
        return found

    # StoreView
    def path_infos(
        self, paths: Iterable[str], *, closure: bool = False, checked: bool = False
    ) -> dict[str, PathInfo]:
        wanted = self.closure(paths) if closure else set(paths)
        return {p: self.registered(p) for p in sorted(wanted)}

    def dump(self, path: str) -> Iterator[bytes]:
        return nar.dump(str(self._dirs[path]))

    # What the daemon also asks of the store.
    def invalid_paths(self, paths: Iterable[str]) -> set[str]:
        return {p for p in paths if p not in self._dirs and p not in self.outputs_of}

    def derivation_outputs(self, drv_paths: Iterable[str]) -> dict[str, list[str]]:
        return {d: sorted(self.outputs_of.get(d, [])) for d in drv_paths}

    def read_derivation_outputs(self, drv_paths: Iterable[str]) -> dict[str, list[str]]:
        return {d: sorted(self.outputs_of[d]) for d in drv_paths if d in self.outputs_of}


class RecordingTarget:
    """An in-memory binary cache that records ``(event, key)`` in order:
    ``begin`` when a put starts, ``put`` when its object becomes visible,
    ``fail`` when it was told to fail that key; for uploads in parts also
    ``part`` and ``abort``.  With ``parts=False`` it takes whole files only,
    as ``file://`` does."""

    def __init__(
        self, *, delay: float = 0.0, seed: int = 0, page: int | None = 1000, parts: bool = True
    ) -> None:
        self.url = StoreUrl(scheme="file", path="/in-memory", raw="memory:///in-memory")
        self.objects: dict[str, bytes] = {}
        # Last modified, as Unix time; objects set directly in ``objects`` count as old.
        self.mtimes: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.content_types: dict[str, str] = {}
        self.events: list[tuple[str, str]] = []
        self.exists_calls: list[str] = []
        # Keys per listing page; None: the target does not list.
        self.page = page
        self.list_calls: list[str] = []
        self.fail: set[str] = set()
        # When set, every request raises it (the whole cache is unusable).
        self.refuse: Exception | None = None
        self.spilled: dict[str, bool] = {}
        # Up to this many seconds of sleep per put, at random.
        self.delay = delay
        # Called (in the worker thread) before answering exists(key).
        self.before_exists: dict[str, Callable[[], object]] = {}
        self.takes_parts = parts
        # Uploads in parts begun and neither completed nor aborted.
        self.incomplete: set[str] = set()
        # When set, the part with this number fails.
        self.fail_part: int | None = None
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def _check_usable(self) -> None:
        if self.refuse is not None:
            raise self.refuse

    def exists(self, key: str) -> bool:
        self._check_usable()
        hook = self.before_exists.get(key)
        if hook is not None:
            hook()
        with self._lock:
            self.exists_calls.append(key)
            return key in self.objects

    def list_keys(self, start_after: str) -> KeyPage | None:
        self._check_usable()
        if self.page is None:
            return None
        with self._lock:
            self.list_calls.append(start_after)
            keys = sorted({k.split("/", 1)[0] + ("/" if "/" in k else "") for k in self.objects})
        after = [k for k in keys if k > start_after]
        page = after[: self.page]
        return KeyPage(frozenset(page), page[-1] if len(after) > self.page else None)

    def list_objects(self, prefix: str, start_after: str) -> ObjectPage:
        with self._lock:
            under = [k[len(prefix) :] for k in self.objects if k.startswith(prefix)]
            found = sorted(
                (prefix + rest, len(self.objects[prefix + rest]), self.mtimes[prefix + rest])
                for rest in under
                if "/" not in rest and prefix + rest > start_after
            )
            prefixes = sorted(
                {prefix + rest.split("/", 1)[0] + "/" for rest in under if "/" in rest}
            )
        return ObjectPage(tuple(found), None, tuple(p for p in prefixes if p > start_after))

    def delete(self, key: str) -> None:
        with self._lock:
            self.objects.pop(key, None)
            self.events.append(("delete", key))

    def open_object(self, key: str) -> IO[bytes] | None:
        data = self.get(key)
        return None if data is None else io.BytesIO(data)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self.objects.get(key)

    def put(self, key: str, body: IO[bytes], size: int, content_type: str) -> None:
        self.spilled[key] = False
        self._store(key, lambda: _read_exactly(body, size), content_type)

    def put_file(self, key: str, filename: str, size: int, content_type: str) -> None:
        self.spilled[key] = True

        def read() -> bytes:
            with open(filename, "rb") as f:
                return _read_exactly(f, size)

        self._store(key, read, content_type)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self._store(key, lambda: data, content_type)

    def start_upload(self, key: str, content_type: str) -> Upload | None:
        if not self.takes_parts:
            return None
        self._check_usable()
        with self._lock:
            self.events.append(("begin", key))
            self.incomplete.add(key)
        return _FakeUpload(self, key, content_type)

    def _store(self, key: str, read: Callable[[], bytes], content_type: str) -> None:
        self._check_usable()
        with self._lock:
            self.events.append(("begin", key))
            pause = self._random.uniform(0, self.delay) if self.delay else 0.0
        data = read()
        time.sleep(pause)
        with self._lock:
            if key in self.fail:
                self.events.append(("fail", key))
                raise TransientTargetError(f"uploading {key}: injected failure")
            self.objects[key] = data
            self.mtimes[key] = time.time()
            self.content_types[key] = content_type
            self.events.append(("put", key))

    def puts(self, since: int = 0) -> list[str]:
        """Keys of the objects made visible, in order, from event ``since`` on."""
        return [key for event, key in self.events[since:] if event == "put"]

    def narinfo(self, path: str) -> NarInfo | None:
        text = self.get(narinfo_key(path))
        return None if text is None else NarInfo.parse(text.decode())


class _FakeUpload:
    def __init__(self, target: RecordingTarget, key: str, content_type: str) -> None:
        self.key = key
        self._target = target
        self._content_type = content_type
        self._parts: dict[int, bytes] = {}

    def put_part(self, number: int, data: bytes | bytearray) -> None:
        target = self._target
        with target._lock:
            target.events.append(("part", self.key))
            if number == target.fail_part:
                raise TransientTargetError(f"uploading {self.key}: injected failure")
            self._parts[number] = bytes(data)  # lent: refilled after the call

    def complete(self) -> None:
        target = self._target
        with target._lock:
            assert sorted(self._parts) == list(range(1, len(self._parts) + 1))
            target.objects[self.key] = b"".join(self._parts[n] for n in sorted(self._parts))
            target.content_types[self.key] = self._content_type
            target.incomplete.discard(self.key)
            target.events.append(("put", self.key))

    def abort(self) -> None:
        with self._target._lock:
            self._target.incomplete.discard(self.key)
            self._target.events.append(("abort", self.key))


def _read_exactly(body: IO[bytes], size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        piece = body.read(min(MiB, size - len(out)))
        assert piece, f"body ended after {len(out)} of {size} bytes"
        out += piece
    return bytes(out)
