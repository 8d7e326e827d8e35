"""The targets against what they write to: real S3 buckets (SeaweedFS, moto) and a real
directory.  Objects must come back byte for byte, over S3 and over the
anonymous HTTP GET that substituters use."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from tests.support.fakes import FakeStore
from tests.support.requirements import require_binary
from tests.support.services import S3Server, SeaweedFS, free_ports, start_seaweedfs
from uploader import signing
from uploader._exceptions import TargetError, TransientTargetError
from uploader.engine import Engine
from uploader.nixbase32 import encode as nix32
from uploader.targets import open_target
from uploader.targets.file import FileTarget
from uploader.targets.multipart import S3Upload
from uploader.targets.s3 import MULTIPART_THRESHOLD, S3Target
from uploader.targets.url import parse_store_url

pytestmark = pytest.mark.integration

MiB = 1 << 20
NAR = "application/x-nix-nar"
NARINFO = "text/x-nix-narinfo"


def s3_target(weed: S3Server, bucket: str, **options: int) -> S3Target:
    return S3Target(parse_store_url(weed.store_url(bucket)), **options)


# S3 ----------------------------------------------------------------------------------


def test_exists_and_get_see_only_what_was_put(s3: S3Server, bucket: str) -> None:
    target = open_target(s3.store_url(bucket))
    assert isinstance(target, S3Target)
    key = "0123456789abcdfghijklmnpqrsvwxyz.narinfo"
    assert target.exists(key) is False
    assert target.get(key) is None

    target.put_bytes(key, b"StorePath: x\n", NARINFO)

    assert target.exists(key) is True
    assert target.get(key) == b"StorePath: x\n"
    assert s3.get(bucket, key) == b"StorePath: x\n"


def test_small_requests_share_one_thread_and_await_without_one(s3: S3Server, bucket: str) -> None:
    """The direct route: every bucket's requests on one event loop thread,
    awaited from the caller's loop; the signature is in the headers."""
    targets = [s3_target(s3, bucket) for _ in range(12)]
    for i, target in enumerate(targets):
        target.put_bytes(f"k{i}", b"x", NARINFO)

    async def many() -> list[bool]:
        puts = [targets[0].put_bytes_async(f"a{i}", b"y" * i, NARINFO) for i in range(200)]
        await asyncio.gather(*puts)
        return await asyncio.gather(*(t.exists_async(f"k{i}") for i, t in enumerate(targets)))

    before = threading.active_count()
    assert asyncio.run(many()) == [True] * len(targets)
    assert threading.active_count() <= before, "no thread per request"
    names = [t.name for t in threading.enumerate()]
    assert names.count("s3-requests") == 1, names
    assert all(s3.get(bucket, f"a{i}") == b"y" * i for i in range(200))
    assert asyncio.run(targets[1].exists_async("nothing-here")) is False
    for target in targets:
        target.close()


@pytest.fixture(scope="module")
def checking_seaweedfs() -> Iterator[SeaweedFS]:
    """A SeaweedFS that checks the signature of every request."""
    require_binary("weed")
    server = start_seaweedfs(credentials=("ncu-signed", "s3cr/et+with=chars"))
    yield server
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.mark.parametrize("route", ["direct", "boto3"])
def test_requests_pass_a_server_that_checks_signatures(
    checking_seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """SeaweedFS and moto elsewhere accept any signature; this one does not."""
    server = checking_seaweedfs
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ncu-signed")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr/et+with=chars")
    bucket = server.create_bucket(f"signed-{route}")
    target = s3_target(server, bucket)
    if route == "boto3":
        target._fast = None
    keys = ["nix-cache-info", "nar/x y+z~é.nar.zst", f"{nix32(os.urandom(20))}.narinfo"]
    for key in keys:
        target.put_bytes(key, key.encode(), NARINFO)
    assert asyncio.run(target.exists_async(keys[2])) is True
    asyncio.run(target.put_bytes_async("nar/async ü.nar", b"a", NAR))
    assert [target.get(k) for k in keys] == [k.encode() for k in keys]
    page = target.list_objects("nar/", "nar/x")
    assert [k for k, _, _ in page.objects] == ["nar/x y+z~é.nar.zst"]
    target.delete(keys[1])
    assert target.exists(keys[1]) is False

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    wrong = s3_target(server, bucket)
    if route == "boto3":
        wrong._fast = None
    with pytest.raises(TargetError) as refused:
        wrong.put_bytes("other.narinfo", b"x", NARINFO)
    assert "the AWS credentials were refused (SignatureDoesNotMatch)" in str(refused.value)
    # Where the service's credentials are: as its unit names them (NixOS).
    monkeypatch.setenv("NIX_CACHE_UPLOADER_ENVIRONMENT_FILE", "/run/secrets/ncu.env")
    with pytest.raises(TargetError) as refused:
        wrong.put_bytes("other.narinfo", b"x", NARINFO)
    assert "(for the service: /run/secrets/ncu.env)" in str(refused.value)
    monkeypatch.setenv("NIX_CACHE_UPLOADER_ENVIRONMENT_FILE", "")
    with pytest.raises(TargetError) as refused:
        wrong.put_bytes("other.narinfo", b"x", NARINFO)
    assert str(refused.value).endswith(
        "check or renew them and the region (the service reads no environment file: they "
        "come from its AWS profile or the instance role; "
        "services.nix-cache-uploader.environmentFile on NixOS gives it one)"
    )


def test_parts_go_with_an_unsigned_payload_past_a_server_that_checks_signatures(
    checking_seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed NAR's parts carry UNSIGNED-PAYLOAD (their headers are still
    signed: a wrong secret is refused); the other requests sign their body."""
    server = checking_seaweedfs
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ncu-signed")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr/et+with=chars")
    bucket = server.create_bucket("signed-parts")
    target = s3_target(server, bucket)
    payloads: dict[str, set[str]] = {}

    def record(request: Any, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[1]
        value = request.headers["X-Amz-Content-SHA256"]  # bytes once prepared
        payloads.setdefault(operation, set()).add(
            value.decode() if isinstance(value, bytes) else value
        )

    for client in (target._client, target._parts_client):
        client.meta.events.register("before-send.s3", record)
    parts = [bytearray(os.urandom(5 * MiB)), b"the last part"]
    upload = target.start_upload("nar/streamed.nar.zst", NAR)
    assert upload is not None
    for number, data in enumerate(parts, 1):
        upload.put_part(number, data)
    upload.complete()

    assert target.get("nar/streamed.nar.zst") == b"".join(parts)
    assert payloads["UploadPart"] == {"UNSIGNED-PAYLOAD"}
    signed = payloads["CreateMultipartUpload"] | payloads["CompleteMultipartUpload"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", p) for p in signed), signed

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    wrong = s3_target(server, bucket)
    other = target.start_upload("nar/other.nar.zst", NAR)  # by the right key
    assert other is not None
    refused = S3Upload(
        wrong._client, wrong._parts_client, bucket, other.key, other._id, wrong._failed_upload
    )
    with pytest.raises(TargetError, match="SignatureDoesNotMatch"):
        refused.put_part(1, bytearray(b"x" * 1024))
    other.abort()


def test_large_nar_goes_multipart_and_reads_back(s3: S3Server, bucket: str) -> None:
    target = s3_target(s3, bucket)
    data = os.urandom(MULTIPART_THRESHOLD + 3 * MiB)
    key = "nar/large.nar.zst"

    target.put(key, io.BytesIO(data), len(data), NAR)

    head = s3.client().head_object(Bucket=bucket, Key=key)
    # Multipart ETags are "<md5 of part md5s>-<number of parts>".
    assert "-" in head["ETag"].strip('"'), head["ETag"]
    assert head["ContentType"] == NAR
    assert head["ContentLength"] == len(data)
    assert target.get(key) == data
    assert s3.get(bucket, key) == data


def test_put_reads_size_bytes_from_the_current_position(s3: S3Server, bucket: str) -> None:
    target = s3_target(s3, bucket)
    body = io.BytesIO(b"skipped|the NAR")
    body.seek(len(b"skipped|"))

    target.put("nar/small.nar", body, len(b"the NAR"), NAR)

    assert s3.get(bucket, "nar/small.nar") == b"the NAR"


def test_content_types_are_set(s3: S3Server, bucket: str) -> None:
    target = s3_target(s3, bucket)
    nar = os.urandom(1000)
    target.put("nar/small.nar.xz", io.BytesIO(nar), len(nar), NAR)
    target.put_bytes("abc.narinfo", b"StorePath: x\n", NARINFO)

    client = s3.client()
    assert client.head_object(Bucket=bucket, Key="nar/small.nar.xz")["ContentType"] == NAR
    assert client.head_object(Bucket=bucket, Key="abc.narinfo")["ContentType"] == NARINFO
    assert s3.get(bucket, "nar/small.nar.xz") == nar


@pytest.mark.parametrize("size", [100, MULTIPART_THRESHOLD + MiB], ids=["single", "multipart"])
def test_missing_bucket_is_named_as_such(s3: S3Server, size: int) -> None:
    target = s3_target(s3, "no-such-bucket-here")
    # HEAD and GET of a key in a missing bucket just say "not there".
    assert target.exists("nix-cache-info") is False
    assert target.get("nix-cache-info") is None

    with pytest.raises(TargetError) as error:
        target.put("nar/x.nar", io.BytesIO(bytes(size)), size, NAR)

    assert not isinstance(error.value, TransientTargetError), "retrying will not create it"
    assert "the bucket does not exist" in str(error.value)
    assert "s3://no-such-bucket-here/nar/x.nar" in str(error.value)


def fill(target: S3Target, keys: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: target.put_bytes(k, b"x", NARINFO), keys))


@pytest.mark.parametrize("route", ["direct", "boto3"])
def test_listing_pages_through_the_top_level(s3: S3Server, bucket: str, route: str) -> None:
    target = s3_target(s3, bucket)
    if route == "boto3":
        target._fast = None  # as with a proxy configured
    narinfos = sorted(f"{nix32(os.urandom(20))}.narinfo" for _ in range(1150))
    fill(target, [*narinfos, "nix-cache-info", "nar/a.nar.zst", "nar/b.nar.zst", "log/x.drv"])
    listed: list[str] = []
    start = ""

    while True:
        page = target.list_keys(start)
        assert page is not None
        assert all(k > start for k in page.keys)
        listed += sorted(page.keys)
        if page.last is None:
            break
        assert max(page.keys) == page.last
        start = page.last

    assert listed == sorted([*narinfos, "nix-cache-info", "nar/", "log/"])
    # Started between keys: the page begins at the next one.
    middle = target.list_keys(narinfos[700][:-1])
    assert middle is not None and min(middle.keys) == narinfos[700]
    assert middle.last is None


@pytest.mark.parametrize("route", ["direct", "boto3"])
def test_object_listing_pages_with_sizes(s3: S3Server, bucket: str, route: str) -> None:
    target = s3_target(s3, bucket)
    if route == "boto3":
        target._fast = None
    started = time.time()
    nars = {f"nar/{nix32(os.urandom(32))}.nar.zst": n for n in range(1, 1031)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: target.put_bytes(kv[0], b"n" * kv[1], NAR), nars.items()))
    target.put_bytes("nix-cache-info", b"StoreDir: /nix/store\n", "text/plain")
    target.put_bytes("log/x.drv", b"log", "text/plain")

    def walk(prefix: str) -> dict[str, int]:
        found: dict[str, int] = {}
        start = ""
        while True:
            page = target.list_objects(prefix, start)
            found.update((key, size) for key, size, _ in page.objects)
            if page.last is None:
                return found
            start = page.last

    assert walk("nar/") == nars
    assert walk("") == {"nix-cache-info": 21}  # nar/ and log/ are not objects at the top
    top = target.list_objects("", "")
    assert top.prefixes == ("log/", "nar/")
    (modified,) = [t for _, _, t in top.objects]
    assert started - 5 <= modified <= time.time() + 5  # the server's clock, in Unix time
    gone = sorted(nars)[0]
    target.delete(gone)
    target.delete(gone)  # not there any more: no error
    assert gone not in walk("nar/") and len(walk("nar/")) == len(nars) - 1
    assert target.get("nix-cache-info") == b"StoreDir: /nix/store\n"
    body = target.open_object("log/x.drv")
    assert body is not None and body.read() == b"log"
    body.close()
    assert target.open_object("log/y.drv") is None


def test_engine_lookup_against_a_real_bucket(s3: S3Server, bucket: str) -> None:
    target = s3_target(s3, bucket)
    present = [f"{nix32(os.urandom(20))}.narinfo" for _ in range(300)]
    absent = [f"{nix32(os.urandom(20))}.narinfo" for _ in range(300)]
    fill(target, present)
    engine = Engine(FakeStore(Path("/")), target, signing.generate("c-1"))
    try:
        assert asyncio.run(engine._lookup(present + absent)) == set(present)
    finally:
        engine.close()


def test_a_bucket_that_may_not_be_listed_falls_back_to_heads(s3: S3Server, bucket: str) -> None:
    target = s3_target(s3, bucket)
    target._fast = None
    denied = botocore.exceptions.ClientError(
        {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
        "ListObjectsV2",
    )
    calls = []

    def deny(**kwargs: object) -> None:
        calls.append(kwargs)
        raise denied

    target._client.list_objects_v2 = deny
    assert target.list_keys("") is None
    assert target.list_keys("") is None
    assert len(calls) == 1, "asked once, then not again"


def test_server_down_is_transient(tmp_path: Path) -> None:
    require_binary("weed")
    weed = start_seaweedfs(str(tmp_path))
    try:
        bucket = weed.create_bucket("going-away")
        target = s3_target(weed, bucket, max_attempts=1)
        target.put_bytes("nix-cache-info", b"StoreDir: /nix/store\n", "text/x-nix-cache-info")
    finally:
        weed.stop()

    for attempt in (
        lambda: target.exists("nix-cache-info"),
        lambda: target.get("nix-cache-info"),
        lambda: target.put_bytes("abc.narinfo", b"x", NARINFO),
        lambda: target.list_keys(""),
    ):
        with pytest.raises(TransientTargetError, match=r"s3://going-away/.*connect"):
            attempt()


def test_closed_port_is_transient() -> None:
    (port,) = free_ports(1)
    target = S3Target(
        parse_store_url(f"s3://nobody-home?endpoint=http://127.0.0.1:{port}"), max_attempts=1
    )
    with pytest.raises(TransientTargetError, match="checking s3://nobody-home/k"):
        target.exists("k")


# Directory ---------------------------------------------------------------------------


def file_target(directory: Path) -> FileTarget:
    target = open_target(f"file://{directory}")
    assert isinstance(target, FileTarget)
    return target


def leftovers(directory: Path) -> list[str]:
    return [str(p) for p in directory.rglob(".tmp-*")]


def test_file_target_writes_whole_objects(tmp_path: Path) -> None:
    target = file_target(tmp_path / "cache")
    data = os.urandom(3 * MiB)
    assert target.exists("nar/a.nar") is False
    assert target.get("nar/a.nar") is None

    target.put("nar/a.nar", io.BytesIO(data), len(data), NAR)
    target.put_bytes("abc.narinfo", b"StorePath: x\n", NARINFO)

    assert target.exists("nar/a.nar") and target.get("nar/a.nar") == data
    assert (tmp_path / "cache" / "abc.narinfo").read_bytes() == b"StorePath: x\n"
    # Readable by whoever serves the directory, whatever the umask.
    assert stat.S_IMODE((tmp_path / "cache" / "nar" / "a.nar").stat().st_mode) == 0o644
    assert leftovers(tmp_path) == []


class BrokenBody(io.BytesIO):
    """A body that fails after handing out some bytes."""

    def read(self, size: int | None = -1, /) -> bytes:
        if self.tell():
            raise OSError("disk read error")
        return super().read(4)


def test_file_target_failed_write_leaves_the_old_object(tmp_path: Path) -> None:
    target = file_target(tmp_path)
    target.put_bytes("nar/a.nar", b"old", NAR)

    with pytest.raises(TargetError, match="disk read error"):
        target.put("nar/a.nar", BrokenBody(b"half of it"), 100, NAR)

    assert target.get("nar/a.nar") == b"old"
    assert leftovers(tmp_path) == []


def test_file_target_lists_objects_with_sizes(tmp_path: Path) -> None:
    target = file_target(tmp_path)
    target.put_bytes("nar/b.nar", b"bb", NAR)
    target.put_bytes("nar/a.nar", b"a", NAR)
    target.put_bytes("x.narinfo", b"xyz", NARINFO)
    (tmp_path / "nar" / ".tmp-partial").write_bytes(b"half")  # an upload under way

    def listed(prefix: str, start: str = "") -> list[tuple[str, int]]:
        return [(key, size) for key, size, _ in target.list_objects(prefix, start).objects]

    assert listed("nar/") == [("nar/a.nar", 1), ("nar/b.nar", 2)]
    assert listed("nar/", "nar/a.nar") == [("nar/b.nar", 2)]
    assert listed("") == [("x.narinfo", 3)]
    assert target.list_objects("", "").prefixes == ("nar/",)
    assert listed("log/") == []
    before = time.time()
    target.put_bytes("nar/a.nar", b"new", NAR)
    (modified,) = [t for key, _, t in target.list_objects("nar/", "").objects if key == "nar/a.nar"]
    assert modified >= before - 1
    target.delete("nar/a.nar")
    target.delete("nar/a.nar")  # gone already: no error
    assert listed("nar/") == [("nar/b.nar", 2)]


@pytest.mark.parametrize("key", ["../escape", "nar/../../escape", "/etc/passwd", ".."])
def test_file_target_refuses_keys_outside_the_cache(tmp_path: Path, key: str) -> None:
    target = file_target(tmp_path / "cache")
    with pytest.raises(TargetError, match="outside the cache directory"):
        target.put_bytes(key, b"x", NARINFO)
    with pytest.raises(TargetError, match="outside the cache directory"):
        target.exists(key)
    assert not (tmp_path / "escape").exists()


def test_file_target_unwritable_directory_is_a_target_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    target = file_target(blocker / "cache")
    with pytest.raises(TargetError, match=r"writing .*not-a-dir/cache/abc\.narinfo"):
        target.put_bytes("abc.narinfo", b"x", NARINFO)
