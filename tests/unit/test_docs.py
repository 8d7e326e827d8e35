"""The docs against the code: a reader who copies a command or a setting from
docs/ gets one that exists, with the flags and defaults it shows."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from tests.support.requirements import require_binary
from uploader.cli import main
from uploader.config import DEFAULT_GC_ROOTS, DEFAULT_STATE_DIR, Settings
from uploader.spool import DEFAULT_SPOOL

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
# Every Markdown file whose commands a user may copy.
DOC_FILES = [*sorted(DOCS.glob("*.md")), REPO / "nixos-module" / "README.md"]
COMMAND = "nix-cache-uploader"
# Code blocks in these languages hold data, not commands.
DATA_LANGUAGES = {"json", "toml", "nix"}
# `run` options that are not settings, and the one whose name differs.
NOT_SETTINGS = {"config_file", "verbose", "quiet"}
RENAMED = {"store_url": "to"}
SHELL_OPERATORS = {"|", "||", "&", "&&", ";", ";;", "(", ")", "<", ">", ">>"}
# What may stand before a command: `sudo -u USER`, `exec`, VAR=value.
PREFIX_WORDS = {"sudo", "exec", "env", "command", "time"}
PREFIX_OPTIONS_WITH_VALUE = {"-u", "-g"}


def setting_name(field_name: str) -> str:
    return field_name.replace("_", "-")


# -- configuration.md --------------------------------------------------------


def configuration_rows() -> dict[str, dict[str, str]]:
    """The settings table of configuration.md, by setting name."""
    text = (DOCS / "configuration.md").read_text()
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("| Setting |"):
            header = [c.strip() for c in line.strip("|").split("|")]
            break
    else:
        pytest.fail("configuration.md has no table starting with '| Setting |'")
    next(lines)  # the |---| line
    rows: dict[str, dict[str, str]] = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        name = cells["Setting"].strip("`")
        assert name not in rows, f"configuration.md lists {name} twice"
        rows[name] = cells
    return rows


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_configuration_lists_exactly_the_settings() -> None:
    fields = {setting_name(f.name) for f in dataclasses.fields(Settings)}
    documented = set(configuration_rows())
    assert documented - fields == set(), "documented but not settings"
    assert fields - documented == set(), "settings missing from docs/configuration.md"


@pytest.mark.parametrize("field", dataclasses.fields(Settings), ids=lambda f: setting_name(f.name))
def test_configuration_shows_each_default(field: dataclasses.Field[Any]) -> None:
    cell = configuration_rows()[setting_name(field.name)]["Default"]
    if field.default is None:
        assert cell.startswith("unset"), f"{field.name} has no default; the doc says {cell!r}"
        return
    literals = backticked(cell)
    assert literals, f"default of {field.name} should be a TOML value in backticks: {cell!r}"
    shown = tomllib.loads(f"value = {literals[0]}")["value"]
    expected = list(field.default) if isinstance(field.default, tuple) else field.default
    assert shown == expected
    assert type(shown) is type(expected) or isinstance(expected, float)


def run_options() -> dict[str, list[str]]:
    """Setting name → the option strings of `run` that set it."""
    options: dict[str, list[str]] = {}
    for param in main.commands["run"].params:
        if isinstance(param, click.Option) and param.name not in NOT_SETTINGS:
            assert param.name is not None
            name = setting_name(RENAMED.get(param.name, param.name))
            options[name] = [*param.opts, *param.secondary_opts]
    return options


def test_configuration_shows_the_flags_of_run() -> None:
    rows = configuration_rows()
    flags = run_options()
    assert set(flags) <= set(rows), "run has options for settings the doc does not list"
    for name, row in rows.items():
        shown = sorted(f for f in backticked(row["Flag"]) if f.startswith("-"))
        assert shown == sorted(flags.get(name, [])), f"flags of {name}"


# -- commands in the docs ----------------------------------------------------


def code_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    for match in re.finditer(r"^ *```(\w*)\n(.*?)^ *```", text, re.M | re.S):
        yield match.group(1), match.group(2)


def tokenize(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def command_lines(language: str, block: str) -> list[str]:
    """The lines of a code block that may hold commands."""
    lines = block.splitlines()
    if language == "ini":  # a systemd unit: only ExecStart= runs something
        return [m.group(1) for m in map(re.compile(r"^ExecStart=(.*)").match, lines) if m]
    if language == "yaml":  # CI config: `run: CMD`, `- CMD`
        return [re.sub(r"^\s*(?:-\s+)?(?:run:\s*)?", "", line) for line in lines]
    return lines


def logical_lines(language: str, block: str) -> Iterator[list[str]]:
    """Token lists of a block's command lines: continuations joined, and
    quotes that span lines (a JSON policy in single quotes) read to their end."""
    pending = ""
    for line in command_lines(language, block):
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            tokens = tokenize(pending)
        except ValueError:  # a quote still open: the next line continues it
            continue
        pending = ""
        yield tokens
    assert not pending, f"unterminated quote in a code block: {pending[:80]!r}"


def commands_in(tokens: list[str]) -> Iterator[list[str]]:
    """The arguments of each nix-cache-uploader invocation among ``tokens``."""
    simple: list[list[str]] = [[]]
    for token in tokens:
        if token in SHELL_OPERATORS:
            simple.append([])
        else:
            simple[-1].append(token)
    for words in simple:
        i = 0
        while i < len(words):
            word = words[i]
            if word in PREFIX_WORDS or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word):
                i += 1
            elif i > 0 and words[0] == "sudo" and word.startswith("-"):
                i += 2 if word in PREFIX_OPTIONS_WITH_VALUE else 1
            else:
                break
        if i < len(words) and os.path.basename(words[i]) == COMMAND:
            yield words[i + 1 :]


def documented_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, args) of every command line in the docs' code blocks."""
    for path in DOC_FILES:
        for language, body in code_blocks(path.read_text()):
            if language in DATA_LANGUAGES:
                continue
            for tokens in logical_lines(language, body):
                for args in commands_in(tokens):
                    yield f"{path.relative_to(REPO)}: {COMMAND} {shlex.join(args)}", args


def inline_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, args) of `nix-cache-uploader SUBCOMMAND …` in inline code."""
    for path in DOC_FILES:
        text = re.sub(r"^ *```.*?^ *```", "", path.read_text(), flags=re.M | re.S)
        for span in re.findall(r"`([^`]+)`", text):
            words = span.split()
            if len(words) >= 2 and words[0] == COMMAND and re.fullmatch(r"[a-z][a-z-]*", words[1]):
                yield f"{path.relative_to(REPO)}: `{span}`", words[1:]


def check_options(where: str, command: click.Command, args: list[str]) -> None:
    known = {"-h", "--help"}
    for param in command.params:
        if isinstance(param, click.Option):
            known.update(param.opts)
            known.update(param.secondary_opts)
    for arg in args:
        if arg.startswith("-") and arg != "-":
            option = arg.split("=", 1)[0]
            assert option in known, (
                f"{where}: `{command.name}` has no option {option} (it has {sorted(known)})"
            )


def check_subcommand(where: str, args: list[str]) -> tuple[click.Command, list[str]] | None:
    """The command ``args`` name (descending into groups) and its own arguments."""
    assert args, f"{where}: no subcommand"
    if args[0] in ("-h", "--help", "--version"):
        return None
    assert args[0] in main.commands, (
        f"{where}: no subcommand {args[0]!r} (there are {sorted(main.commands)})"
    )
    command = main.commands[args[0]]
    rest = args[1:]
    # A group (`pin add …`): its own subcommand takes the options.
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        assert rest[0] in command.commands, f"{where}: no subcommand {rest[0]!r} of {args[0]}"
        command, rest = command.commands[rest[0]], rest[1:]
    check_options(where, command, rest)
    return command, rest


def test_the_docs_show_commands() -> None:
    found = {args[0] for _, args in documented_commands()}
    # The quick start alone shows these; a parser that finds none is broken.
    assert {"keygen", "run", "status", "wait", "retry"} <= found


@pytest.mark.parametrize("where, args", list(documented_commands()), ids=lambda v: str(v)[:90])
def test_documented_command_parses(where: str, args: list[str]) -> None:
    found = check_subcommand(where, args)
    if found is None or "--help" in args or "-h" in args:
        return
    command, rest = found
    # Parsed as click would (types, ranges, required options, arguments), not run.
    if args[0] not in main.commands or main.commands[args[0]] is not command:
        args = args[1:]  # a group's subcommand
    try:
        command.make_context(args[0], rest)
    except click.ClickException as e:
        pytest.fail(f"{where}: {e.format_message()}", pytrace=False)


@pytest.mark.parametrize("where, args", list(inline_commands()), ids=lambda v: str(v)[:90])
def test_inline_command_exists(where: str, args: list[str]) -> None:
    check_subcommand(where, args)


# -- the systemd unit in the quick start -------------------------------------


def quickstart_unit() -> str:
    units = [
        body for lang, body in code_blocks((DOCS / "quickstart.md").read_text()) if lang == "ini"
    ]
    assert len(units) == 1, "quickstart.md should show one systemd unit (an ```ini block)"
    return units[0]


def unit_values(unit: str, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", unit, re.M)


def test_quickstart_unit_uses_the_default_paths() -> None:
    unit = quickstart_unit()
    assert unit_values(unit, "ReadWritePaths") == [f"{DEFAULT_SPOOL} {DEFAULT_GC_ROOTS}"]
    assert unit_values(unit, "StateDirectory") == [os.path.relpath(DEFAULT_STATE_DIR, "/var/lib")]
    # The stop timeout must leave the drain its time.
    (timeout,) = unit_values(unit, "TimeoutStopSec")
    assert float(timeout) > Settings.drain_timeout


@pytest.mark.integration
def test_quickstart_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    executable = shutil.which(COMMAND)
    if executable is None:
        pytest.fail(f"{COMMAND} is not installed; run scripts/bootstrap", pytrace=False)
    # verify wants ExecStart= to exist: point it at this machine's command.
    unit = re.sub(r"^ExecStart=\S+", f"ExecStart={executable}", quickstart_unit(), flags=re.M)
    path = tmp_path / "nix-cache-uploader.service"
    path.write_text(unit)
    out = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "nix-cache-uploader.service" not in out.stderr, out.stderr
