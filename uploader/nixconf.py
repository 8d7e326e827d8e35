"""Editing nix.conf: the post-build-hook line install adds and uninstall removes.

Pure functions on the file's text.  Install's lines carry a marker comment,
and a hook it had to disable (``--force``) is kept as a marked comment, so
that :func:`remove_hook` restores the file byte for byte.
"""

from __future__ import annotations

import re

from uploader._exceptions import ConfigError

__all__ = [
    "DISABLED",
    "MARK",
    "ForeignHookError",
    "add_hook",
    "disabled_hooks",
    "hook_settings",
    "remove_hook",
]

# The lines install adds start with these, so uninstall finds exactly them.
# The second marker says that install also added the newline that ended the
# file's last line.
MARK = "# added by nix-cache-uploader install"
MARK_NO_EOL = MARK + " (and the newline above)"
DISABLED = "# disabled by nix-cache-uploader install: "
_HOOK_SETTING = re.compile(r"^\s*post-build-hook\s*=(.*)$")


class ForeignHookError(ConfigError):
    """nix.conf already names another post-build-hook."""


def _hook_value(line: str) -> str | None:
    match = _HOOK_SETTING.match(line.split("#", 1)[0])
    return " ".join(match.group(1).split()) if match else None


def add_hook(text: str, hook: str, *, force: bool = False) -> str:
    """``text`` (a nix.conf) with ``post-build-hook = hook`` added by install.

    Other settings stay as they are.  Another post-build-hook is an error
    (:class:`ForeignHookError`); with ``force`` it is commented out so that
    :func:`remove_hook` can restore it.  A line of install's naming another
    hook (an earlier install's) is updated in place.
    """
    lines = text.splitlines(keepends=True)
    ours = [i for i in range(1, len(lines)) if lines[i - 1].rstrip("\n") in (MARK, MARK_NO_EOL)]
    set_by_us = {i for i in ours if _hook_value(lines[i]) is not None}
    foreign = [
        i
        for i, line in enumerate(lines)
        if i not in set_by_us and _hook_value(line) not in (None, "", hook)
    ]
    if foreign and not force:
        values = ", ".join(repr(_hook_value(lines[i])) for i in foreign)
        raise ForeignHookError(
            f"nix.conf already sets post-build-hook = {values}; a nix.conf has only one. "
            "Remove that line, or add --force to comment it out (uninstall restores it)"
        )
    for i in foreign:
        lines[i] = DISABLED + lines[i]
    setting = f"post-build-hook = {hook}\n"
    for i in set_by_us:
        lines[i] = setting
    already = set_by_us or any(_hook_value(line) == hook for line in lines)
    if not already:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
            lines.append(MARK_NO_EOL + "\n")
        else:
            lines.append(MARK + "\n")
        lines.append(setting)
    return "".join(lines)


def remove_hook(text: str) -> tuple[str, list[str]]:
    """``text`` without what :func:`add_hook` added, byte for byte, and the
    hooks those lines named."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    removed: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        mark = line.rstrip("\n")
        value = _hook_value(lines[i + 1]) if i + 1 < len(lines) else None
        if mark in (MARK, MARK_NO_EOL) and value is not None:
            removed.append(value)
            if mark == MARK_NO_EOL and out:
                out[-1] = out[-1].removesuffix("\n")
            i += 2
            continue
        out.append(line.removeprefix(DISABLED))
        i += 1
    return "".join(out), removed


def hook_settings(text: str) -> list[str]:
    """The post-build-hook values ``text`` sets, in order (the last one wins)."""
    return [v for line in text.splitlines() if (v := _hook_value(line)) is not None]


def disabled_hooks(text: str) -> list[str]:
    """The hooks install commented out in ``text``."""
    return hook_settings(
        "\n".join(
            line.removeprefix(DISABLED) for line in text.splitlines() if line.startswith(DISABLED)
        )
    )
