"""The command line's answers to mistakes a new user makes: one line, the
right exit code, nothing touched.  (Found trying it as a new user would.)"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from uploader._exceptions import ConfigError
from uploader.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from uploader.cli import daemon as daemon_cli
from uploader.cli._common import make_engine
from uploader.config import DEFAULT_GC_ROOTS, gc_roots_warning, load_settings
from uploader.signing import generate
from uploader.state import write_status

KEY = (
    "test-1:vMCqoKal2x7X6MtoWVCQXuI6TNQDazPxGAbkTl6o"
    "mef9CYNTelmRELB1wsGTNmQXQfwecGeEoKEj8xQg4MEj1A=="
)
STORE_PATH = "/nix/store/gxs9hr309n6jrgv3dzmbklh6rcf9iw7v-x"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_error_line(result: Result, *fragments: str, code: int = EXIT_FAILURE) -> None:
    """A clean failure: ``error: …`` naming the fragments, and no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], result.output


@pytest.fixture
def key(tmp_path: Path) -> str:
    path = tmp_path / "sk"
    path.write_text(KEY)
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    (path / "quarantine").mkdir(parents=True)
    return path


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_URLS = [
    ("s3://bucket?endpoint=http://127.0.0.1:8333&addressing-style=bogus", "addressing-style"),
    ("s3://bucket?endpoint=http://127.0.0.1:99999", "invalid port"),
    ("s3://bucket?endpoint=http://127.0.0.1:8333/some/prefix", "has a path"),
    ("s3://bucket?endpoint=ftp://127.0.0.1:8333", "endpoint must be"),
    ("file:///tmp/cache?priority=abc", "priority must be"),
    ("file:///tmp/cache?want-mass-query=maybe", "want-mass-query must be"),
    ("file:///tmp/cache?secret-key=relative/key", "secret-key must be an absolute path"),
]


@pytest.mark.parametrize(("url", "said"), BAD_URLS)
def test_bad_store_urls_are_one_line_in_every_command(
    tmp_path: Path, key: str, spool: Path, url: str, said: str
) -> None:
    # Given as --to, a usage error (exit 2) whichever command reads it…
    push = ["push", "--secret-key-file", key, STORE_PATH]
    for command in (push, ["verify"], ["gc"], ["pin", "list"], ["pin", "add", "x", STORE_PATH]):
        where = 2 if command[0] == "pin" else 1
        result = cli(*command[:where], "--to", url, *command[where:])
        one_error_line(result, said, code=EXIT_USAGE)
    # …where run and check-config, which read the config file too, say 1.
    one_error_line(cli("run", "--config", write_config(tmp_path / "c.toml", ""), "--to", url,
                       "--secret-key-file", key, "--spool", str(spool),
                       "--state-dir", str(tmp_path / "state"),
                       "--gc-roots-dir", str(tmp_path / "roots")), said)  # fmt: skip
    config = write_config(tmp_path / "c.toml", f'to = "{url}"\n')
    one_error_line(cli("check-config", "--config", config), said, config)


def test_an_unknown_aws_profile_is_an_error_to_push_and_a_warning_to_check_config(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    url = "s3://bucket?endpoint=http://127.0.0.1:8333&profile=nosuchprofile"
    one_error_line(cli("push", "--to", url, "--secret-key-file", key, STORE_PATH),
                   "profile 'nosuchprofile'", str(tmp_path / "aws-config"),
                   code=EXIT_USAGE)  # fmt: skip
    config = write_config(tmp_path / "c.toml", f'to = "{url}"\n')
    result = cli("check-config", "--config", config)
    assert result.exit_code == EXIT_OK, result.output
    assert "warning: AWS profile 'nosuchprofile' is not configured" in result.output


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ("batch-size = 0", "batch-size must be a number ≥ 1"),
        ("batch-size = -5", "batch-size must be a number ≥ 1"),
        ("retry-min = nan", "retry-min must be"),
        ("retry-max = inf", "retry-max must be"),
        ("known-ttl = -1", "known-ttl must be"),
        ("drain-timeout = -1", "drain-timeout must be"),
        ('drain-timeout = "60"', "'drain-timeout' must be a number, not \"60\""),
        ("retry-min = 10\nretry-max = 5", "retry-min (10) must be at most retry-max (5)"),
    ],
)
def test_values_that_would_break_the_daemon_are_refused_naming_the_file(
    tmp_path: Path, key: str, spool: Path, setting: str, said: str
) -> None:
    config = write_config(tmp_path / "c.toml", setting + "\n")
    one_error_line(cli("check-config", "--config", config), said, config)
    one_error_line(cli("run", "--config", config, "--to", "file:///tmp/x", "--secret-key-file",
                       key, "--spool", str(spool)), said, config)  # fmt: skip


def test_metrics_may_be_a_bare_port_number(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", "metrics = 9100\n")
    result = cli("check-config", "--config", config)
    assert result.exit_code == EXIT_OK, result.output


def test_config_files_that_cannot_be_read_exit_1_not_2(tmp_path: Path, spool: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('to = "file:///tmp/caf\xe9"\n'.encode("latin-1"))
    for config, said in ((tmp_path / "dir.toml", "is a directory"),
                         (latin1, "is not UTF-8")):  # fmt: skip
        for command in ("check-config", "status", "run"):
            one_error_line(cli(command, "--config", str(config)), said, str(config))


def test_compression_level_is_checked_before_the_cache_is_touched(tmp_path: Path, key: str) -> None:
    cache = tmp_path / "cache"
    result = cli("push", "--to", f"file://{cache}", "--secret-key-file", key,
                 "--compression-level", "99", STORE_PATH)  # fmt: skip
    one_error_line(result, "level", code=EXIT_USAGE)
    assert not cache.exists()


def test_a_spool_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nonexistent")
    for command in ("status", "retry", "wait"):
        one_error_line(cli(command, "--spool", missing), f"spool {missing} does not exist")
    one_error_line(cli("status", "--json", "--spool", missing), "does not exist")


def test_status_json_has_the_documented_fields_before_any_daemon_ran(
    tmp_path: Path, spool: Path
) -> None:
    result = cli("status", "--json", "--spool", str(spool), "--state-dir", str(tmp_path / "st"))
    assert result.exit_code == EXIT_OK, result.output
    report = json.loads(result.stdout)
    assert report["daemon"] == "unknown"
    for field in ("pending", "in_flight", "retrying", "quarantined", "last_errors"):
        assert field in report
    assert report["pending"] == 0 and report["quarantined"] == []
    text = cli("status", "--spool", str(spool), "--state-dir", str(tmp_path / "st")).output
    assert text.startswith("daemon:      unknown (no status file: never started")  # as documented


def test_status_of_a_state_directory_reports_the_spool_its_daemon_serves(
    tmp_path: Path, spool: Path
) -> None:
    (spool / "quarantine" / "bad.entry").write_text("x")
    (spool / "quarantine" / "bad.entry.reason").write_text("malformed")
    state = tmp_path / "state"
    state.mkdir()
    (state / "status.json").write_text(json.dumps({"spool": str(spool), "updated_at": 0}))
    result = cli("status", "--json", "--state-dir", str(state))
    assert result.exit_code == EXIT_OK, result.output
    assert [q["entry"] for q in json.loads(result.stdout)["quarantined"]] == ["bad.entry"]


def test_a_daemon_killed_before_it_said_so_is_not_shown_running(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = tmp_path / "state"
    state.mkdir()
    for pid, shown, in_flight in ((os.getpid(), "running", 7), (dead.pid, "not responding", 0)):
        status = {"spool": str(tmp_path), "running": True, "updated_at": time.time(),
                  "pid": pid, "in_flight": 7}  # fmt: skip
        (state / "status.json").write_text(json.dumps(status))
        result = cli("status", "--json", "--state-dir", str(state))
        assert json.loads(result.stdout)["daemon"] == shown, result.output
        # Nothing is in flight in a process that is gone: its entries wait.
        assert json.loads(result.stdout)["in_flight"] == in_flight
        shown_text = cli("status", "--state-dir", str(state)).output
        assert f" pending, {in_flight} in flight" in shown_text


def test_check_config_warns_of_gc_roots_nix_does_not_count(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml", f'to = "file://{tmp_path}/c"\ngc-roots-dir = "{tmp_path}/roots"\n'
    )
    result = cli("check-config", "--config", config)
    assert result.exit_code == EXIT_OK, result.output
    assert f"warning: gc-roots-dir {tmp_path}/roots is outside /nix/var/nix/gcroots" in (
        result.output
    )
    config = write_config(tmp_path / "d.toml", f'to = "file://{tmp_path}/c"\n')
    assert "gc-roots-dir" not in cli("check-config", "--config", config).output


def test_keygen_wants_two_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    usage_error(cli("keygen", "k-1", "key", f"{tmp_path}/key"), "two different files")
    assert not (tmp_path / "key").exists()


def test_keygen_leaves_no_half_pair_behind(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    result = cli("keygen", "test-1", str(secret), "/proc/keygen-test.pub")
    one_error_line(result, "/proc/keygen-test.pub", "was not kept")
    assert not secret.exists()
    # So that the retry, with a good path, works.
    assert cli("keygen", "test-1", str(secret), str(tmp_path / "public")).exit_code == EXIT_OK


def test_a_gc_roots_dir_that_cannot_be_created_stops_the_daemon_at_start(
    tmp_path: Path, key: str, spool: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli("run", "--config", write_config(tmp_path / "c.toml", ""), "--to",
                 f"file://{tmp_path}/cache", "--secret-key-file", key, "--spool", str(spool),
                 "--state-dir", str(tmp_path / "state"),
                 "--gc-roots-dir", str(blocker / "roots"))  # fmt: skip
    one_error_line(result, f"gc-roots-dir {blocker / 'roots'} is missing and cannot be created")


def test_usage_errors_read_like_every_other_error() -> None:
    result = cli("push", "--no-such-flag")
    assert result.exit_code == EXIT_USAGE
    assert "error: No such option" in result.output and "Error:" not in result.output


def test_wait_says_that_it_waits_forever_by_default() -> None:
    assert "wait forever" in cli("wait", "--help").output


def test_the_secret_key_may_come_from_the_store_url(tmp_path: Path, key: str) -> None:
    """Nix's own secret-key= is honoured (the path is then checked as a key)."""
    os.chmod(key, 0o644)
    result = cli("push", "--to", f"file://{tmp_path}/cache?secret-key={key}", STORE_PATH)
    one_error_line(result, f"secret key file {key} (mode 0644) is accessible by")
    result = cli("push", "--to", f"file://{tmp_path}/cache", STORE_PATH)
    one_error_line(result, "--secret-key-file is required (or secret-key=PATH", code=EXIT_USAGE)
    assert "config file" not in result.output  # push reads none
    config = write_config(tmp_path / "c.toml", f'to = "file://{tmp_path}/cache"\n')
    result = cli("run", "--config", config, "--spool", str(tmp_path))
    one_error_line(result, "or secret-key-file in the config file)")


def test_verify_of_a_cache_that_does_not_exist_is_an_error_not_clean(tmp_path: Path) -> None:
    one_error_line(cli("verify", "--to", f"file://{tmp_path}/nonexistent"), "does not exist")


# Output into a pipe is buffered unless PYTHONUNBUFFERED says otherwise.
_BUFFERED = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def _program(*args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point, in a process of its own (it ends with os._exit)."""
    return subprocess.run(
        [sys.executable, "-m", "uploader", *args], capture_output=True, text=True, env=_BUFFERED
    )


def test_the_program_keeps_its_exit_codes_and_output() -> None:
    version = _program("--version")
    assert version.returncode == EXIT_OK
    assert version.stdout.startswith("nix-cache-uploader, version ")
    helped = _program("push", "--help")
    assert helped.returncode == EXIT_OK and "--to" in helped.stdout
    wrong = _program("push", "--bogus")
    assert wrong.returncode == EXIT_USAGE
    assert "error: No such option '--bogus'" in wrong.stderr
    missing = _program("push", "--to", "file:///nonexistent", STORE_PATH)
    assert missing.returncode != EXIT_OK and "error:" in missing.stderr


def test_the_program_runs_exit_handlers_and_flushes_before_it_ends(tmp_path: Path) -> None:
    # Exit handlers (logging's, the S3 sessions' close) still run, and what
    # they leave in stdout's buffer (a pipe's is not flushed by lines) goes out.
    marker = tmp_path / "ran"
    code = (
        "import atexit, sys\n"
        "def at_exit():\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    sys.stdout.write('at exit')\n"
        "atexit.register(at_exit)\n"
        "from uploader.cli import main\n"
        "sys.argv = ['nix-cache-uploader', '--version']\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_BUFFERED
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert marker.exists()
    assert done.stdout.startswith("nix-cache-uploader, version ")
    assert done.stdout.endswith("at exit")


def test_the_command_line_loads_no_s3_client_until_a_command_needs_one() -> None:
    # boto3 and aiohttp cost 0.15 s and about 20 MiB to import: `--help`,
    # `status` or `wait` in a CI job should not pay for them.
    heavy = ("boto3", "botocore", "aiohttp", "s3transfer")
    code = f"import sys, uploader.cli; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []


def usage_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == EXIT_USAGE, result.output
    assert "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.mark.parametrize("option", ["--grace", "--nar-delay"])
def test_gc_durations_without_a_unit_are_refused_not_read_as_seconds(
    tmp_path: Path, option: str
) -> None:
    (tmp_path / "cache").mkdir()
    usage_error(cli("gc", "--to", f"file://{tmp_path}/cache", option, "31"), "31d")
    usage_error(cli("gc", "--to", f"file://{tmp_path}/cache", option, "soon"), "not a duration")
    for fine in ("0", "30s", "1h30m", "1.5d"):
        assert cli("gc", "--to", f"file://{tmp_path}/cache", option, fine).exit_code == EXIT_OK


@pytest.mark.parametrize(
    "command",
    [
        ["gc", "--delete"],
        ["gc"],
        ["pin", "add", "p", STORE_PATH],
        ["pin", "list"],
        ["pin", "rm", "p"],
    ],
)
def test_lifecycle_commands_do_not_make_a_cache_directory_that_is_missing(
    tmp_path: Path, command: list[str]
) -> None:
    url = f"file://{tmp_path}/typo"
    where = command.index("gc") + 1 if "gc" in command else 2
    one_error_line(cli(*command[:where], "--to", url, *command[where:]), "does not exist")
    assert not (tmp_path / "typo").exists()


def test_push_refuses_a_bad_root_name_and_an_upstream_it_cannot_read(
    key: str, tmp_path: Path
) -> None:
    url = f"file://{tmp_path}/cache"
    for name in ("bad name", ""):
        usage_error(cli("push", "--to", url, "--secret-key-file", key, "--root", name, STORE_PATH))
    bad = "s3://up?endpoint=http://127.0.0.1:1"
    usage_error(
        cli("push", "--to", url, "--secret-key-file", key, "--upstream", bad, STORE_PATH),
        "http:// or https://",
    )
    assert not (tmp_path / "cache").exists()


def test_verify_names_a_missing_key_file_and_an_upstream_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    url = f"file://{tmp_path}/cache"
    usage_error(cli("verify", "--to", url, "--public-key", "./nonexistent.pub"), "no such file")
    usage_error(cli("verify", "--to", url, "--public-key", str(tmp_path)), "is a directory")
    (tmp_path / "afile").write_text("")
    one_error_line(cli("gc", "--to", f"file://{tmp_path}/afile"), "is not a directory")
    usage_error(cli("verify", "--to", url, "--upstream", "s3://up"), "file://")
    assert cli("verify", "--to", url, "--upstream", f"file://{tmp_path}").exit_code == EXIT_OK


def test_log_levels_are_those_the_help_and_operations_md_give() -> None:
    """Services log their events by default, each path with -v, debug with
    -vv; commands warnings, each path with -v."""
    from uploader.cli._common import setup_logging
    from uploader.progress import PATH_EVENTS

    def shown(name: str, level: int) -> bool:
        return logging.getLogger(name).isEnabledFor(level)

    try:
        for verbose, events, paths, debug in ((0, True, False, False), (1, True, True, False),
                                              (2, True, True, True)):  # fmt: skip
            setup_logging(verbose, service=True)
            assert shown("uploader.daemon", logging.INFO) is events, verbose
            assert shown(PATH_EVENTS, logging.INFO) is paths, verbose
            assert shown("uploader.daemon", logging.DEBUG) is debug, verbose
            assert not shown("asyncio", logging.DEBUG)
        setup_logging(0)
        assert not shown("uploader.daemon", logging.INFO) and not shown(PATH_EVENTS, logging.INFO)
        setup_logging(1)
        assert shown(PATH_EVENTS, logging.INFO) and not shown(PATH_EVENTS, logging.DEBUG)
    finally:
        setup_logging(0)


def test_a_public_key_given_as_the_secret_key_is_named_as_such(tmp_path: Path) -> None:
    secret, public = tmp_path / "k.sec", tmp_path / "k.pub"
    assert cli("keygen", "mixup-1", str(secret), str(public)).exit_code == EXIT_OK
    assert public.stat().st_mode & 0o777 == 0o644  # as keygen leaves it
    result = cli("push", "--to", f"file://{tmp_path}/c", "--secret-key-file", str(public),
                 STORE_PATH)  # fmt: skip
    one_error_line(result, f"{public} is a public key; give the secret key file")
    assert "chmod" not in result.output
    config = write_config(tmp_path / "c.toml", f'to = "file://{tmp_path}/c"\n'
                          f'secret-key-file = "{public}"\n')  # fmt: skip
    one_error_line(cli("check-config", "--config", config), "is a public key")
    # A secret key readable by others is still refused for that.
    secret.chmod(0o640)
    one_error_line(cli("push", "--to", f"file://{tmp_path}/c", "--secret-key-file",
                       str(secret), STORE_PATH), "chmod 600")  # fmt: skip


def test_day_and_second_options_take_a_duration_with_units_too(tmp_path: Path) -> None:
    """--keep-days, wait --timeout, publish --interval/--expire-days take a
    bare number in their unit, or a duration as gc's --grace is written."""
    from uploader.cli._common import Span

    days, seconds = Span("days"), Span("seconds")
    assert days.convert("30", None, None) == 30 and days.convert("30d", None, None) == 30
    assert days.convert("2w", None, None) == 14 and days.convert("12h", None, None) == 0.5
    assert seconds.convert("2s", None, None) == 2 and seconds.convert("5m", None, None) == 300
    assert seconds.convert("1h30m", None, None) == 5400 and seconds.convert(7, None, None) == 7
    for bad in ("2x", "-1", "nan", "inf", ""):
        with pytest.raises(click.BadParameter):
            seconds.convert(bad, None, None)
    usage_error(cli("wait", "--spool", str(tmp_path), "--timeout", "2x"),
                "'2x' is not a number of seconds nor a duration")  # fmt: skip
    usage_error(cli("gc", "--to", f"file://{tmp_path}", "--keep-days", "30x"),
                "not a number of days")  # fmt: skip
    usage_error(cli("publish", "--to", f"file://{tmp_path}", "--interval", "0s", "--quorum", "1",
                    "--builder-key", "b-1:" + "A" * 43 + "="), "at least 0.1 seconds")  # fmt: skip


def test_verify_repair_takes_the_key_from_the_store_url_as_push_does(
    tmp_path: Path, key: str
) -> None:
    (tmp_path / "cache").mkdir()
    url = f"file://{tmp_path}/cache"
    usage_error(cli("verify", "--to", url, "--repair"), "secret-key=PATH in the store URL")
    result = cli("verify", "--to", f"{url}?secret-key={key}", "--repair")
    assert result.exit_code == EXIT_OK, result.output


def test_check_config_checks_the_compression_level_without_a_to(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", 'compression = "xz"\ncompression-level = 12\n')
    one_error_line(cli("check-config", "--config", config),
                   "compression level 12 is out of range for xz (0..9)")  # fmt: skip
    config = write_config(tmp_path / "d.toml", "compression-level = 99\n")
    one_error_line(cli("check-config", "--config", config), "out of range for zstd")
    config = write_config(tmp_path / "e.toml", 'compression = "xz"\ncompression-level = 9\n')
    assert cli("check-config", "--config", config).exit_code == EXIT_OK


def test_check_config_checks_the_urls_level_against_the_method_in_use(tmp_path: Path) -> None:
    # What `run` reads: the file's method with the URL's level.
    url = "s3://cache?region=eu-west-1&compression=zstd&compression-level=19"
    config = write_config(tmp_path / "c.toml", f'to = "{url}"\ncompression = "xz"\n')
    expected = (
        "compression level 19 is out of range for xz (0..9): the level is the store URL's "
        "compression-level=19; change it there, or set a compression level for xz"
    )
    one_error_line(cli("check-config", "--config", config), expected)
    config = write_config(
        tmp_path / "d.toml", f'to = "{url}"\ncompression = "xz"\ncompression-level = 9\n'
    )
    assert cli("check-config", "--config", config).exit_code == EXIT_OK


def test_the_urls_level_is_checked_against_the_method_a_flag_or_setting_chooses(
    tmp_path: Path,
) -> None:
    """The URL's compression=xz replaced by zstd: its level 19 is zstd's,
    not refused as out of range for xz, a method not in use."""
    url = "s3://cache?region=eu-west-1&compression=xz&compression-level=19"
    config = write_config(tmp_path / "c.toml", f'to = "{url}"\ncompression = "zstd"\n')
    assert cli("check-config", "--config", config).exit_code == EXIT_OK
    engine = make_engine(url, generate("t-1"), compression="zstd", compression_level=None, jobs=1)
    try:
        assert (engine.compression, engine.compression_level) == ("zstd", 19)
    finally:
        engine.close()
    # Without anything else, the URL's own method.
    for level, says in (("12", "out of range for xz (0..9)"), ("23", "out of range for zstd")):
        method = "xz" if level == "12" else "zstd"
        bad = f"s3://cache?region=eu-west-1&compression={method}&compression-level={level}"
        config = write_config(tmp_path / f"{level}.toml", f'to = "{bad}"\n')
        one_error_line(cli("check-config", "--config", config), says)


def test_a_level_for_no_compression_is_said_to_be_ignored(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        'to = "s3://cache?region=eu-west-1"\ncompression = "none"\ncompression-level = 5\n',
    )
    result = cli("check-config", "--config", config)
    assert result.exit_code == EXIT_OK, result.output
    assert "warning: compression is none: compression-level 5 is ignored" in result.output


def test_a_setting_turns_off_the_urls_nar_listing(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/cache?write-nar-listing=true"
    for setting, expected in ((None, True), (False, False), (True, True)):
        engine = make_engine(url, generate("t-1"), compression=None, compression_level=None,
                             jobs=1, write_nar_listing=setting)  # fmt: skip
        try:
            assert engine.write_nar_listing is expected, setting
        finally:
            engine.close()
    engine = make_engine(f"file://{tmp_path}/cache", generate("t-1"), compression=None,
                         compression_level=None, jobs=1)  # fmt: skip
    assert engine.write_nar_listing is False
    engine.close()


def test_pin_add_without_a_name_says_so(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    usage_error(
        cli("pin", "add", "--to", url, "./result"),
        "pin add needs a NAME before the paths, e.g. `pin add --to URL release ./result`",
    )
    usage_error(cli("pin", "add", "--to", url, "release"), "needs at least one PATH")


def test_command_lists_show_each_description_whole() -> None:
    for group in ([], ["pin"], ["quorum"]):
        listed = cli(*group, "--help").output.split("Commands:", 1)[1]
        assert "..." not in listed.replace("PATH...", ""), listed


def test_keygen_with_a_bad_name_is_a_usage_error_and_values_read_as_toml(
    tmp_path: Path,
) -> None:
    usage_error(cli("keygen", "bad name", str(tmp_path / "s"), str(tmp_path / "p")),
                "invalid key name 'bad name'")  # fmt: skip
    assert not (tmp_path / "s").exists()
    config = write_config(tmp_path / "c.toml", "retry-min = true\n")
    one_error_line(cli("check-config", "--config", config), "must be a number, not true")


def test_status_names_the_subject_of_an_error_once(tmp_path: Path, spool: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = "/nix/store/" + "a" * 32 + "-big"
    errors = [
        {"time": 0, "subject": path, "error": f"{path}: no space left in /tmp for …"},
        {"time": 0, "subject": path, "error": f"{path} differs from what the Nix database …"},
        {"time": 0, "subject": "e.entry", "error": "not UTF-8"},
    ]
    status = {"spool": str(spool), "updated_at": 0, "last_errors": errors}
    (state / "status.json").write_text(json.dumps(status))
    shown = cli("status", "--state-dir", str(state)).output
    assert f"{path}: no space left" in shown and f"{path}: {path}" not in shown
    assert f" {path} differs from" in shown
    assert "e.entry: not UTF-8" in shown


def test_retry_says_when_no_daemon_will_retry_now(tmp_path: Path) -> None:
    """Stopped, killed or hung: `retry` printed only the requeue count, as if
    the daemon had been asked."""
    from uploader.state import write_status

    spool, state = tmp_path / "spool", tmp_path / "state"
    spool.mkdir()
    state.mkdir()
    args = ("retry", "--spool", str(spool), "--state-dir", str(state))
    never = cli(*args)
    assert never.exit_code == EXIT_OK, never.output
    assert "the daemon is not running; entries wait for its next start" in never.output
    # A process that is gone: nothing here may signal this test's own.
    child = subprocess.Popen(["true"])
    child.wait()
    write_status(str(state), {"running": False, "pid": child.pid, "updated_at": time.time()})
    assert "the daemon is not running" in cli(*args).output
    hung = {"running": True, "pid": child.pid, "updated_at": time.time() - 3600}
    write_status(str(state), hung)
    an_hour_ago = time.time() - 3600
    for status_file in state.iterdir():
        os.utime(status_file, (an_hour_ago, an_hour_ago))
    assert "the daemon is not responding" in cli(*args).output


# -- settings: the config file and the flags ---------------------------------


def test_a_flag_overrides_the_config_file(tmp_path: Path) -> None:
    """Broken, `run --config F --to X` would upload to the file's `to`, not X."""
    path = write_config(
        tmp_path / "c.toml", 'to = "s3://from-file"\njobs = 8\nlow-priority = true\n'
    )
    settings = load_settings(path, {"to": "s3://from-flag", "jobs": 2, "low-priority": False})
    assert (settings.to, settings.jobs, settings.low_priority) == ("s3://from-flag", 2, False)
    # …and a flag not given leaves the file's value.
    assert load_settings(path, {"to": None, "jobs": None}).jobs == 8


def test_list_flags_not_given_leave_the_config_files_lists(tmp_path: Path) -> None:
    """Broken, `run --config F` without --upstream (click passes ()) would
    drop the file's upstreams and upload again all cache.nixos.org serves."""
    path = write_config(
        tmp_path / "c.toml",
        'upstream = ["https://cache.nixos.org"]\nupstream-keys = ["cache.nixos.org-1"]\n',
    )
    settings = load_settings(path, {"upstream": (), "upstream-keys": ()})
    assert settings.upstream == ("https://cache.nixos.org",)
    assert settings.upstream_keys == ("cache.nixos.org-1",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("jobs = 65\n", "jobs must be between 1 and 64, not 65"),
        ("jobs = 0\n", "jobs must be between 1 and 64, not 0"),
        ("retry-min = 10\nretry-max = 9.5\n", "retry-min (10) must be at most retry-max (9.5)"),
        ("jobs = true\n", "setting 'jobs' must be an integer, not true"),
        ("low-priority = 1\n", "setting 'low-priority' must be true or false, not 1"),
        ("upload-logs = 0\n", "setting 'upload-logs' must be true or false, not 0"),
    ],
)
def test_settings_just_out_of_bounds_or_of_the_wrong_type_are_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    """Broken, a setting just past its bound, or `jobs = true` and
    `low-priority = 1`, would be taken instead of named as a mistake."""
    with pytest.raises(ConfigError) as e:
        load_settings(write_config(tmp_path / "c.toml", text), {})
    assert message in str(e.value)


def test_settings_at_their_bounds_are_accepted(tmp_path: Path) -> None:
    """Broken, `jobs = 64` or retry-min equal to retry-max would be refused."""
    path = write_config(tmp_path / "c.toml", "jobs = 64\nretry-min = 9\nretry-max = 9\n")
    settings = load_settings(path, {})
    assert (settings.jobs, settings.retry_min, settings.retry_max) == (64, 9, 9)


def test_a_gc_roots_dir_beside_gcroots_is_warned_about() -> None:
    """Broken, /nix/var/nix/gcroots-old/… would get no warning, although
    Nix counts no roots there and garbage collection would delete the paths."""
    assert gc_roots_warning(DEFAULT_GC_ROOTS) is None
    assert gc_roots_warning("/nix/var/nix/gcroots-old/nix-cache-uploader") is not None


def test_wait_gives_up_with_exit_3_when_the_timeout_is_reached(tmp_path: Path, spool: Path) -> None:
    """Broken, a script's `wait --timeout` would hang past its timeout or
    exit with a code it cannot tell from a failure."""
    (spool / "x.drv.1.entry").write_text("nix-cache-uploader-spool 1\n")
    started = time.monotonic()
    result = cli("wait", "--spool", str(spool), "--state-dir", str(tmp_path / "state"),
                 "--timeout", "0.5")  # fmt: skip
    took = time.monotonic() - started
    assert result.exit_code == 3, result.output  # as documented for scripts
    assert "timed out after 0.5s: 1 entry still queued" in result.stderr
    # In process (no start-up): it gave up at --timeout, not seconds later.
    # A functional bound, generous for a loaded machine.
    assert took < 4.5


def test_wait_counts_in_flight_entries_once_when_only_the_status_tells(
    tmp_path: Path, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CI user who cannot list the spool is told the daemon's count: its
    `pending` includes the entries in flight, which were counted twice."""
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setattr(daemon_cli, "_spool_pending", lambda settings: None)
    write_status(
        str(state),
        {"spool": str(spool), "running": True, "pid": os.getpid(), "updated_at": time.time() + 60,
         "pending": 3, "in_flight": 2},
    )  # fmt: skip
    result = cli("wait", "--spool", str(spool), "--state-dir", str(state), "--timeout", "0.2")
    assert result.exit_code == 3, result.output
    assert "timed out after 0.2s: 3 entries still queued" in result.stderr
