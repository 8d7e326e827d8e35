"""`nix-cache-uploader push` against a real nix-daemon and real S3 servers (SeaweedFS, moto),
checked by the only judge that matters: a fresh Nix store substituting from
the bucket with signature checking on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.cli import KeyPair, make_keys, run_cli
from tests.support.nix import (
    build,
    dotted_expr,
    instantiate,
    multi_output_expr,
    nix_path_info,
    random_blob_expr,
    substitute,
)
from tests.support.services import NixDaemon, S3Server
from tests.support.tmpfs import small_tmpfs
from uploader.narinfo import NarInfo
from uploader.storepath import hash_part

pytestmark = pytest.mark.integration


def _objects(s3: S3Server, bucket: str) -> dict[str, tuple[str, object]]:
    """Every object in the bucket: key -> (ETag, LastModified)."""
    client = s3.client()
    found: dict[str, tuple[str, object]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = (obj["ETag"], obj["LastModified"])
    return found


@pytest.fixture
def multi(nix_daemon: NixDaemon) -> dict[str, str]:
    """A fresh dependency + two-output derivation; returns name -> store path."""
    expr = multi_output_expr()
    out = build(expr)[0]
    lib = build(expr, attr="lib")[0]
    info = nix_path_info([out], recursive=True)
    dep = next(p for p in info if p not in (out, lib))
    return {"out": out, "lib": lib, "dep": dep}


@pytest.mark.parametrize("compression", ["zstd", "xz", "none"])
def test_pushed_closure_substitutes_into_a_fresh_store(
    s3: S3Server,
    bucket: str,
    keys: KeyPair,
    multi: dict[str, str],
    tmp_path: Path,
    compression: str,
) -> None:
    url = s3.store_url(bucket, compression=compression)
    result = run_cli("push", "--to", url, "--secret-key-file", keys.secret_file, multi["out"])
    assert "uploaded 3 paths" in result.stderr

    # The narinfos say what Nix registered, with the method asked for.
    registered = nix_path_info(list(multi.values()))
    for path in multi.values():
        text = s3.get(bucket, f"{hash_part(path)}.narinfo")
        assert text is not None, f"no narinfo for {path}"
        info = NarInfo.parse(text.decode())
        assert info.compression == compression
        assert info.nar_size == registered[path]["narSize"]
        assert s3.get(bucket, info.url) is not None

    dest = str(tmp_path / "fresh")
    copied = substitute(s3.http_url(bucket), [multi["out"]], keys.public, dest=dest)
    assert copied.returncode == 0, copied.stderr
    for path in multi.values():
        assert Path(dest + path).exists(), f"{path} was not substituted"
    assert (Path(dest + multi["out"]) / "share/self").read_text().strip() == multi["out"]


def test_a_different_public_key_is_refused(
    s3: S3Server, bucket: str, keys: KeyPair, multi: dict[str, str], tmp_path: Path
) -> None:
    run_cli("push", "--to", s3.store_url(bucket), "--secret-key-file", keys.secret_file,
            multi["out"])  # fmt: skip
    other = make_keys(tmp_path, "someone-else-1")
    copied = substitute(
        s3.http_url(bucket), [multi["out"]], other.public, dest=str(tmp_path / "fresh")
    )
    assert copied.returncode != 0
    assert "lacks a valid signature" in copied.stderr


def test_second_push_transfers_nothing(
    s3: S3Server, bucket: str, keys: KeyPair, multi: dict[str, str]
) -> None:
    args = ["push", "--to", s3.store_url(bucket), "--secret-key-file", keys.secret_file]
    run_cli(*args, multi["out"], multi["lib"])

    def cache_objects() -> object:  # without the roots each push records for gc
        return {k: v for k, v in _objects(s3, bucket).items() if "/roots/" not in k}

    before = cache_objects()
    again = run_cli(*args, multi["out"], multi["lib"])
    assert "uploaded 0 paths" in again.stderr
    # The walk stops at present roots: their closures are taken as there.
    assert "2 already in the cache with their closures" in again.stderr
    assert cache_objects() == before


def test_result_symlink_is_accepted(
    s3: S3Server, bucket: str, keys: KeyPair, multi: dict[str, str], tmp_path: Path
) -> None:
    link = tmp_path / "result"
    link.symlink_to(multi["lib"])
    run_cli("push", "--to", s3.store_url(bucket), "--secret-key-file", keys.secret_file,
            str(link))  # fmt: skip
    assert s3.get(bucket, f"{hash_part(multi['lib'])}.narinfo") is not None


def test_altered_path_is_refused_and_its_referrers_held_back(
    s3: S3Server, bucket: str, keys: KeyPair, multi: dict[str, str]
) -> None:
    data = Path(multi["lib"]) / "lib/data"
    original = data.read_bytes()
    data.write_bytes(b"tampered after the build\n")
    try:
        result = run_cli(
            "push", "--to", s3.store_url(bucket), "--secret-key-file", keys.secret_file,
            multi["out"], check=False,
        )  # fmt: skip
    finally:
        data.write_bytes(original)
    assert result.returncode == 1
    assert multi["lib"] in result.stderr
    assert "differs from what the Nix database registered" in result.stderr
    for refused in (multi["lib"], multi["out"]):
        assert s3.get(bucket, f"{hash_part(refused)}.narinfo") is None
    # The unaffected dependency still made it.
    assert s3.get(bucket, f"{hash_part(multi['dep'])}.narinfo") is not None


def test_file_cache_substitutes(keys: KeyPair, multi: dict[str, str], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_cli("push", "--to", f"file://{cache}", "--secret-key-file", keys.secret_file,
            multi["out"])  # fmt: skip
    assert (cache / "nix-cache-info").read_text().startswith("StoreDir: /nix/store\n")
    copied = substitute(f"file://{cache}", [multi["out"]], keys.public, dest=str(tmp_path / "f"))
    assert copied.returncode == 0, copied.stderr


def test_group_readable_key_is_refused(
    s3: S3Server, bucket: str, keys: KeyPair, multi: dict[str, str]
) -> None:
    os.chmod(keys.secret_file, 0o640)
    result = run_cli("push", "--to", s3.store_url(bucket), "--secret-key-file",
                     keys.secret_file, multi["out"], check=False)  # fmt: skip
    assert result.returncode == 1
    assert "chmod 600" in result.stderr
    assert s3.get(bucket, f"{hash_part(multi['out'])}.narinfo") is None


@pytest.mark.slow
def test_large_nar_streams_with_bounded_memory(
    nix_daemon: NixDaemon, s3: S3Server, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    """A 300 MiB NAR goes up in multipart parts without the uploader holding it."""
    (path,) = build(random_blob_expr("big", 314572800))
    proc = subprocess.Popen(
        [sys.executable, "-m", "uploader", "push", "--to", s3.store_url(bucket),
         "--secret-key-file", keys.secret_file, path],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # VmHWM belongs to the process image after exec; wait4's ru_maxrss would
    # also count the forked copy of this (large) test process.
    peak_kib = 0
    while proc.poll() is None:
        peak_kib = max(peak_kib, _vm_hwm_kib(proc.pid))
        time.sleep(0.02)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, stderr
    assert peak_kib > 0, "no memory sample taken"
    peak_mib = peak_kib / 1024
    assert peak_mib < 200, f"push peaked at {peak_mib:.0f} MiB RSS for a 300 MiB NAR"

    copied = substitute(s3.http_url(bucket), [path], keys.public, dest=str(tmp_path / "f"))
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / f"f{path}/blob").stat().st_size == 314572800


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def test_pushing_a_derivation_uploads_it_and_its_closure_like_nix_copy_derivation(
    s3: S3Server, bucket: str, keys: KeyPair, nix_daemon: NixDaemon, tmp_path: Path
) -> None:
    """A .drv (here never built) is a store path like any other: its closure
    is the derivations and sources it was made from."""
    drv = instantiate(multi_output_expr())
    closure = nix_path_info([drv], recursive=True, derivation=True)
    assert len(closure) == 2 and all(p.endswith(".drv") for p in closure)
    result = run_cli("push", "--to", s3.store_url(bucket),
                     "--secret-key-file", keys.secret_file, drv)  # fmt: skip
    assert "uploaded 2 paths" in result.stderr
    for path in closure:
        assert s3.get(bucket, f"{hash_part(path)}.narinfo") is not None
    dest = str(tmp_path / "fresh")
    copied = substitute(s3.http_url(bucket), [drv], keys.public, dest=dest, derivation=True)
    assert copied.returncode == 0, copied.stderr
    assert Path(dest + drv).read_bytes() == Path(drv).read_bytes()


def test_nix_store_url_parameters_are_honoured(
    keys: KeyPair, multi: dict[str, str], tmp_path: Path
) -> None:
    """secret-key= signs (Nix's own way), priority= and want-mass-query= reach nix-cache-info."""
    cache = tmp_path / "cache"
    url = f"file://{cache}?secret-key={keys.secret_file}&priority=30&want-mass-query=false"
    result = run_cli("push", "--to", url, multi["lib"])
    assert "uploaded 1 path (" in result.stderr
    assert (cache / "nix-cache-info").read_text() == (
        "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 30\n"
    )
    dest = str(tmp_path / "fresh")
    copied = substitute(f"file://{cache}", [multi["lib"]], keys.public, dest=dest)
    assert copied.returncode == 0, copied.stderr


def test_a_push_nix_refuses_leaves_no_cache_directory(
    nix_daemon: NixDaemon, keys: KeyPair, tmp_path: Path
) -> None:
    ghost = f"/nix/store/{'a' * 32}-never-built-{uuid.uuid4().hex[:8]}"
    cache = tmp_path / "typo"
    result = run_cli("push", "--to", f"file://{cache}", "--secret-key-file", keys.secret_file,
                     ghost, check=False)  # fmt: skip
    assert result.returncode == 1
    assert f"{ghost} is not valid in the local Nix store" in result.stderr
    assert not cache.exists(), "an empty cache directory made for nothing"


def test_a_full_temporary_directory_says_where_and_what_to_do(
    nix_daemon: NixDaemon, keys: KeyPair, tmp_path: Path
) -> None:
    """A NAR over 8 MiB waits for its upload in a temporary file: a full
    disk there fails the path in one line that names the place, and the
    same push goes through once there is room."""
    path = build(random_blob_expr("tmp-full", 10 << 20))[0]
    cache = f"file://{tmp_path / 'cache'}"
    push = ("push", "--to", cache, "--secret-key-file", keys.secret_file, path)
    with small_tmpfs(tmp_path / "small", "1m") as small:
        full = run_cli(*push, check=False, env={**os.environ, "TMPDIR": str(small)})
        assert full.returncode == 1
        (line,) = [x for x in full.stderr.splitlines() if x.startswith("error:")]
        assert line == (
            f"error: {path}: no space left in {small} for its compressed NAR (10.0 MiB before "
            "compression): free space there, or point the tmp-dir setting (or TMPDIR) at a "
            "larger disk"
        )
        assert list(small.iterdir()) == [], "no temporary file left behind"
    run_cli(*push)
    assert (tmp_path / "cache" / f"{hash_part(path)}.narinfo").exists()


def test_a_closure_with_names_that_start_with_a_period_is_pushed(
    s3: S3Server, bucket: str, keys: KeyPair, nix_daemon: NixDaemon, tmp_path: Path
) -> None:
    """Valid since Nix 2.4 (NixOS/nix#912): pushed and substituted like any other."""
    (top,) = build(dotted_expr(uuid.uuid4().hex[:8]))
    closure = sorted(nix_path_info([top], recursive=True))
    result = run_cli("push", "--to", s3.store_url(bucket),
                     "--secret-key-file", keys.secret_file, top)  # fmt: skip
    assert "uploaded 2 paths" in result.stderr
    dest = str(tmp_path / "fresh")
    copied = substitute(s3.http_url(bucket), closure, keys.public, dest=dest)
    assert copied.returncode == 0, copied.stderr
    assert all(Path(dest + p).read_bytes() == Path(p).read_bytes() for p in closure)
