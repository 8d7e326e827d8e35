"""Large NARs compressed and uploaded at once: parts go out while later
parts are still being read and compressed.

The NAR is read from the store, hashed and compressed; the compressed bytes
are cut into parts of a multipart upload, a few in flight at a time across
all NARs (memory stays bounded whatever the NAR size).  Only when the whole
NAR has been read and its NarHash and NarSize equal what the Nix database
registered is the upload completed; otherwise, or on any failure, it is
aborted, and nothing becomes visible.

The object's name cannot be the hash of the compressed file, as Nix names
NARs: that is known only at the end.  It is ``nar/<NarHash>-<random>.nar.<ext>``:
a name no narinfo uses yet, so that an object a narinfo points to is never
replaced, even when two uploaders race (each completes its own object; the
narinfo written last wins, and the other object is an orphan that `verify`
reports and `gc` removes).  See docs/operations.md, "NAR object names".
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from uploader._exceptions import UploaderError, VerificationError
from uploader.compression import (
    compress_bytes,
    encoders,
    extension,
    open_compressor,
)
from uploader.nixbase32 import format_hash
from uploader.store import PathInfo
from uploader.targets import Upload

__all__ = [
    "PARTS_IN_FLIGHT",
    "PART_SIZE",
    "STREAM_ABOVE",
    "Compressed",
    "LateUpload",
    "NarStreamer",
    "compress_checked",
    "compress_whole",
    "stream_key",
]

log = logging.getLogger(__name__)

_MiB = 1 << 20
# NARs larger than this are streamed where the target takes parts: what
# S3 would receive in parts anyway.
STREAM_ABOVE = 16 * _MiB
# Parts being sent at once, across every NAR: with the part being filled,
# 42 MiB of compressed bytes in memory.  Six parts of 6 MiB rather than four
# of 8 MiB, in the same memory: a part the server is slow to take (SeaweedFS
# pauses whenever it opens a volume) holds back less of the compression.
# Through a 20 ms link, 6.40 s instead of 6.88 s for 1.44 GiB of NARs
# (docs/benchmarks.md, ninth round).  S3 wants parts of at least 5 MiB.
PART_SIZE = 6 * _MiB
PARTS_IN_FLIGHT = 6
# S3 allows 10,000 parts; the compressed NAR may exceed the NAR slightly.
_MAX_PARTS = 9000


@dataclass(frozen=True)
class Compressed:
    """What a narinfo says of the file: its hash and size."""

    file_hash: bytes
    file_size: int


class _Sink:
    """Where the compressor writes: counted, hashed, passed on."""

    def __init__(self, write: Callable[[bytes | memoryview], object]) -> None:
        self._write = write
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        self.size += len(data)
        self._write(data)
        return len(data)

    def flush(self) -> None:
        pass


def compress_checked(
    info: PathInfo,
    chunks: Iterable[bytes],
    write: Callable[[bytes | memoryview], object],
    method: str,
    level: int | None,
) -> Compressed:
    """Hash and compress the NAR ``chunks`` into ``write`` (a callable taking
    bytes); raise VerificationError unless they are the NAR the Nix database
    registered for ``info.path``."""
    sink = _Sink(write)
    threads = os.cpu_count() or 1
    nar_sha = hashlib.sha256()
    nar_size = 0
    # An xz encoder (or zstd's at a high level) waits for room (compression.py).
    with encoders.turn(method, level, size_hint=info.nar_size, threads=threads):
        compressor = open_compressor(
            method, sink,  # type: ignore[arg-type]
            level=level, size_hint=info.nar_size, threads=threads,
        )  # fmt: skip
        try:
            for chunk in chunks:
                nar_sha.update(chunk)
                nar_size += len(chunk)
                if nar_size > info.nar_size:
                    break  # already not what was registered: no need to read on
                compressor.write(chunk)
            compressor.close()
        finally:
            # zstd's writer is a C object that the cycle collector cannot
            # see into.  It holds the sink, which leads back to this frame
            # through a failed part's exception and its traceback: unless
            # dropped here, a failed upload kept its zstd context, two
            # threads and some 50 MiB for good.
            del compressor
    _check(info, nar_sha.digest(), nar_size)
    return Compressed(sink.sha.digest(), sink.size)


def compress_whole(
    info: PathInfo, chunks: Iterable[bytes], method: str, level: int | None
) -> tuple[bytes, Compressed]:
    """``compress_checked`` for a small NAR, compressed in one call: the
    compressed bytes, their hash and size."""
    nar = bytearray()
    for chunk in chunks:
        nar += chunk
        if len(nar) > info.nar_size:
            break
    _check(info, hashlib.sha256(nar).digest(), len(nar))
    data = compress_bytes(method, bytes(nar), level=level)
    return data, Compressed(hashlib.sha256(data).digest(), len(data))


def _check(info: PathInfo, nar_sha: bytes, nar_size: int) -> None:
    """Raise VerificationError unless the NAR read is the one registered."""
    nar_hash = format_hash(nar_sha)
    if nar_hash != info.nar_hash or nar_size != info.nar_size:
        # Reading stops once past the registered size: then neither the hash
        # nor the size read is the whole NAR's.
        found = (
            f"more than {info.nar_size} bytes"
            if nar_size > info.nar_size
            else f"{nar_hash}, {nar_size} bytes"
        )
        raise VerificationError(
            f"{info.path} differs from what the Nix database registered "
            f"(database: {info.nar_hash}, {info.nar_size} bytes; on disk: {found}); "
            f"refusing to sign it. Check it with `nix-store --verify-path {info.path}` "
            f"and repair with `nix-store --repair-path {info.path}`",
            store_path=info.path,
        )


def stream_key(info: PathInfo, method: str) -> str:
    """A fresh object name for this NAR (see the module's docstring)."""
    nar_hash = info.nar_hash.split(":", 1)[-1]
    return f"nar/{nar_hash}-{secrets.token_hex(8)}.nar{extension(method)}"


class _Parts:
    """The parts of one upload: cut, sent on the shared pool, awaited."""

    def __init__(self, streamer: NarStreamer, upload: Upload, part_size: int) -> None:
        self._streamer = streamer
        self._upload = upload
        self._part_size = part_size
        # The part being filled from zstd's output (pieces of about 128 KiB),
        # copied in once; sent as it is once full.
        self._buffer: bytearray | None = None
        self._filled = 0
        self._sent: list[Future[None]] = []

    def write(self, data: bytes | memoryview) -> None:
        piece = memoryview(data)
        while piece:
            if self._buffer is None:
                self._buffer = self._streamer.buffers.take(self._part_size)
                self._filled = 0
            # Every part but the last is exactly part_size (some S3
            # implementations refuse parts of different sizes).
            take = min(len(piece), self._part_size - self._filled)
            self._buffer[self._filled : self._filled + take] = piece[:take]
            self._filled += take
            piece = piece[take:]
            if self._filled == self._part_size:
                full, self._buffer = self._buffer, None
                self._send(full)

    def _send(self, data: bytes | bytearray) -> None:
        for sent in self._sent:
            if sent.done() and sent.exception() is not None:
                raise sent.exception()  # type: ignore[misc]
        self._streamer.room.acquire()
        number = len(self._sent) + 1
        try:
            self._sent.append(self._streamer.pool.submit(self._put, number, data))
        except BaseException:
            self._streamer.room.release()
            raise

    def _put(self, number: int, data: bytes | bytearray) -> None:
        try:
            self._upload.put_part(number, data)
        except BaseException as e:
            _let_go(e)
            raise
        finally:
            # Back in the pool before the room is: the next part takes it
            # instead of mapping a buffer of its own.
            if isinstance(data, bytearray) and len(data) == self._part_size:
                self._streamer.buffers.give(data)
            self._streamer.room.release()
            del data  # nor does this frame, which the error's traceback keeps

    def send_last(self) -> None:
        """Send the last part (once it has room: only then may the next NAR
        start filling a buffer of its own)."""
        if self._buffer is not None or not self._sent:
            last: bytes | bytearray = b""
            if self._buffer is not None:
                # Cut to its length in place, not copied out of it.
                last, self._buffer = self._buffer, None
                del last[self._filled :]
            self._send(last)

    def wait(self) -> None:
        """Until every part is in; raises the first part's failure."""
        for sent in self._sent:
            sent.result()

    def settle(self) -> None:
        """Wait for the parts in flight, whatever their outcome."""
        self._release()
        for sent in self._sent:
            sent.exception()

    def _release(self) -> None:
        if self._buffer is not None:
            self._streamer.buffers.give(self._buffer)
            self._buffer = None


def _let_go(error: BaseException) -> None:
    """Clear the finished frames of ``error``'s traceback.  They hold the
    part being sent or filled (6 MiB) and the NAR's last chunk for as long
    as the error is kept, and a failed upload's errors form reference
    cycles (a part's error, its frame, the parts, their futures) that only
    a garbage collection pass frees: a daemon whose uploads kept failing
    held some 80 MiB more until one ran."""
    traceback.clear_frames(error.__traceback__)


class _Buffers:
    """Part buffers, reused while NARs stream.

    A fresh 6 MiB buffer per part would be mapped by malloc, faulted in and
    zeroed page by page (1536 faults a part, 130,000 for 1.4 GiB of NARs),
    then unmapped again.  At most one buffer per part in flight plus the one
    being filled is kept, and none once no NAR is streaming, so an idle
    daemon holds nothing.
    """

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()
        self._users = 0

    def use(self) -> None:
        with self._lock:
            self._users += 1

    def done(self) -> None:
        with self._lock:
            self._users -= 1
            if not self._users:
                self._free.clear()

    def take(self, size: int) -> bytearray:
        with self._lock:
            for i, buffer in enumerate(self._free):
                if len(buffer) == size:
                    return self._free.pop(i)
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        with self._lock:
            if self._users and len(self._free) < self._keep:
                self._free.append(buffer)


class LateUpload:
    """An upload not begun yet: a NAR compressed ahead, while the cache is
    still being asked whether it lacks the NAR at all (``Engine``'s head
    start).  Its parts wait, each holding its room, until the upload is
    begun and attached, so no more than the streamer's parts in flight are
    compressed ahead; or until it is dropped, when they and the read of the
    NAR fail with ``Dropped`` and nothing was sent.  Nothing exists in the
    cache before ``attach``."""

    class Dropped(UploaderError):
        """The NAR was not wanted after all."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._ready = threading.Condition()
        self._upload: Upload | None = None
        self._dropped = False

    def attach(self, upload: Upload) -> bool:
        """Send the parts to ``upload`` (begun under ``key``); False when this
        was dropped (or failed) first, and ``upload`` is the caller's to abort."""
        with self._ready:
            if self._dropped:
                return False
            self._upload = upload
            self._ready.notify_all()
            return True

    def drop(self) -> None:
        """Not wanted: stop reading and compressing; abort what was begun."""
        with self._ready:
            self._dropped = True
            self._ready.notify_all()

    def fed(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """``chunks`` until dropped."""
        for chunk in chunks:
            if self._dropped:
                raise self.Dropped(f"{self.key}: not wanted after all")
            yield chunk

    def _begun(self) -> Upload:
        with self._ready:
            while self._upload is None and not self._dropped:
                self._ready.wait()
            if self._dropped:
                raise self.Dropped(f"{self.key}: not wanted after all")
            assert self._upload is not None
            return self._upload

    def put_part(self, number: int, data: bytes | bytearray) -> None:
        self._begun().put_part(number, data)

    def complete(self) -> None:
        self._begun().complete()

    def abort(self) -> None:
        with self._ready:
            self._dropped = True
            upload = self._upload
            self._ready.notify_all()
        if upload is not None:
            upload.abort()


class NarStreamer:
    """Streams large NARs into multipart uploads; shared by an engine's NARs."""

    def __init__(self, method: str, level: int | None) -> None:
        self.method = method
        self.level = level
        self.pool = ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="part")
        self.room = threading.BoundedSemaphore(PARTS_IN_FLIGHT)
        self.buffers = _Buffers(PARTS_IN_FLIGHT + 1)
        # zstd compresses one large NAR on every core: one at a time.  The
        # next starts as soon as the previous one's last part is on its way
        # (so at most one buffer per part in flight, plus the one being
        # filled, is in memory), while its parts are still being sent.  xz
        # compresses on one core: one NAR per core, as its memory allows
        # (compression.py), each filling a buffer of its own.
        self._compressing = threading.BoundedSemaphore(
            (os.cpu_count() or 1) if method == "xz" else 1
        )
        # Set when the engine is closed with uploads still running (a
        # daemon stopped past its drain timeout): they abort, not complete,
        # since no narinfo will name them.
        self._stopping = threading.Event()
        # The uploads being streamed, for a stop that cannot wait for them.
        self._under_way: set[Upload] = set()
        self._under_way_lock = threading.Lock()

    def stop(self) -> None:
        """Abort the uploads under way instead of completing them."""
        self._stopping.set()

    def close(self) -> None:
        self.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def abort_under_way(self, timeout: float) -> int:
        """Abort the uploads being streamed, at once and waiting at most
        ``timeout`` seconds for the cache to answer; how many there were.
        For a stop that cannot wait for their threads (a request may hang
        there for its whole timeout): left, they would stay in the bucket
        as incomplete uploads until a lifecycle rule removed them."""
        self.stop()
        with self._under_way_lock:
            uploads = list(self._under_way)

        def abort(upload: Upload) -> None:
            with contextlib.suppress(UploaderError):
                upload.abort()

        threads = [threading.Thread(target=abort, args=(u,), daemon=True) for u in uploads]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return len(uploads)

    def _unless_stopped(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if self._stopping.is_set():
                raise UploaderError("stopping: the upload is aborted")
            yield chunk

    def upload(self, info: PathInfo, upload: Upload, chunks: Iterable[bytes]) -> Compressed:
        """Complete ``upload`` with the compressed NAR once it is verified;
        abort it otherwise.  Runs in a worker thread."""
        part_size = max(PART_SIZE, -(-info.nar_size // _MAX_PARTS))
        parts = _Parts(self, upload, part_size)
        self.buffers.use()
        with self._under_way_lock:
            self._under_way.add(upload)
        try:
            with self._compressing:
                compressed = compress_checked(
                    info, self._unless_stopped(chunks), parts.write, self.method, self.level
                )
                parts.send_last()
            parts.wait()
            if self._stopping.is_set():
                raise UploaderError("stopping: the upload is aborted")
            upload.complete()
            return compressed
        except BaseException as e:
            parts.settle()
            _let_go(e)
            try:
                upload.abort()
            except UploaderError as abort_error:
                log.warning(
                    "%s: could not abort the incomplete upload of %s (%s); a bucket "
                    "lifecycle rule for incomplete multipart uploads removes it",
                    info.path, upload.key, abort_error,
                )  # fmt: skip
            if isinstance(e, OSError):
                raise UploaderError(f"{info.path}: reading its NAR: {e}") from e
            raise
        finally:
            with self._under_way_lock:
                self._under_way.discard(upload)
            self.buffers.done()
