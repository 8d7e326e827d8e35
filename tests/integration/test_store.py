"""The store queries against the real Nix: the .drv reader must agree with
`nix show-derivation` on every derivation shape, or step aside."""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid

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
