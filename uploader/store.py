"""What the local Nix knows: registered path info, closures, derivation outputs.

Every query is one `nix` subprocess for many paths (chunked only to stay under
the argv limit), never one process per path.  The store is reached the way the
caller's environment says (``NIX_REMOTE``, the daemon socket for a non-root
user), so the uploader needs no more than read access to the store.  The
commands get the caller's environment without its ``AWS_*`` variables.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from uploader import nar
from uploader._exceptions import InvalidPathError, StoreError, UploaderError
from uploader.derivation import parse_outputs
from uploader.fdlimit import exhausted_hint
from uploader.nixbase32 import format_hash, parse_hash
from uploader.storepath import STORE_DIR, parse_store_path

__all__ = ["NixStore", "PathInfo"]

# Keeps each command line far below ARG_MAX even for long store path names.
_CHUNK = 1000
_NIX_FLAGS = ("--extra-experimental-features", "nix-command", "--offline")
# Far above what a query of a large closure takes (seconds); the batch is
# retried after it.
NIX_TIMEOUT = 300.0


@dataclass(frozen=True)
class PathInfo:
    """One valid store path as the Nix database registered it."""

    path: str
    nar_hash: str  # sha256:<nix32>
    nar_size: int
    references: tuple[str, ...]  # full store paths, sorted
    deriver: str | None = None  # full .drv path
    ca: str | None = None
    sigs: tuple[str, ...] = ()
    # Built on this machine, not substituted (Nix's "ultimate" trust).
    ultimate: bool = False


# Far above any .drv Nix writes; past it, Nix is asked instead.
_MAX_DRV = 16 << 20


def _read_drv(path: str) -> bytes | None:
    """A .drv file's bytes: a regular file, not followed through a link, and
    not read whole when it is huge.  None when it cannot be read so."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_DRV:
            return None
        # Read as large as the file is (a read of the limit's size would
        # allocate 16 MiB for each of thousands of small files).
        chunks, size = [], 0
        while chunk := os.read(fd, max(st.st_size - size, 0) + 4096):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_DRV:
                return None
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _parse_info(raw: dict[str, Any]) -> PathInfo:
    path = raw["path"]
    try:
        nar_hash = format_hash(parse_hash(raw["narHash"]))
    except (KeyError, ValueError) as e:
        raise StoreError(f"nix path-info gave no usable narHash for {path}: {e}") from e
    deriver = raw.get("deriver") or None
    if deriver and not deriver.startswith("/"):
        deriver = f"{STORE_DIR}/{deriver}"
    refs = [r if r.startswith("/") else f"{STORE_DIR}/{r}" for r in raw.get("references", [])]
    return PathInfo(
        path=path,
        nar_hash=nar_hash,
        nar_size=int(raw["narSize"]),
        references=tuple(sorted(refs)),
        deriver=deriver,
        ca=raw.get("ca") or None,
        sigs=tuple(raw.get("signatures") or raw.get("sigs") or ()),
        ultimate=raw.get("ultimate") is True,
    )


class NixStore:
    """The local Nix store, asked through the `nix` and `nix-store` commands."""

    def __init__(self, *, env: dict[str, str] | None = None, bin_dir: str | None = None) -> None:
        # Nix is asked only about the local store: it gets no S3 credentials.
        self._env = {
            k: v for k, v in (os.environ if env is None else env).items()
            if not k.startswith("AWS_")
        }  # fmt: skip
        self._nix = self._find("nix", bin_dir)
        self._nix_store = self._find("nix-store", bin_dir)
        self._show_verb: tuple[str, ...] | None = None
        # A closure asked for ahead (prefetch_closure): its paths, its answer.
        self._ahead: tuple[list[str], Future[dict[str, PathInfo]]] | None = None

    def prefetch_closure(self, paths: Iterable[str]) -> None:
        """Begin asking Nix for the closure of ``paths`` in the background;
        the next ``path_infos`` of the same paths with ``closure`` takes its
        answer (or its error).  `push` asks while it opens the cache: Nix's
        two commands run on another core meanwhile."""
        try:
            items = sorted({parse_store_path(p) for p in paths})
        except UploaderError:
            return  # path_infos says so, when asked
        answer: Future[dict[str, PathInfo]] = Future()

        def ask() -> None:
            try:
                answer.set_result(self._infos(items, closure=True, checked=False))
            except BaseException as e:
                answer.set_exception(e)

        threading.Thread(target=ask, name="closure-ahead", daemon=True).start()
        self._ahead = (items, answer)

    @staticmethod
    def _find(name: str, bin_dir: str | None) -> str:
        found = shutil.which(name, path=bin_dir) if bin_dir else shutil.which(name)
        if found is None:
            raise StoreError(f"{name} not found on PATH: install Nix or set PATH for the uploader")
        return found

    def _run(self, args: Sequence[str]) -> str:
        try:
            proc = subprocess.run(
                args, env=self._env, capture_output=True, text=True, check=False,
                timeout=NIX_TIMEOUT,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            # A hung nix-daemon would hold the batch, and a stop, forever.
            raise StoreError(
                f"{os.path.basename(args[0])} {args[1]}: no answer in {NIX_TIMEOUT:.0f}s; "
                "is the nix-daemon hung? (`systemctl status nix-daemon`)"
            ) from e
        except OSError as e:
            raise StoreError(f"running {args[0]}: {e}{exhausted_hint(e)}") from e
        if proc.returncode != 0:
            msg = proc.stderr.strip().splitlines()
            detail = msg[-1] if msg else f"exit status {proc.returncode}"
            raise StoreError(f"{os.path.basename(args[0])} {args[1]}: {detail}")
        return proc.stdout

    def invalid_paths(self, paths: Iterable[str]) -> set[str]:
        """The subset of ``paths`` that is not valid in the store (GC'd, never built)."""
        items = sorted(set(paths))
        invalid: set[str] = set()
        for chunk in _chunks(items):
            out = self._run([self._nix_store, "--check-validity", "--print-invalid", *chunk])
            invalid.update(out.split())
        return invalid

    def path_infos(
        self, paths: Iterable[str], *, closure: bool = False, checked: bool = False
    ) -> dict[str, PathInfo]:
        """Registered info for ``paths`` (and, with ``closure``, everything they
        reference, transitively).  Raises InvalidPathError for an invalid path,
        found by a validity check first unless the caller ``checked`` them
        just before (then Nix's own error for a path collected since is a
        StoreError)."""
        items = sorted({parse_store_path(p) for p in paths})
        ahead, self._ahead = self._ahead, None
        if ahead is not None and closure and not checked and ahead[0] == items:
            return ahead[1].result()
        return self._infos(items, closure=closure, checked=checked)

    def _infos(self, items: list[str], *, closure: bool, checked: bool) -> dict[str, PathInfo]:
        if not items:
            return {}
        invalid = set() if checked else self.invalid_paths(items)
        if invalid:
            first = sorted(invalid)[0]
            raise InvalidPathError(
                f"{first} is not valid in the local Nix store"
                + (f" (and {len(invalid) - 1} more)" if len(invalid) > 1 else "")
                + ": it was never built here or has been garbage-collected",
                store_path=first,
            )
        infos: dict[str, PathInfo] = {}
        # `nix path-info` answers a .drv with its outputs unless told
        # --derivation, which in turn would answer other paths with their
        # derivers: ask about the two kinds apart.
        derivations = [p for p in items if p.endswith(".drv")]
        others = [p for p in items if not p.endswith(".drv")]
        for flags, group in (([], others), (["--derivation"], derivations)):
            for chunk in _chunks(group):
                self._add_infos(infos, [*flags, *(["--recursive"] if closure else [])], chunk)
        return infos

    def _add_infos(
        self, infos: dict[str, PathInfo], flags: list[str], paths: Sequence[str]
    ) -> None:
        args = [self._nix, "path-info", *_NIX_FLAGS, "--json", "--sigs", *flags]
        data = json.loads(self._run([*args, *paths]))
        # Nix < 2.19 prints a list of objects; newer Nix an object keyed by path.
        records = (
            [{"path": p, **v} for p, v in data.items() if v is not None]
            if isinstance(data, dict)
            else data
        )
        for raw in records:
            if raw.get("valid", True) is False:
                raise InvalidPathError(
                    f"{raw['path']} is not valid in the local Nix store",
                    store_path=raw["path"],
                )
            info = _parse_info(raw)
            infos[info.path] = info

    def dump(self, path: str) -> Iterator[bytes]:
        """The NAR serialisation of a store path, read straight from disk."""
        return nar.dump(path)

    def read_derivation_outputs(self, drv_paths: Iterable[str]) -> dict[str, list[str]]:
        """Output paths of the derivations whose .drv files this process can
        read and parse itself (see derivation.py); the others are left out."""
        result: dict[str, list[str]] = {}
        for drv in sorted({parse_store_path(p) for p in drv_paths}):
            data = _read_drv(drv)
            outputs = parse_outputs(data) if data is not None else None
            if outputs is not None:
                result[drv] = sorted(outputs.values())
        return result

    def derivation_outputs(self, drv_paths: Iterable[str]) -> dict[str, list[str]]:
        """Output paths of each derivation (for entries whose hook saw an
        empty OUT_PATHS): read from the .drv files, else asked to Nix.
        Floating content-addressed outputs, which have no path before they
        are built, are resolved through the database."""
        items = sorted({parse_store_path(p) for p in drv_paths})
        result = self.read_derivation_outputs(items)
        for chunk in _chunks([d for d in items if d not in result]):
            data = self._show_derivation(chunk)
            for drv, body in data.items():
                outs = [o["path"] for o in body.get("outputs", {}).values() if o.get("path")]
                if len(outs) < len(body.get("outputs", {})):
                    outs = sorted(set(outs) | set(self._query_outputs(drv)))
                result[drv if drv.startswith("/") else f"{STORE_DIR}/{drv}"] = sorted(outs)
        return result

    def _show_derivation(self, drvs: Sequence[str]) -> dict[str, Any]:
        if self._show_verb is None:
            try:
                out = self._run([self._nix, "derivation", "show", *_NIX_FLAGS, *drvs])
                self._show_verb = ("derivation", "show")
            except StoreError:
                # Nix before 2.15 only knows the older spelling.
                out = self._run([self._nix, "show-derivation", *_NIX_FLAGS, *drvs])
                self._show_verb = ("show-derivation",)
        else:
            out = self._run([self._nix, *self._show_verb, *_NIX_FLAGS, *drvs])
        data: dict[str, Any] = json.loads(out)
        # Nix ≥ 2.33 nests derivations under a top-level "derivations" key.
        if "derivations" in data and isinstance(data["derivations"], dict):
            inner: dict[str, Any] = data["derivations"]
            return inner
        return data

    def _query_outputs(self, drv: str) -> list[str]:
        return self._run([self._nix_store, "--query", "--outputs", drv]).split()
