"""Build logs: read from the local Nix log directory, published in the cache
as ``log/<drv basename>`` (plain text), where `nix log` on a machine that
substitutes from the cache looks when it has no log of its own.

Nix keeps a build's log at ``<log dir>/drvs/<first 2 characters of the
.drv's basename>/<the rest>``, bzip2-compressed by default; the log
directory is ``/nix/var/log/nix`` unless ``NIX_LOG_DIR`` says otherwise.
"""

from __future__ import annotations

import bz2
import os

from uploader.storepath import basename

__all__ = ["LOG_TYPE", "log_key", "read_build_log"]

LOG_TYPE = "text/plain; charset=utf-8"
_DEFAULT_LOG_DIR = "/nix/var/log/nix"
# Far beyond a sane build log; a larger one is not worth holding in memory.
_MAX_LOG = 64 << 20


def log_key(drv_path: str) -> str:
    return "log/" + basename(drv_path)


def read_build_log(drv_path: str, log_dir: str | None = None) -> bytes | None:
    """The build log of ``drv_path``, or None when Nix kept none (or it is
    unreadable to this user, or too large)."""
    base = basename(drv_path)
    directory = os.path.join(
        log_dir or os.environ.get("NIX_LOG_DIR") or _DEFAULT_LOG_DIR, "drvs", base[:2]
    )
    for name, opener in ((base[2:] + ".bz2", bz2.open), (base[2:], open)):
        try:
            with opener(os.path.join(directory, name), "rb") as f:
                data: bytes = f.read(_MAX_LOG + 1)
        except FileNotFoundError:
            continue
        except (OSError, EOFError):
            return None
        return data if len(data) <= _MAX_LOG else None
    return None
