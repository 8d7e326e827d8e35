from __future__ import annotations

import hashlib
import io
import os
import random
import resource
import subprocess
import tempfile
import tracemalloc
from pathlib import Path
from typing import TypeAlias

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.requirements import require_binary
from uploader import nar
from uploader._exceptions import NarError, UploaderError
from uploader.nixbase32 import format_hash

MiB = 1 << 20

# A tree as the tests describe it: a regular file (contents, mode), a symlink
# (target) or a directory (entries by raw byte name).
File = tuple[bytes, int]
Tree: TypeAlias = File | bytes | dict[bytes, "Tree"]


def build(path: bytes, tree: Tree) -> None:
    if isinstance(tree, dict):
        os.mkdir(path)
        for name, child in tree.items():
            build(path + b"/" + name, child)
    elif isinstance(tree, bytes):
        os.symlink(tree, path)
    else:
        contents, mode = tree
        with open(path, "wb") as f:
            f.write(contents)
        os.chmod(path, mode)


def ours(path: str | bytes, chunk_size: int = nar.DEFAULT_CHUNK_SIZE) -> bytes:
    return b"".join(nar.dump(path, chunk_size))


def nix_dump(path: str | bytes) -> bytes:
    nix_store = require_binary("nix-store")
    return subprocess.run([nix_store, "--dump", path], check=True, capture_output=True).stdout


def nar_string(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + bytes(-len(data) % 8)


# Fixed vectors, taken from `nix-store --dump`: (tree, NAR size, sha256 hex).
VECTORS: dict[str, tuple[Tree, int, str]] = {
    "hello-file": (
        (b"hello\n", 0o644),
        120,
        "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13",
    ),
    "empty-file": (
        (b"", 0o644),
        112,
        "77ac62e2629d8e45f624589c0c8bf99e24b3a722349bf1e79bc186008534e246",
    ),
    "executable": (
        (b"#!/bin/sh\necho hi\n", 0o755),
        168,
        "5e0accf02cedede5e4119ffa15e79e79a5fb1fb9bc43c3d434f33227a14477a0",
    ),
    "script": (
        (b"#!/bin/sh\necho hi\n", 0o644),
        136,
        "e519505edb9f77f7f02efefd3c9b29766fdd0f449e9bf932313d39ce249982e9",
    ),
    "empty-directory": (
        {},
        96,
        "a50a5ab6d992f5598edd92105059fae9acfc192981e08bd88534c2167e92526a",
    ),
    "symlink": (
        b"../target",
        128,
        "e55972a9bdaddf85299cd49c7200c7257b508ae57a3e815587b811c63b9ac834",
    ),
}


@pytest.mark.parametrize("name", VECTORS)
def test_fixed_vectors(tmp_path: Path, name: str) -> None:
    tree, size, sha256 = VECTORS[name]
    root = os.fsencode(tmp_path / "root")
    build(root, tree)
    data = ours(root)
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == sha256


def test_hello_file_has_the_documented_nar_hash(tmp_path: Path) -> None:
    (tmp_path / "hello").write_bytes(b"hello\n")
    digest = hashlib.sha256(ours(str(tmp_path / "hello"))).digest()
    assert format_hash(digest) == "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"


@pytest.mark.parametrize(
    ("mode", "vector"), [(0o100, "executable"), (0o700, "executable"), (0o011, "script")]
)
def test_only_the_owner_execute_bit_makes_a_file_executable(
    tmp_path: Path, mode: int, vector: str
) -> None:
    root = os.fsencode(tmp_path / "f")
    build(root, (b"#!/bin/sh\necho hi\n", mode))
    assert hashlib.sha256(ours(root)).hexdigest() == VECTORS[vector][2]


# Byte order differs from text order and from locale order here: uppercase
# before lowercase, b"\x80" (not UTF-8) before U+D7FF (b"\xed\x9f\xbf").
TRICKY_NAMES = [
    b"a", b"B", b"A", b"b", b"_", b"ab", b"a-b", b"a.b", b"0",
    "\u00e9".encode(), "\ud7ff".encode(), b"\x80", b"\xff", b"\xed\xa0\x80",
]  # fmt: skip


def test_directory_entries_are_in_raw_byte_order(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path / "root")
    build(root, {name: (name, 0o644) for name in TRICKY_NAMES})
    data = ours(root)
    entry = nar_string(b"name")
    positions = [data.index(entry + nar_string(name)) for name in sorted(TRICKY_NAMES)]
    assert positions == sorted(positions)


def test_symlinks_are_archived_not_followed(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path / "root")
    build(root, {b"self": b".", b"up": b"..", b"dangling": b"/does/not/exist"})
    data = ours(root)
    for target in (b".", b"..", b"/does/not/exist"):
        assert nar_string(b"target") + nar_string(target) in data


def test_chunking_does_not_change_the_archive_and_bounds_chunks(tmp_path: Path) -> None:
    rng = random.Random(7)
    sizes = [0, 1, 7, 8, 4095, 4096, 4097, 3 * 4096 + 5, 50_000]
    root = os.fsencode(tmp_path / "root")
    build(root, {f"f{i}".encode(): (rng.randbytes(n), 0o644) for i, n in enumerate(sizes)})
    whole = ours(root)
    chunks = list(nar.dump(root, chunk_size=4096))
    assert b"".join(chunks) == whole
    assert max(len(c) for c in chunks) < 2 * 4096 + 256


def test_many_small_files_come_in_bounded_chunks(tmp_path: Path) -> None:
    """The headers and contents of small files are batched, but never held
    whole: a tree of many small files (node_modules) streams too."""
    root = tmp_path / "root"
    root.mkdir()
    for i in range(2000):
        (root / f"f{i:05}").write_bytes(b"x" * 100)
    chunks = list(nar.dump(str(root), chunk_size=4096))
    assert b"".join(chunks) == ours(str(root))
    assert max(len(c) for c in chunks) < 2 * 4096 + 256


def test_write_nar_returns_the_nar_size(tmp_path: Path) -> None:
    (tmp_path / "hello").write_bytes(b"hello\n")
    out = io.BytesIO()
    assert nar.write_nar(str(tmp_path / "hello"), out) == 120
    assert out.getvalue() == ours(str(tmp_path / "hello"))


def test_a_file_swapped_for_a_symlink_after_its_lstat_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file replaced by a symlink between its lstat and its opening: the
    archive fails, rather than holding under the file's name the contents
    of whatever the link points to (a key, say)."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for the cache\n")
    root = tmp_path / "root"
    root.mkdir()
    (root / "file").write_bytes(b"x")
    lstat = nar._lstat

    def lstat_then_swap(path: bytes) -> os.stat_result:
        found = lstat(path)
        if path.endswith(b"/file"):
            os.unlink(path)
            os.symlink(secret, path)
        return found

    monkeypatch.setattr(nar, "_lstat", lstat_then_swap)
    with pytest.raises(NarError, match=r"opening '.*root/file' for the NAR"):
        ours(str(root))
    assert (root / "file").is_symlink()


def test_a_fifo_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "dir" / "queue")
    with pytest.raises(NarError, match=r"dir/queue' is a fifo"):
        ours(str(tmp_path / "dir"))


def test_a_missing_path_is_a_nar_error(tmp_path: Path) -> None:
    with pytest.raises(NarError, match="missing"):
        ours(str(tmp_path / "missing"))


def test_a_file_that_shrinks_while_read_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "growing.log"
    path.write_bytes(bytes(3 * 4096))
    chunks = nar.dump(str(path), chunk_size=4096)
    next(chunks)
    os.truncate(path, 0)
    with pytest.raises(NarError, match="shrank"):
        list(chunks)


# --- against nix-store --dump -------------------------------------------------

names = st.one_of(
    st.sampled_from(TRICKY_NAMES),
    st.binary(min_size=1, max_size=12)
    .map(lambda b: b.replace(b"/", b"%").replace(b"\0", b"%"))
    .filter(lambda b: b not in (b".", b"..")),
)
files = st.tuples(
    st.binary(max_size=300), st.sampled_from([0o644, 0o755, 0o700, 0o100, 0o011, 0o444])
)
targets = st.one_of(
    st.sampled_from([b".", b"..", b"/", b"/nix/store", b"a", b"B"]),
    st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\0", b"x")),
)
trees = st.recursive(
    st.one_of(files, targets),
    lambda children: st.dictionaries(names, children, max_size=6),
    max_leaves=25,
)


@pytest.mark.integration
@settings(max_examples=40, deadline=None)
@given(tree=trees, chunk_size=st.sampled_from([1, 7, 64, 4096, MiB]))
def test_random_trees_match_nix(tree: Tree, chunk_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fsencode(tmp) + b"/root"
        build(root, tree)
        assert ours(root, chunk_size) == nix_dump(root)


@pytest.mark.integration
def test_tricky_names_match_nix(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path / "root")
    build(root, {name: {name: (name, 0o755)} for name in TRICKY_NAMES})
    assert ours(root) == nix_dump(root)


@pytest.mark.integration
def test_special_entries_match_nix(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path / "root")
    tree: Tree = {
        b"empty-dir": {},
        b"empty-file": (b"", 0o644),
        b"exe": (b"x", 0o755),
        b"dangling": b"nowhere",
        b"to-dir": b"empty-dir",
        b"to-self": b".",
        b"absolute": str(tmp_path).encode(),
    }
    build(root, tree)
    assert ours(root) == nix_dump(root)


@pytest.mark.integration
def test_deep_nesting_matches_nix(tmp_path: Path) -> None:
    tree: Tree = (b"bottom\n", 0o644)
    for level in range(30):
        tree = {f"level{level}".encode(): tree, b"sibling": (b"", 0o755)}
    root = os.fsencode(tmp_path / "root")
    build(root, tree)
    assert ours(root) == nix_dump(root)


@pytest.mark.integration
def test_a_directory_with_5000_entries_matches_nix(tmp_path: Path) -> None:
    rng = random.Random(5000)
    entries: dict[bytes, Tree] = {}
    while len(entries) < 5000:
        name = rng.randbytes(rng.randint(1, 16)).replace(b"/", b"%").replace(b"\0", b"%")
        if name not in (b".", b".."):
            entries[name] = (name, rng.choice([0o644, 0o755]))
    root = os.fsencode(tmp_path / "root")
    build(root, entries)
    assert ours(root) == nix_dump(root)


@pytest.mark.integration
def test_a_200_mib_file_streams_in_constant_memory(tmp_path: Path) -> None:
    nix_store = require_binary("nix-store")
    path = tmp_path / "big"
    block = random.Random(200).randbytes(MiB)
    with open(path, "wb") as f:
        for i in range(200):
            # Distinct blocks, so that reordered or repeated chunks change the hash.
            f.write(i.to_bytes(8, "little") + block[8:])
        f.write(b"odd")  # not a multiple of 8: the padding is exercised too

    ours_hash = hashlib.sha256()
    ours_size = 0
    tracemalloc.start()
    try:
        for chunk in nar.dump(str(path)):
            ours_hash.update(chunk)
            ours_size += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB

    theirs_hash = hashlib.sha256()
    theirs_size = 0
    with subprocess.Popen([nix_store, "--dump", str(path)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(MiB):
            theirs_hash.update(chunk)
            theirs_size += len(chunk)
    assert proc.returncode == 0
    # 112 bytes of framing around the contents, which are padded to a multiple of 8.
    assert ours_size == theirs_size == 112 + 200 * MiB + 8
    assert ours_hash.hexdigest() == theirs_hash.hexdigest()


def test_running_out_of_open_files_is_not_a_broken_path(tmp_path: Path) -> None:
    """EMFILE while archiving is the machine's, not the path's: an error to
    try again later (UploaderError), never NarError, which quarantines."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "file").write_bytes(b"x")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)  # a new fd takes the lowest free number
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no room for one more
    try:
        with pytest.raises(UploaderError) as caught:
            b"".join(nar.dump(os.fsencode(tmp_path / "root")))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not isinstance(caught.value, NarError)
    assert "Too many open files (out of this process's open-file limit" in str(caught.value)
