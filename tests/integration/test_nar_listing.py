"""NAR listings (`write-nar-listing`) against Nix's own: for the corner cases
of the NAR format, `<hash>.ls` equals what `nix copy --to
'file://…?write-nar-listing=true'` writes, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.cli import KeyPair, run_cli
from tests.support.services import NixDaemon, nix_client_env
from tests.unit.test_nar import Tree, build
from uploader.narlisting import NarListing
from uploader.storepath import hash_part

pytestmark = pytest.mark.integration


def add(root: Path) -> str:
    """Add a tree to the store through the daemon, under a fresh name."""
    named = root.parent / f"ls-{uuid.uuid4().hex[:12]}"
    os.rename(root, named)
    out = subprocess.run(["nix-store", "--add", str(named)], env=nix_client_env(),
                         check=True, capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip()


def nix_listing(path: str, cache: Path) -> bytes:
    subprocess.run(
        ["nix", "copy", "--to", f"file://{cache}?write-nar-listing=true&compression=none", path],
        env=nix_client_env(), check=True, capture_output=True,
    )  # fmt: skip
    return (cache / f"{hash_part(path)}.ls").read_bytes()


def our_listing(path: str, chunk: int) -> bytes:
    nar = subprocess.run(["nix-store", "--dump", path], check=True, capture_output=True).stdout
    listing = NarListing()
    for i in range(0, len(nar), chunk):
        listing.feed(nar[i : i + chunk])
    return listing.json()


CORNERS: dict[str, Tree] = {
    "file-root": (b"hello\n", 0o644),
    "executable-root": (b"#!/bin/sh\n", 0o755),
    "empty-file-root": (b"", 0o644),
    "symlink-root": b"/nix/store",
    "empty-directory": {},
    "special-entries": {
        b"empty-dir": {},
        b"empty-file": (b"", 0o644),
        b"exe": (b"x", 0o755),
        b"dangling": b"nowhere",
        b"to-self": b".",
        b"nested": {b"deeper": {b"file": (b"12345678", 0o644)}},
    },
    "unicode-and-sorting": {"é".encode(): (b"1", 0o644), b"B": (b"2", 0o644), b"a": {}},
    # JSON escapes: Nix 2.8 writes \b and \f long (found by the property below).
    "control-characters": {
        b"\x08\x0c\t\n\r\x01\x1f\x7f": (b"", 0o644),
        b'quote"back\\slash': b"target-\x0c\\f",
    },
    # Not UTF-8: raw bytes, as Nix writes them; two such names stay two.
    "names-not-utf8": {
        b"x\xfe": (b"innocent", 0o644),
        b"x\xff": (b"hidden", 0o644),
        b"link": b"../bad\xff\xfename",
        b"\xc3": {b"\xed\xa0\x80": (b"", 0o755)},
    },
    "large-file": {b"big": (os.urandom(3 << 20), 0o644), b"after": (b"x", 0o644)},
}


@pytest.mark.parametrize("name", sorted(CORNERS))
def test_corner_cases_match_nix(nix_daemon: NixDaemon, tmp_path: Path, name: str) -> None:
    build(os.fsencode(tmp_path / "root"), CORNERS[name])
    path = add(tmp_path / "root")
    expected = nix_listing(path, tmp_path / "nix-cache")
    for chunk in (1, 7, 4096, 1 << 20):
        assert our_listing(path, chunk) == expected


utf8_names = (
    st.text(
        st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=8,
    )
    .filter(lambda s: s not in (".", ".."))
    .map(str.encode)
)
byte_names = st.binary(min_size=1, max_size=8).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
trees = st.recursive(
    st.one_of(st.tuples(st.binary(max_size=200), st.sampled_from([0o644, 0o755])),
              utf8_names.map(lambda b: b"target-" + b),
              byte_names.map(lambda b: b"raw-" + b)),
    lambda children: st.dictionaries(st.one_of(utf8_names, byte_names), children,
                                     max_size=5),
    max_leaves=15,
)  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(tree=trees)
def test_random_trees_match_nix(nix_daemon: NixDaemon, tree: Tree) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        build(os.fsencode(tmp) + b"/root", tree)
        path = add(Path(tmp, "root"))
        assert our_listing(path, 64) == nix_listing(path, Path(tmp, "nix-cache"))


def test_push_writes_the_listing_before_the_narinfo(
    nix_daemon: NixDaemon, keys: KeyPair, tmp_path: Path
) -> None:
    build(os.fsencode(tmp_path / "root"), CORNERS["special-entries"])
    path = add(tmp_path / "root")
    expected = json.loads(nix_listing(path, tmp_path / "nix-cache"))
    for how, url in (
        ("flag", [f"file://{tmp_path}/flag", "--write-nar-listing"]),
        ("url", [f"file://{tmp_path}/url?write-nar-listing=true"]),
    ):
        run_cli("push", "--to", url[0], *url[1:], "--secret-key-file", keys.secret_file, path)
        listing = Path(tmp_path, how, f"{hash_part(path)}.ls")
        assert json.loads(listing.read_bytes()) == expected
        narinfo = Path(tmp_path, how, f"{hash_part(path)}.narinfo")
        assert listing.stat().st_mtime_ns <= narinfo.stat().st_mtime_ns
    # Not asked for, or turned off against the URL's parameter: the flag wins.
    for how, url in (
        ("none", [f"file://{tmp_path}/none"]),
        ("off", [f"file://{tmp_path}/off?write-nar-listing=true", "--no-write-nar-listing"]),
    ):
        run_cli("push", "--to", *url, "--secret-key-file", keys.secret_file, path)
        assert Path(tmp_path, how, f"{hash_part(path)}.narinfo").exists()
        assert not Path(tmp_path, how, f"{hash_part(path)}.ls").exists()
