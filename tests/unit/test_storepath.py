from __future__ import annotations

import os
from pathlib import Path

import pytest

from uploader._exceptions import InvalidPathError
from uploader.storepath import (
    basename,
    hash_part,
    is_store_path,
    name_part,
    parse_store_path,
    to_store_path,
)

HASH = "gxs9hr309n6jrgv3dzmbklh6rcf9iw7v"
GOOD = f"/nix/store/{HASH}-hello-2.12.1"


@pytest.mark.parametrize(
    "path",
    [
        GOOD,
        f"/nix/store/{HASH}-a",
        f"/nix/store/{HASH}-hello-2.12.1.drv",
        f"/nix/store/{HASH}-A+Z_0-9.?=x",
        f"/nix/store/{HASH}-" + "x" * 211,
        f"/nix/store/{HASH}-x..",
        # A leading '.' is valid since Nix 2.4 (NixOS/nix#912).
        f"/nix/store/{HASH}-.hidden",
        f"/nix/store/{HASH}-..dots-1.0",
        f"/nix/store/{HASH}-...",
        f"/nix/store/{HASH}-.x-.-y",
    ],
)
def test_valid_store_paths_are_returned_unchanged(path: str) -> None:
    assert parse_store_path(path) == path
    assert is_store_path(path)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/nix/store/../etc", "'..'"),
        (f"/nix/store/{HASH}-foo/../../etc/passwd", "'..'"),
        (f"/nix/store/{HASH}-foo/bin/hello", "subpath"),
        (f"{GOOD}/", "trailing slash"),
        ("/nix/store", "not under"),
        ("/nix/store/", "<32-char hash>-<name>"),
        (f"/nix/store/{HASH}", "<32-char hash>-<name>"),
        (f"/nix/store/{HASH}-", "<32-char hash>-<name>"),
        (f"/nix/store/{HASH}_foo", "<32-char hash>-<name>"),
        (f"/nix/store/{HASH[:-1]}-foo", "<32-char hash>"),
        (f"/nix/store/{HASH[:-1]}e-foo", "hash part"),
        (f"/nix/store/{HASH.upper()}-foo", "hash part"),
        (f"/nix/store/{HASH}-" + "x" * 212, "limit is 211"),
        (f"/nix/store/{HASH}-foo bar", "whitespace"),
        (f"/nix/store/{HASH}-foo\n", "whitespace"),
        (f"/nix/store/{HASH}-foo\0", "NUL"),
        (f"/nix/store/{HASH}-foo$bar", "may only contain"),
        (f"/nix/store/{HASH}-caf\u00e9", "may only contain"),
        (f"/nix/store/{HASH}-.", "name must not be '.'"),
        (f"/nix/store/{HASH}-..", "name must not be '..'"),
        (f"/nix/store/{HASH}-.-foo", "first dash-separated part must not be '.'"),
        (f"/nix/store/{HASH}-..-foo", "first dash-separated part must not be '..'"),
        (f"/tmp/store/{HASH}-foo", "not under"),
        (f"/nix/storex/{HASH}-foo", "not under"),
        (f"nix/store/{HASH}-foo", "not under"),
        (f"{HASH}-foo", "not under"),
        ("", "not under"),
    ],
)
def test_invalid_store_paths_say_what_is_wrong(path: str, reason: str) -> None:
    with pytest.raises(InvalidPathError) as info:
        parse_store_path(path)
    assert reason in str(info.value)
    assert info.value.store_path == path
    assert not is_store_path(path)


def test_other_store_dirs() -> None:
    path = f"/custom/store/{HASH}-foo"
    assert parse_store_path(path, store_dir="/custom/store") == path
    assert not is_store_path(path)


def test_parts() -> None:
    assert hash_part(GOOD) == HASH
    assert basename(GOOD) == f"{HASH}-hello-2.12.1"
    assert name_part(GOOD) == "hello-2.12.1"
    with pytest.raises(InvalidPathError):
        hash_part(f"{GOOD}/bin")


def test_to_store_path_follows_a_symlink_chain(tmp_path: Path) -> None:
    (tmp_path / "result").symlink_to("link2")
    (tmp_path / "link2").symlink_to(tmp_path / "sub" / ".." / "link3")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link3").symlink_to(GOOD)
    assert to_store_path(str(tmp_path / "result")) == GOOD


def test_to_store_path_accepts_relative_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "result").symlink_to(GOOD)
    monkeypatch.chdir(tmp_path)
    assert to_store_path("./result") == GOOD
    assert to_store_path("result/bin/hello") == GOOD


def test_to_store_path_truncates_paths_inside_a_store_path() -> None:
    assert to_store_path(f"{GOOD}/bin/hello") == GOOD
    assert to_store_path(GOOD) == GOOD
    assert to_store_path(f"/nix/store/./{HASH}-hello-2.12.1/./bin/") == GOOD


def test_to_store_path_stops_at_a_store_path_that_is_a_symlink(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    target = store / f"{'1' * 32}-target"
    target.mkdir()
    link = store / f"{'2' * 32}-link"
    link.symlink_to(target)
    (tmp_path / "result").symlink_to(link)
    assert to_store_path(str(tmp_path / "result"), store_dir=str(store)) == str(link)
    # A path inside a store path belongs to it, even if it links elsewhere.
    (target / "lib").symlink_to(link)
    assert to_store_path(str(target / "lib"), store_dir=str(store)) == str(target)


@pytest.mark.parametrize("escape", ["/etc/passwd", "/nix/store/../../etc", "/nix"])
def test_to_store_path_refuses_paths_outside_the_store(tmp_path: Path, escape: str) -> None:
    (tmp_path / "result").symlink_to(escape)
    with pytest.raises(InvalidPathError, match="does not lead into /nix/store"):
        to_store_path(str(tmp_path / "result"))


def test_to_store_path_rejects_a_bad_store_name(tmp_path: Path) -> None:
    (tmp_path / "result").symlink_to("/nix/store/not-a-hash")
    with pytest.raises(InvalidPathError, match="not a store path"):
        to_store_path(str(tmp_path / "result"))


def test_to_store_path_reports_symlink_loops(tmp_path: Path) -> None:
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(InvalidPathError, match="too many levels"):
        to_store_path(str(tmp_path / "a"))


def test_to_store_path_says_when_a_path_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to("nowhere")
    for missing in (tmp_path / "nosuch", tmp_path / "dangling"):
        with pytest.raises(InvalidPathError, match="no such file or directory"):
            to_store_path(str(missing))
    store = tmp_path / "store"
    (store / f"{'1' * 32}-dir").mkdir(parents=True)
    inside = store / f"{'1' * 32}-dir" / "nonexistent-file"
    with pytest.raises(InvalidPathError, match="no such file or directory"):
        to_store_path(str(inside), store_dir=str(store))
    # A store path this machine does not have is left for the store to refuse.
    assert to_store_path(f"{GOOD}/bin/hello") == GOOD


def test_the_store_directory_itself_is_said_to_be_one() -> None:
    for given in ("/nix/store", "/nix/store/", "/nix/store/."):
        with pytest.raises(InvalidPathError, match="is the store directory itself"):
            to_store_path(given)
