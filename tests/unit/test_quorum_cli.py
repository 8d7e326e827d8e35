"""`publish` refuses configurations that can never work or defeat the quorum
(uploader/cli/quorum.py), before it touches the bucket."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from uploader.cli import EXIT_OK, EXIT_USAGE, main
from uploader.signing import SecretKey, generate, write_public_key, write_secret_key


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """Secret and public key files of ci-a-1, ci-b-1 and the cache key cache-1."""
    files = {}
    for name in ("ci-a-1", "ci-b-1", "cache-1"):
        key = generate(name)
        files[name] = str(tmp_path / f"{name}.secret")
        write_secret_key(files[name], key)
        write_public_key(files[name] + ".pub", key.public_key())
    return files


def publish(tmp_path: Path, keys: dict[str, str], *extra: str, cache: str = "cache-1") -> Result:
    bucket = tmp_path / "bucket"
    return invoke(
        "publish", "--to", f"file://{bucket}", "--secret-key-file", keys[cache], "--once", *extra
    )


def assert_usage_error(result: Result, *words: str) -> None:
    assert result.exit_code == EXIT_USAGE, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0]


def test_a_quorum_larger_than_the_builder_keys_is_refused(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    builders = ["--builder-key", keys["ci-a-1"] + ".pub", "--builder-key", keys["ci-b-1"] + ".pub"]
    refused = publish(tmp_path, keys, "--quorum", "3", *builders)
    assert_usage_error(refused, "--quorum 3", "2 builder keys")
    assert not (tmp_path / "bucket").exists()
    assert publish(tmp_path, keys, "--quorum", "2", *builders).exit_code == EXIT_OK
    # A trusted builder publishes alone: the quorum is for the others.
    trusted = publish(tmp_path, keys, "--quorum", "3", *builders, "--trusted-builder", "ci-a-1")
    assert trusted.exit_code == EXIT_OK, trusted.output


def test_the_cache_key_as_a_builder_key_is_refused(tmp_path: Path, keys: dict[str, str]) -> None:
    builders = ["--builder-key", keys["ci-a-1"] + ".pub", "--builder-key", keys["cache-1"] + ".pub"]
    refused = publish(tmp_path, keys, "--quorum", "1", *builders)
    assert_usage_error(refused, "--builder-key cache-1", "cache key")
    assert not (tmp_path / "bucket").exists()


def test_a_builder_key_as_the_cache_key_is_refused(tmp_path: Path, keys: dict[str, str]) -> None:
    builders = ["--builder-key", keys["ci-a-1"] + ".pub", "--builder-key", keys["ci-b-1"] + ".pub"]
    refused = publish(tmp_path, keys, "--quorum", "1", *builders, cache="ci-a-1")
    assert_usage_error(refused, "--builder-key ci-a-1", "cache key")


def test_a_builder_key_named_like_the_cache_key_is_refused(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    impostor = tmp_path / "impostor.pub"
    write_public_key(str(impostor), generate("cache-1").public_key())
    assert SecretKey.load(keys["cache-1"]).public_key().to_text() != impostor.read_text().strip()
    builders = ["--builder-key", keys["ci-a-1"] + ".pub", "--builder-key", str(impostor)]
    refused = publish(tmp_path, keys, "--quorum", "1", *builders)
    assert_usage_error(refused, "--builder-key cache-1", "name")


def _renamed(keys: dict[str, str], name: str, as_: str) -> str:
    """``keys[name]``'s public key under the name ``as_``, as NAME:KEY."""
    public = SecretKey.load(keys[name]).public_key().to_text()
    return f"{as_}:{public.split(':', 1)[1]}"


def test_the_cache_key_under_another_name_is_refused(tmp_path: Path, keys: dict[str, str]) -> None:
    """The same key bytes, whatever the name: a builder holding the cache key
    could sign narinfos alone."""
    builders = ["--builder-key", keys["ci-a-1"] + ".pub",
                "--builder-key", _renamed(keys, "cache-1", "ci-z-1")]  # fmt: skip
    refused = publish(tmp_path, keys, "--quorum", "1", *builders)
    assert_usage_error(refused, "--builder-key ci-z-1", "cache key")
    assert not (tmp_path / "bucket").exists()


def test_one_key_under_two_builder_names_is_refused(tmp_path: Path, keys: dict[str, str]) -> None:
    """Else one machine's attestations, renamed, count twice toward the quorum."""
    builders = ["--builder-key", keys["ci-a-1"] + ".pub",
                "--builder-key", _renamed(keys, "ci-a-1", "ci-x-1")]  # fmt: skip
    refused = publish(tmp_path, keys, "--quorum", "2", *builders)
    assert_usage_error(refused, "ci-a-1 and ci-x-1 are the same key")
    assert not (tmp_path / "bucket").exists()
