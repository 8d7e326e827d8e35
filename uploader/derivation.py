"""The outputs a derivation file (``.drv``, Nix's ATerm format) names.

Nix 2.8 gives the post-build hook only ``DRV_PATH``; the outputs come from
the .drv.  Reading the file is about a thousand times cheaper than asking
``nix show-derivation`` per batch, so the daemon reads it itself and asks
Nix only about what it cannot read here (an unknown format, outputs whose
paths are only known once built).  Only the first field is read:

    Derive([("out","/nix/store/…-name","",""),("dev","/nix/store/…","","")],…
"""

from __future__ import annotations

import re

from uploader.storepath import is_store_path

__all__ = ["parse_outputs"]

_START = b"Derive(["
_STRING = rb'"([^"\\]*)"'  # no escapes: names and store paths never need them
_OUTPUT = re.compile(rb"\(" + rb",".join([_STRING] * 4) + rb"\)")


def parse_outputs(data: bytes) -> dict[str, str] | None:
    """Output name → store path, or None when this reader cannot tell (not
    the plain ATerm format, or an output with no path before it is built)."""
    if not data.startswith(_START):
        return None
    pos = len(_START)
    outputs: dict[str, str] = {}
    while True:
        match = _OUTPUT.match(data, pos)
        if match is None:
            return None
        try:
            name, path = match.group(1).decode(), match.group(2).decode()
        except UnicodeDecodeError:
            return None
        if not name or name in outputs or not is_store_path(path):
            return None
        outputs[name] = path
        pos = match.end()
        sep = data[pos : pos + 1]
        if sep == b"]":
            return outputs
        if sep != b",":
            return None
        pos += 1
