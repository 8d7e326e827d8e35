"""The store queries against the real Nix: the .drv reader must agree with
`nix show-derivation` on every derivation shape, or step aside."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import uploader.store
from tests.support.services import NixDaemon, nix_client_env
from uploader.store import NixStore

pytestmark = pytest.mark.integration


def instantiate(expr: str) -> list[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".nix", delete=False) as f:
        f.write(expr)
    try:
        out = subprocess.run(
            ["nix-instantiate", f.name], env=nix_client_env(),
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    finally:
        os.unlink(f.name)
    return out.stdout.split()


def shapes(salt: str) -> str:
    base = 'system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";'
    return f"""[
  (derivation {{ name = "one-{salt}"; {base} args = ["-c" "echo 1 > $out"]; }})
  (derivation {{ name = "three-{salt}"; {base} outputs = ["out" "dev" "lib"];
     args = ["-c" "mkdir $out $dev $lib"]; }})
  (derivation {{ name = "fixed-{salt}"; {base} outputHashMode = "flat";
     outputHashAlgo = "sha256"; outputHash = "{"0" * 64}";
     args = ["-c" "false"]; }})
  (derivation {{ name = "quoted-{salt}"; {base}
     weird = "a \\"quoted\\" value\\nwith a newline, a tab\\t and a \\\\ backslash";
     args = ["-c" "echo \\"$weird\\" > $out"]; }})
]"""


def test_drv_reader_agrees_with_nix_show_derivation(nix_daemon: NixDaemon) -> None:
    drvs = instantiate(shapes(uuid.uuid4().hex[:10]))
    assert len(drvs) == 4
    store = NixStore(env=nix_client_env())

    read = store.read_derivation_outputs(drvs)
    by_nix = {d: sorted(store._query_outputs(d)) for d in drvs}

    assert read == by_nix
    assert [len(v) for v in read.values()].count(3) == 1


def test_an_unreadable_drv_is_asked_to_nix(
    nix_daemon: NixDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    drvs = instantiate(shapes(uuid.uuid4().hex[:10]))
    store = NixStore(env=nix_client_env())
    expected = store.read_derivation_outputs(drvs)
    # As if the .drv files were in a format this reader does not know.
    monkeypatch.setattr(uploader.store, "parse_outputs", lambda data: None)

    assert store.read_derivation_outputs(drvs) == {}
    assert store.derivation_outputs(drvs) == expected


def test_a_closure_asked_ahead_is_the_one_asked_after(nix_daemon: NixDaemon) -> None:
    """push asks Nix for the closure while it opens the cache: the answer
    (or Nix's refusal) is the same as asked at the time, and taken once."""
    from tests.support.nix import build, multi_output_expr

    out = build(multi_output_expr(), attr="out")
    store = NixStore(env=nix_client_env())
    direct = store.path_infos(out, closure=True)
    assert len(direct) >= 2

    ahead = NixStore(env=nix_client_env())
    ahead.prefetch_closure(out)
    assert ahead.path_infos(out, closure=True) == direct
    assert ahead._ahead is None, "taken once; the next question asks Nix again"
    assert ahead.path_infos(out, closure=True) == direct

    # Asked ahead for other paths: not taken for these.
    ahead.prefetch_closure([next(iter(set(direct) - set(out)))])
    assert ahead.path_infos(out, closure=True) == direct

    missing = f"{out[0][:-3]}xyz"
    ahead.prefetch_closure([missing])
    with pytest.raises(uploader.store.InvalidPathError, match="is not valid"):
        ahead.path_infos([missing], closure=True)


def test_nix_is_not_handed_the_s3_credentials(
    nix_daemon: NixDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's environment holds the S3 credentials (the service's
    environment file); the Nix commands it runs get none of them."""
    from tests.support.nix import build, trivial_expr

    out = build(trivial_expr(f"env-{uuid.uuid4().hex[:8]}"))
    seen = tmp_path / "seen"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("nix", "nix-store"):
        real = shutil.which(tool)
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\nenv >> "$SEEN_BY_NIX"\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    secrets = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-s3cr3t", "AWS_SESSION_TOKEN": "t0ken-t0ken",
               "AWS_ACCESS_KEY_ID": "AKIDAKIDAKID", "AWS_PROFILE": "pr0file-pr0file"}  # fmt: skip
    for name, value in {**nix_client_env(SEEN_BY_NIX=str(seen)), **secrets}.items():
        monkeypatch.setenv(name, value)

    for store in (
        NixStore(bin_dir=str(bin_dir)),
        NixStore(env=dict(os.environ), bin_dir=str(bin_dir)),
    ):
        seen.unlink(missing_ok=True)
        assert store.invalid_paths(out) == set()
        assert set(store.path_infos(out, closure=True)) >= set(out)
        environment = seen.read_text()
        assert environment.count("NIX_REMOTE=daemon") >= 2, "the commands ran, as the caller set"
        for name, value in secrets.items():
            assert name not in environment and value not in environment


def test_a_nix_that_does_not_answer_is_given_up_on(
    nix_daemon: NixDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung nix-daemon must not hold a batch (and a stop) forever: the
    query ends in a StoreError, which the daemon retries, and the child goes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nix").symlink_to(str(shutil.which("nix")))
    hung = bin_dir / "nix-store"
    hung.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\nexec sleep 600\n")
    hung.chmod(0o755)
    monkeypatch.setattr(uploader.store, "NIX_TIMEOUT", 1.0)
    store = NixStore(env=nix_client_env(), bin_dir=str(bin_dir))
    started = time.monotonic()
    with pytest.raises(uploader.store.StoreError) as hang:
        store.invalid_paths(["/nix/store/" + "a" * 32 + "-x"])
    assert time.monotonic() - started < 10
    assert str(hang.value) == (
        "nix-store --check-validity: no answer in 1s; is the nix-daemon hung? "
        "(`systemctl status nix-daemon`)"
    )
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists(), "the hung command was killed and reaped"


def test_no_file_to_spare_for_nix_says_what_ran_out(nix_daemon: NixDaemon) -> None:
    store = NixStore(env=nix_client_env())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)  # a new fd takes the lowest free number
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no pipe for Nix
    try:
        with pytest.raises(uploader.store.StoreError) as failed:
            store.invalid_paths(["/nix/store/" + "a" * 32 + "-x"])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "Too many open files (out of this process's open-file limit; raise it" in str(
        failed.value
    )
