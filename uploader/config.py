"""Settings for the daemon and the queue commands: TOML file, then flags.

Every setting has one name, used as the TOML key and (with ``--``) as the
flag: ``to``, ``secret-key-file``, ``spool``, ``jobs``…  The file is
``--config F``, else ``/etc/nix-cache-uploader/config.toml`` when it exists;
flags given on the command line override it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from uploader._exceptions import ConfigError
from uploader.compression import METHODS
from uploader.signing import PublicKey
from uploader.spool import DEFAULT_SPOOL

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_GC_ROOTS",
    "DEFAULT_SPOOL",
    "DEFAULT_STATE_DIR",
    "Settings",
    "load_settings",
]

DEFAULT_CONFIG = "/etc/nix-cache-uploader/config.toml"
DEFAULT_STATE_DIR = "/var/lib/nix-cache-uploader"
DEFAULT_GC_ROOTS = "/nix/var/nix/gcroots/nix-cache-uploader"


@dataclass(frozen=True)
class Settings:
    """Everything `run`, `status`, `wait` and `retry` need to know."""

    to: str | None = None
    secret_key_file: str | None = None
    attest_key_file: str | None = None  # attest mode (uploader.quorum): no cache key
    spool: str = DEFAULT_SPOOL
    state_dir: str = DEFAULT_STATE_DIR
    gc_roots_dir: str = DEFAULT_GC_ROOTS
    compression: str | None = None  # None: the URL's compression=, else zstd
    compression_level: int | None = None
    jobs: int = 4
    upstream: tuple[str, ...] = ()
    upstream_keys: tuple[str, ...] = ()
    tmp_dir: str | None = None
    batch_size: int = 1000
    retry_min: float = 1.0
    retry_max: float = 900.0
    drain_timeout: float = 60.0
    known_ttl: float = 7 * 86400.0
    metrics: str | None = None
    low_priority: bool = True
    upload_logs: bool = False
    # None: as the store URL's write-nar-listing (else no).
    write_nar_listing: bool | None = None

    def require(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) in (None, ""):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(
                    f"{flag} is required (or set {name.replace('_', '-')} in the config file)"
                )


_FIELDS = {f.name.replace("_", "-"): f for f in dataclasses.fields(Settings)}


def _coerce(key: str, value: Any) -> Any:
    f = _FIELDS[key]
    kind = str(f.type)
    try:
        if kind.startswith("tuple"):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError("a list of strings")
            return tuple(value)
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError("true or false")
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError("an integer")
            return value
        if kind.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError("a number")
            return float(value)
        if key == "metrics" and isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # metrics = 9100: a port alone
        if not isinstance(value, str):
            raise TypeError("a string")
        return value
    except TypeError as e:
        raise ConfigError(f"setting {key!r} must be {e}, not {_toml(value)}") from None


def _toml(value: object) -> str:
    """A value as the config file spells it (true, "text"), not as Python does."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


# Lower bounds (inclusive) of the numeric settings; every number must be finite.
_AT_LEAST = {
    "batch_size": 1,
    "retry_min": 0.001,
    "retry_max": 0.001,
    "drain_timeout": 0,
    "known_ttl": 0,
}


def _check(settings: Settings) -> Settings:
    if settings.compression is not None and settings.compression not in METHODS:
        raise ConfigError(
            f"compression {settings.compression!r} is not one of {', '.join(METHODS)}"
        )
    if not 1 <= settings.jobs <= 64:
        raise ConfigError(f"jobs must be between 1 and 64, not {settings.jobs}")
    for name, least in _AT_LEAST.items():
        value = getattr(settings, name)
        if not math.isfinite(value) or value < least:
            raise ConfigError(f"{name.replace('_', '-')} must be a number ≥ {least}, not {value}")
    if settings.retry_max < settings.retry_min:
        raise ConfigError(
            f"retry-min ({settings.retry_min:g}) must be at most retry-max ({settings.retry_max:g})"
        )
    check_upstreams(settings.upstream)
    settings = dataclasses.replace(
        settings, upstream_keys=upstream_key_names(settings.upstream_keys)
    )
    for name in ("spool", "state_dir", "gc_roots_dir"):
        if not os.path.isabs(getattr(settings, name)):
            raise ConfigError(f"{name.replace('_', '-')} must be an absolute path")
    return settings


def read_config_file(path: str | None) -> dict[str, Any]:
    """The settings in a TOML file (``None``: the default file, if present)."""
    explicit = path is not None
    path = path or DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by this user") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a TOML file") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return data


def _unknown_settings(names: list[str]) -> str:
    """What to say of settings the file has and no version knows: the
    nearest known name for a misspelt one, else the list of them all."""
    guesses = {n: difflib.get_close_matches(n, _FIELDS, n=1, cutoff=0.6) for n in names}
    if all(guesses.values()):
        return "; ".join(
            f"unknown setting {n!r} (did you mean {g[0]!r}?)" for n, g in guesses.items()
        )
    known = ", ".join(sorted(_FIELDS))
    return f"unknown setting(s) {', '.join(names)} (known: {known})"


def load_settings(config_file: str | None, overrides: Mapping[str, Any]) -> Settings:
    """Settings from the config file with ``overrides`` (flag values that are
    not None, keyed by setting name with dashes) applied on top."""
    data = read_config_file(config_file)
    where = f"config file {config_file or DEFAULT_CONFIG}"
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    try:
        for key, value in data.items():
            if key in _FIELDS:
                values[_FIELDS[key].name] = _coerce(key, value)
            else:
                extra[key] = value
        if extra:
            raise ConfigError(_unknown_settings(sorted(extra)))
        _check(Settings(**values))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    for key, value in overrides.items():
        if value is None or value == ():
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[_FIELDS[key].name] = _coerce(key, value)
    try:
        return _check(Settings(**values))
    except ConfigError as e:
        # Only a flag can have made valid file settings invalid.
        raise ConfigError(f"{e} (from the command line)") from None


# The upstream caches every command reads (urllib: over HTTP, or a local
# directory): an s3:// upstream would only ever be "unreachable".
UPSTREAM_SCHEMES = ("http", "https", "file")


def check_upstreams(urls: Iterable[str]) -> None:
    """Refuse an upstream cache URL of a scheme the commands cannot read."""
    for url in urls:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in UPSTREAM_SCHEMES or not rest:
            spelled = " or ".join(f"{s}://" for s in UPSTREAM_SCHEMES)
            raise ConfigError(f"upstream {url!r}: give a binary cache URL starting {spelled}")


def upstream_key_names(values: Iterable[str]) -> tuple[str, ...]:
    """The key names upstream-keys / --upstream-key mean.  Only the name is
    compared (a path's signatures are its own, checked by Nix when it was
    substituted), but the key as trusted-public-keys spells it, ``NAME:KEY``,
    or a public key file, are taken for their name rather than never
    matching."""
    names = []
    for value in values:
        if ":" in value or os.sep in value or os.path.exists(value):
            try:
                value = PublicKey.from_argument(value).name
            except ConfigError as e:
                raise ConfigError(
                    f"upstream key {value!r}: give a key name such as cache.nixos.org-1 ({e})"
                ) from None
        if not value or any(c.isspace() for c in value):
            raise ConfigError(f"upstream key {value!r}: give a key name such as cache.nixos.org-1")
        names.append(value)
    return tuple(names)


def gc_roots_warning(path: str) -> str | None:
    """Why ``path`` protects nothing as gc-roots-dir, or None: Nix counts a
    link as a root only under its gcroots directory."""
    top = os.path.dirname(DEFAULT_GC_ROOTS)
    if os.path.realpath(path).startswith(os.path.realpath(top) + os.sep):
        return None
    return (
        f"gc-roots-dir {path} is outside {top}: Nix does not count the links there as "
        "GC roots, so a garbage collection may delete outputs before they are uploaded"
    )
