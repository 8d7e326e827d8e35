"""Upstream caches: what another cache already serves is not uploaded again,
yet the referrers are, and a machine using both caches gets the whole closure.

The upstream is a second bucket on the same S3 server, filled with `push`."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support.cli import KeyPair, make_keys, run_cli
from tests.support.daemon import UploaderRun
from tests.support.nix import build
from tests.support.services import NixDaemon, S3Server, nix_client_env
from uploader.narinfo import NarInfo
from uploader.storepath import basename, hash_part

pytestmark = pytest.mark.integration


def _pair_expr() -> str:
    """A dependency ``dep`` and a referrer ``top`` whose output names it."""
    salt = uuid.uuid4().hex[:12]
    return f"""rec {{
  dep = derivation {{
    name = "upstream-dep-{salt}"; system = builtins.currentSystem; builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = ["-c" "echo dependency > $out"];
  }};
  top = derivation {{
    name = "referrer-{salt}"; system = builtins.currentSystem; builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = ["-c" "echo ${{dep}} > $out"];
  }};
}}"""


def _narinfo(s3: S3Server, bucket: str, path: str) -> NarInfo | None:
    text = s3.get(bucket, f"{hash_part(path)}.narinfo")
    return NarInfo.parse(text.decode()) if text is not None else None


def _upstream_serving(s3: S3Server, path: str, tmp_path: Path) -> tuple[KeyPair, str, str]:
    """A second bucket, pushed ``path`` with a key of its own: its keys, name and HTTP URL."""
    upstream_keys = make_keys(tmp_path, "upstream-cache-1")
    upstream_bucket = s3.create_bucket(f"up-{uuid.uuid4().hex[:12]}")
    run_cli("push", "--to", s3.store_url(upstream_bucket),
            "--secret-key-file", upstream_keys.secret_file, path)  # fmt: skip
    return upstream_keys, upstream_bucket, s3.http_url(upstream_bucket)


def _realise_from(caches: list[str], keys: list[str], path: str, root: Path) -> str:
    """Substitute ``path`` into a fresh store at ``root`` from all ``caches`` at
    once, as a developer machine with several substituters does; its stderr."""
    env = nix_client_env()
    env.pop("NIX_REMOTE", None)
    proc = subprocess.run(
        ["nix-store", "--store", str(root), "--realise", path,
         "--option", "substituters", " ".join(caches),
         "--option", "trusted-public-keys", " ".join(keys),
         "--option", "require-sigs", "true"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_paths_an_upstream_cache_serves_are_not_uploaded_again(
    uploader: UploaderRun, s3: S3Server, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    expr = _pair_expr()
    (dep,) = build(expr, attr="dep")
    upstream_keys, upstream_bucket, upstream_url = _upstream_serving(s3, dep, tmp_path)

    uploader.extra_args = ["--upstream", upstream_url]
    uploader.start()
    (top,) = build(expr, attr="top", hook=str(uploader.hook))
    uploader.wait_drained(timeout=120)

    top_info = _narinfo(s3, bucket, top)
    assert top_info is not None, f"the referrer was not uploaded:\n{uploader.log()}"
    assert basename(dep) in top_info.references
    assert _narinfo(s3, bucket, dep) is None, "the upstream's path was uploaded again"
    assert _narinfo(s3, upstream_bucket, dep) is not None
    # The dependency's own entry: acknowledged as served upstream, not as in
    # the cache.
    drv = subprocess.run(["nix-store", "--query", "--deriver", dep], env=nix_client_env(),
                         check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    subprocess.run([str(uploader.hook)], env={**os.environ, "DRV_PATH": drv, "OUT_PATHS": dep},
                   check=True)  # fmt: skip
    uploader.wait_drained(timeout=120)
    assert "1 output served upstream" in uploader.log(), uploader.log()
    assert _narinfo(s3, bucket, dep) is None

    # A machine with both caches gets the referrer from us, the dependency upstream.
    fresh = tmp_path / "fresh"
    _realise_from([s3.http_url(bucket), upstream_url],
                  [keys.public, upstream_keys.public], top, fresh)  # fmt: skip
    assert (fresh / top.lstrip("/")).read_text().strip() == dep
    assert (fresh / dep.lstrip("/")).read_text().strip() == "dependency"


def test_paths_signed_by_an_upstream_key_are_not_uploaded(
    uploader: UploaderRun, s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    expr = _pair_expr()
    (dep,) = build(expr, attr="dep")
    # As if substituted from that cache: the path carries the upstream's signature.
    upstream = make_keys(tmp_path, "upstream.example.org-1")
    subprocess.run(["nix", "store", "sign", "--key-file", upstream.secret_file, dep],
                   env=nix_client_env(), check=True, capture_output=True)  # fmt: skip

    uploader.extra_args = ["--upstream-key", upstream.name]
    uploader.start()
    (top,) = build(expr, attr="top", hook=str(uploader.hook))
    uploader.wait_drained(timeout=120)

    top_info = _narinfo(s3, bucket, top)
    assert top_info is not None, f"the referrer was not uploaded:\n{uploader.log()}"
    assert basename(dep) in top_info.references
    assert _narinfo(s3, bucket, dep) is None, "a path signed upstream was uploaded"


def test_push_leaves_out_what_an_upstream_cache_serves_and_pin_add_accepts_it(
    nix_daemon: NixDaemon, s3: S3Server, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    expr = _pair_expr()
    (dep,) = build(expr, attr="dep")
    (top,) = build(expr, attr="top")
    upstream_keys, _, upstream_url = _upstream_serving(s3, dep, tmp_path)

    pushed = run_cli("push", "--to", s3.store_url(bucket), "--secret-key-file",
                     keys.secret_file, "--upstream", upstream_url, top)  # fmt: skip
    assert "uploaded 1 path" in pushed.stderr and "1 served upstream" in pushed.stderr
    assert _narinfo(s3, bucket, dep) is None and _narinfo(s3, bucket, top) is not None
    _realise_from([s3.http_url(bucket), upstream_url],
                  [keys.public, upstream_keys.public], top, tmp_path / "fresh")  # fmt: skip

    pin = ["pin", "add", "--to", s3.store_url(bucket), "release", top]
    refused = run_cli(*pin, check=False)
    assert refused.returncode == 1 and f"missing {dep}" in refused.stderr
    added = run_cli(*pin[:4], "--upstream", upstream_url, *pin[4:])
    assert (
        "pinned release: 1 path of its closure kept in this cache, 1 more served by the "
        "upstream cache" in added.stderr
    )
    listed = run_cli("pin", "list", "--to", s3.store_url(bucket)).stdout
    assert listed.startswith("release\t") and top in listed

    # With a key the upstream did not sign with: refused, and it says why.
    (tmp_path / "other").mkdir()
    stranger = make_keys(tmp_path / "other", "stranger-1")
    refused = run_cli(*pin[:4], "--upstream", upstream_url, "--upstream-key", stranger.public,
                      "other", top, check=False)  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert f"{dep}: {upstream_url} has it, but no signature verifies with the given keys " in (
        refused.stderr
    )
    assert "(signed by upstream-cache-1)" in refused.stderr
    run_cli(*pin[:4], "--upstream", upstream_url, "--upstream-key", upstream_keys.public,
            "other", top)  # fmt: skip


def test_a_local_directory_serves_as_an_upstream_cache_to_push(
    nix_daemon: NixDaemon, s3: S3Server, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    """`file://` upstreams, as verify and pin add take them: a mirror on disk."""
    expr = _pair_expr()
    (dep,) = build(expr, attr="dep")
    (top,) = build(expr, attr="top")
    mirror_keys = make_keys(tmp_path, "mirror-1")
    mirror = tmp_path / "mirror"
    run_cli("push", "--to", f"file://{mirror}", "--secret-key-file",
            mirror_keys.secret_file, dep)  # fmt: skip

    pushed = run_cli("push", "--to", s3.store_url(bucket), "--secret-key-file",
                     keys.secret_file, "--upstream", f"file://{mirror}", top)  # fmt: skip
    assert "uploaded 1 path" in pushed.stderr and "1 served upstream" in pushed.stderr
    assert _narinfo(s3, bucket, dep) is None and _narinfo(s3, bucket, top) is not None
    _realise_from([s3.http_url(bucket), f"file://{mirror}"],
                  [keys.public, mirror_keys.public], top, tmp_path / "fresh")  # fmt: skip

    # A mirror that is not there serves nothing: everything is uploaded.
    other = s3.create_bucket(f"other-{uuid.uuid4().hex[:12]}")
    pushed = run_cli("push", "--to", s3.store_url(other), "--secret-key-file",
                     keys.secret_file, "--upstream", f"file://{tmp_path}/gone", top)  # fmt: skip
    assert "uploaded 2 paths" in pushed.stderr and "served upstream" not in pushed.stderr
    assert f"upstream file://{tmp_path}/gone does not exist" in pushed.stderr


def test_push_takes_an_upstream_key_as_trusted_public_keys_spells_it(
    nix_daemon: NixDaemon, s3: S3Server, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    """--upstream-key counts by name; NAME:KEY or a key file (what verify
    and pin add take) means the same name, not a key that never matches."""
    expr = _pair_expr()
    (dep,) = build(expr, attr="dep")
    (top,) = build(expr, attr="top")
    upstream = make_keys(tmp_path, "upstream.example.org-1")
    subprocess.run(["nix", "store", "sign", "--key-file", upstream.secret_file, dep],
                   env=nix_client_env(), check=True, capture_output=True)  # fmt: skip
    for given in (upstream.public, upstream.public_file):
        target = s3.create_bucket(f"k-{uuid.uuid4().hex[:12]}")
        pushed = run_cli("push", "--to", s3.store_url(target), "--secret-key-file",
                         keys.secret_file, "--upstream-key", given, top)  # fmt: skip
        assert "uploaded 1 path" in pushed.stderr and "1 served upstream" in pushed.stderr
        assert _narinfo(s3, target, dep) is None and _narinfo(s3, target, top) is not None
    refused = run_cli("push", "--to", s3.store_url(bucket), "--secret-key-file",
                      keys.secret_file, "--upstream-key", "upstream:not-a-key", top,
                      check=False)  # fmt: skip
    assert refused.returncode == 2
    assert "upstream key 'upstream:not-a-key': give a key name such as" in refused.stderr
