"""Driving the real Nix from tests: builds through the daemon, and the
fresh-store substitution that is the oracle for a correct cache."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from collections.abc import Sequence

from tests.support.services import nix_client_env

__all__ = [
    "build",
    "dotted_expr",
    "instantiate",
    "multi_output_expr",
    "nix_path_info",
    "random_blob_expr",
    "substitute",
    "trivial_expr",
]


def build(
    expr: str,
    *,
    attr: str | None = None,
    hook: str | None = None,
    env: dict[str, str] | None = None,
) -> list[str]:
    """Build a Nix expression through the daemon; return its output paths."""
    with tempfile.NamedTemporaryFile("w", suffix=".nix", delete=False) as f:
        f.write(expr)
    try:
        cmd = ["nix-build", f.name, "--no-out-link"]
        if attr:
            cmd += ["-A", attr]
        if hook:
            cmd += ["--option", "post-build-hook", hook]
        out = subprocess.run(
            cmd, env=env or nix_client_env(), check=True, capture_output=True, text=True
        )
    finally:
        os.unlink(f.name)
    return out.stdout.split()


def nix_path_info(
    paths: Sequence[str], *, recursive: bool = False, derivation: bool = False
) -> dict[str, dict[str, object]]:
    """What Nix registered for ``paths``; with ``derivation``, .drv files themselves."""
    flags = [*(["-r"] if recursive else []), *(["--derivation"] if derivation else [])]
    cmd = ["nix", "path-info", "--json", *flags, *paths]
    out = subprocess.run(cmd, env=nix_client_env(), check=True, capture_output=True, text=True)
    data = json.loads(out.stdout)
    if isinstance(data, dict):
        return {p: {"path": p, **v} for p, v in data.items()}
    return {d["path"]: d for d in data}


def substitute(
    http_url: str, paths: Sequence[str], public_key: str, *, dest: str, derivation: bool = False
) -> subprocess.CompletedProcess[str]:
    """Copy paths from the cache into a fresh store at ``dest`` with signature
    checks on; the returned process says whether Nix accepted them."""
    env = nix_client_env()
    env.pop("NIX_REMOTE", None)
    cmd = [
        "nix", "copy", "--from", http_url, "--to", dest, *paths,
        "--option", "trusted-public-keys", public_key,
        "--option", "require-sigs", "true", *(["--derivation"] if derivation else []),
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def instantiate(expr: str) -> str:
    """Instantiate (not build) a Nix expression through the daemon; return its .drv."""
    out = subprocess.run(["nix-instantiate", "-E", expr], env=nix_client_env(), check=True,
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip()


def _salt() -> str:
    return uuid.uuid4().hex[:12]


def trivial_expr(name: str = "trivial", content: str | None = None) -> str:
    """One derivation writing one file; fresh each call unless content is fixed."""
    content = content if content is not None else _salt()
    return f"""derivation {{
  name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = ["-c" "echo {content} > $out"];
}}"""


def random_blob_expr(name: str, nbytes: int) -> str:
    """One derivation writing ``nbytes`` of random bytes (incompressible: its
    NAR is as large compressed), fresh each call."""
    return f"""derivation {{
  name = "{name}-{_salt()}"; system = builtins.currentSystem; builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = ["-c" "mkdir $out; head -c {nbytes} /dev/urandom > $out/blob"];
}}"""


def multi_output_expr(salt: str | None = None) -> str:
    """A dependency and a two-output derivation: ``out`` references ``lib``,
    the dependency and itself; ``lib`` references nothing."""
    salt = salt or _salt()
    return f"""let
  dep = derivation {{
    name = "dep-{salt}"; system = builtins.currentSystem; builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = ["-c" ''
      mkdir -p $out/bin
      printf '#!/bin/sh\\necho hi\\n' > $out/bin/hi
      chmod +x $out/bin/hi
    ''];
  }};
in derivation {{
  name = "multi-{salt}"; system = builtins.currentSystem; builder = "/bin/sh";
  outputs = ["out" "lib"];
  PATH = "/usr/bin:/bin";
  args = ["-c" ''
    mkdir -p $out/share $lib/lib
    echo ${{dep}} > $out/share/dep
    echo $lib > $out/share/lib
    echo $out > $out/share/self
    ln -s $lib/lib $out/lib-link
    echo lib > $lib/lib/data
  ''];
}}"""


def dotted_expr(salt: str) -> str:
    """A derivation whose name starts with '.' (valid since Nix 2.4), and
    one that refers to it."""
    drv = (
        'derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";'
        ' PATH = "/usr/bin:/bin"; args = ["-c" "{script}"]; }}'
    )
    hidden = drv.format(name=f".hidden-{salt}", script=f"echo {salt} > $out")
    return (
        "let hidden = "
        + hidden
        + "; in "
        + drv.format(name=f"uses-hidden-{salt}", script="echo ${hidden} > $out")
    )
