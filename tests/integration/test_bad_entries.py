"""Bad spool input against a running daemon: each bad entry lands in
quarantine/ with a reason a person can act on, `status` shows it, `retry`
puts it back, and the good builds queued beside it still reach the cache."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import KeyPair, run_cli
from tests.support.daemon import UploaderRun
from tests.support.entries import entry_bytes, rename_entry, v1_entry_bytes, write_entry
from tests.support.nix import build, multi_output_expr, nix_path_info, substitute, trivial_expr
from tests.support.services import SeaweedFS
from uploader.nixbase32 import ALPHABET

# About the spool, the command line and users, not S3: one S3 server is enough.
pytestmark = [pytest.mark.integration, pytest.mark.seaweedfs_only]


def _random_store_path(name: str) -> str:
    """A well-formed store path that no store has (its hash is random)."""
    return f"/nix/store/{''.join(random.choices(ALPHABET, k=32))}-{name}"


# name -> (contents, words its quarantine reason must contain)
BAD_ENTRIES: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "garbage.entry": (b"hello, uploader\nplease upload everything\n", ("does not start with",)),
    "binary.entry": (bytes(range(256)) * 4, ("not UTF-8",)),
    "latin1.entry": (
        entry_bytes("out /nix/store/cafe").replace(b"cafe", b"caf\xe9"),
        ("not UTF-8",),
    ),
    "oversize.entry": (
        entry_bytes(*[f"out {_random_store_path('big')}" for _ in range(1500)]),
        ("larger than", "65536"),
    ),
    "outside.entry": (entry_bytes("out /etc/passwd"), ("not a store path", "/etc/passwd")),
    "traversal.entry": (entry_bytes("out /nix/store/../../etc/passwd"), ("'..'",)),
    "version.entry": (
        f"nix-cache-uploader-spool 99\nout {_random_store_path('v')}\nend\n".encode(),
        ("unsupported format", "spool 99"),
    ),
}


def _status(uploader: UploaderRun) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(run_cli("status", "--json", *uploader.queue_args()).stdout)
    return report


def _quarantine(uploader: UploaderRun) -> dict[str, str]:
    """Quarantined entry -> the text of its .reason file."""
    directory = uploader.spool / "quarantine"
    return {
        p.name: (directory / f"{p.name}.reason").read_text()
        for p in directory.iterdir()
        if not p.name.endswith(".reason")
    }


def test_bad_entries_are_quarantined_with_reasons_and_good_ones_uploaded(
    uploader: UploaderRun, seaweedfs: SeaweedFS, bucket: str, keys: KeyPair, tmp_path: Path
) -> None:
    uploader.start()
    daemon = uploader.process
    assert daemon is not None

    expected: dict[str, tuple[str, ...]] = {n: words for n, (_, words) in BAD_ENTRIES.items()}
    for name, (data, _) in BAD_ENTRIES.items():
        write_entry(uploader.spool / name, data)
    assert len(BAD_ENTRIES["oversize.entry"][0]) > 64 * 1024

    # A planted symlink, pointing at a well-formed entry outside the spool:
    # refused for being a link, whatever it points to, and the target is untouched.
    outside = tmp_path / "elsewhere.entry"
    outside.write_bytes(entry_bytes(f"out {_random_store_path('linked')}"))
    os.symlink(outside, uploader.spool / "x.entry")
    expected["x.entry"] = ("symlink",)

    ghost = _random_store_path("ghost")
    write_entry(uploader.spool / "ghost.entry", entry_bytes(f"out {ghost}"))
    expected["ghost.entry"] = (ghost, "not valid in the local Nix store")

    # Good builds through the real hook, in the middle of the bad input.
    expr = multi_output_expr()
    good = [*build(expr, hook=str(uploader.hook)), *build(expr, attr="lib")]
    good += build(trivial_expr("after-bad"), hook=str(uploader.hook))
    # A format 1 entry, as a hook older than format 2 left it: still uploaded.
    old_hook = build(trivial_expr("old-hook"))
    rename_entry(uploader.spool / "old-hook.entry", v1_entry_bytes(f"out {old_hook[0]}"))
    good += old_hook

    uploader.wait_drained(timeout=120)
    assert daemon.poll() is None, uploader.log()

    dest = str(tmp_path / "fresh")
    copied = substitute(seaweedfs.http_url(bucket), good, keys.public, dest=dest)
    assert copied.returncode == 0, copied.stderr
    for path in nix_path_info(good, recursive=True):
        assert Path(dest + path).exists(), f"{path} was not substituted"

    quarantined = _quarantine(uploader)
    assert set(quarantined) == set(expected)
    for name, words in expected.items():
        for word in words:
            assert word in quarantined[name], f"{name}: {word!r} not in {quarantined[name]!r}"
    assert outside.exists() and not (uploader.spool / "quarantine" / "elsewhere.entry").exists()
    assert (uploader.spool / "quarantine" / "x.entry").is_symlink()
    assert uploader.pending() == []

    human = run_cli("status", *uploader.queue_args()).stdout
    assert f"quarantined: {len(expected)}" in human
    for name in expected:
        line = next(line for line in human.splitlines() if line.strip().startswith(f"{name}:"))
        assert expected[name][0] in line
    report = _status(uploader)
    assert report["daemon"] == "running"
    listed = {q["entry"]: q["reason"] for q in report["quarantined"]}
    assert listed.keys() == expected.keys()
    assert all(expected[n][0] in r for n, r in listed.items())
    assert any("ghost" in str(e["error"]) for e in report["last_errors"])

    # retry puts them all back; the daemon quarantines them again and keeps serving.
    requeued_at = time.time()
    retried = run_cli("retry", *uploader.queue_args())
    assert f"requeued {len(expected)} quarantined entries" in retried.stdout
    more = build(trivial_expr("after-retry"), hook=str(uploader.hook))
    uploader.wait_drained(timeout=120)
    assert daemon.poll() is None, uploader.log()
    again = _quarantine(uploader)
    assert set(again) == set(expected)
    for name, words in expected.items():
        assert all(word in again[name] for word in words), again[name]
        reason_file = uploader.spool / "quarantine" / f"{name}.reason"
        assert reason_file.stat().st_mtime >= requeued_at - 0.5, f"{name} was not requeued"
    copied = substitute(seaweedfs.http_url(bucket), more, keys.public, dest=dest)
    assert copied.returncode == 0, copied.stderr
    assert daemon.poll() is None, uploader.log()
