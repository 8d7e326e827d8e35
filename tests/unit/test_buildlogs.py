"""Build logs (uploader/buildlogs.py): read where Nix keeps them, published
as ``log/<drv basename>`` for `nix log`."""

from __future__ import annotations

import bz2
import os
from pathlib import Path

from uploader.buildlogs import log_key, read_build_log

DRV = "/nix/store/gxs9hr309n6jrgv3dzmbklh6rcf9iw7v-hello.drv"
BASE = os.path.basename(DRV)


def test_build_logs_are_found_where_nix_keeps_them_and_published_by_basename(
    tmp_path: Path,
) -> None:
    """Broken, no build log would be found, or it would be published where
    `nix log` does not look."""
    where = tmp_path / "drvs" / BASE[:2]
    where.mkdir(parents=True)
    (where / (BASE[2:] + ".bz2")).write_bytes(bz2.compress(b"building\n"))
    assert read_build_log(DRV, str(tmp_path)) == b"building\n"
    assert log_key(DRV) == f"log/{BASE}"


def test_a_build_log_beyond_64_mib_is_not_published(tmp_path: Path) -> None:
    """Broken, a runaway build log would be held in memory and uploaded."""
    where = tmp_path / "drvs" / BASE[:2]
    where.mkdir(parents=True)
    log = where / BASE[2:]
    with open(log, "wb") as f:  # sparse: nothing is written to the disk
        f.truncate((64 << 20) + 1)
    assert read_build_log(DRV, str(tmp_path)) is None
    os.truncate(log, 64 << 20)
    exactly = read_build_log(DRV, str(tmp_path))
    assert exactly is not None and len(exactly) == 64 << 20
