"""The NixOS module, evaluated: `lib.evalModules` under the real Nix, with
nixpkgs' lib and stand-ins for the NixOS options it sets
(tests/support/nixos.py).  What a NixOS build would refuse, and the service,
hook and files it would get.

A new option is tested by evaluating it and selecting what it sets, e.g.
``evaluate({**BASE, "gc": {...}}, select="config.systemd.timers")``.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.nixos import SERVICE, EvalError, evaluate
from uploader.config import DEFAULT_GC_ROOTS, DEFAULT_STATE_DIR, Settings
from uploader.spool import DEFAULT_SPOOL
from uploader.unit import UnitParams, render_unit

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "hook" / "post-build-hook"
KEY = "/run/secrets/cache-key"
# The least a working configuration sets.
BASE: dict[str, Any] = {
    "enable": True,
    "secretKeyFile": KEY,
    "settings": {"to": "s3://my-nix-cache?region=eu-west-1"},
}
SERVICE_CONFIG = SERVICE + ".serviceConfig"


def with_settings(**settings: Any) -> dict[str, Any]:
    return {**BASE, "settings": {**BASE["settings"], **settings}}


def service(config: dict[str, Any]) -> dict[str, Any]:
    value: dict[str, Any] = evaluate(config, select=SERVICE_CONFIG).value
    return value


def refusal(config: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(EvalError) as refused:
        evaluate(config, **kwargs)
    return refused.value.message


# -- options and defaults ----------------------------------------------------


def test_disabled_it_sets_nothing() -> None:
    found = evaluate(
        {}, select="{ inherit (config.systemd) services; inherit (config.nix) settings; }"
    ).value
    assert found == {"services": {}, "settings": {}}


def test_defaults_are_the_programs_and_the_hooks() -> None:
    settings = evaluate(BASE, select="config.services.nix-cache-uploader.settings").value
    (hook_default,) = [
        line.split(":-", 1)[1].split("}", 1)[0]
        for line in HOOK.read_text().splitlines()
        if "${NIX_CACHE_UPLOADER_SPOOL:-" in line
    ]
    assert settings["spool"] == DEFAULT_SPOOL == hook_default
    assert settings["state-dir"] == DEFAULT_STATE_DIR
    assert settings["gc-roots-dir"] == DEFAULT_GC_ROOTS
    assert settings["jobs"] == Settings.jobs
    assert settings["low-priority"] is Settings.low_priority
    # The one default that differs from the program's: see the README.
    assert settings["upstream-keys"] == ["cache.nixos.org-1"]
    assert settings["tmp-dir"] is settings["metrics"] is settings["compression"] is None


CONFIG_FILE = 'config.environment.etc."nix-cache-uploader/config.toml".source'


def test_the_config_file_is_checked_and_holds_the_settings_given() -> None:
    found = evaluate(
        with_settings(metrics=9100, compression=None, jobs=8),
        select=f"{{ script = {CONFIG_FILE}.script; toml = {CONFIG_FILE}.env.configFile.value; }}",
    ).value
    assert 'check-config --config "$configFile"' in found["script"]
    toml = found["toml"]
    # TOML has no null: an unset setting is left out, so the program's default holds.
    assert "compression" not in toml and "tmp-dir" not in toml
    assert toml["jobs"] == 8
    assert toml["metrics"] == "9100"  # the program reads "[HOST:]PORT"


def test_the_service_waits_for_the_drain() -> None:
    assert service(BASE)["TimeoutStopSec"] == math.ceil(Settings.drain_timeout) + 30
    assert service(with_settings(**{"drain-timeout": 45.5}))["TimeoutStopSec"] == 76


def test_a_drain_timeout_that_is_no_number_names_the_option() -> None:
    message = refusal(with_settings(**{"drain-timeout": "60"}), select=SERVICE_CONFIG)
    assert "settings.drain-timeout" in message


def test_users_and_meta() -> None:
    found = evaluate(
        BASE, select="{ inherit (config.users) users groups; inherit (config) meta; }"
    ).value
    assert found["users"]["nix-cache-uploader"]["isSystemUser"] is True
    assert found["users"]["nix-cache-uploader"]["group"] == "nix-cache-uploader"
    assert found["groups"] == {"nix-cache-uploader": {}}
    assert found["meta"] == {"maintainers": []}


# -- what a build refuses ------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"enable": True, "secretKeyFile": KEY}, "settings.to is not set"),
        ({**BASE, "secretKeyFile": None}, "secretKeyFile is not set"),
        (
            with_settings(**{"secret-key-file": "/etc/other-key"}),
            "settings.secret-key-file is set",
        ),
        ({**BASE, "openFirewall": True}, "openFirewall is set, but settings.metrics"),
        ({**BASE, "attestKeyFile": "/run/secrets/builder"}, "secretKeyFile and attestKeyFile"),
        (
            with_settings(**{"attest-key-file": "/etc/builder-key"}),
            "settings.attest-key-file is set",
        ),
    ],
)
def test_assertions_stop_the_build(config: dict[str, Any], needle: str) -> None:
    with pytest.raises(EvalError) as refused:
        evaluate(config)
    assert any(needle in message for message in refused.value.failed_assertions)


# Older nixpkgs have no lib.types.externalPath: the module checks the same.
@pytest.mark.parametrize("lib", ["nixpkgs", "nixpkgs without externalPath"])
@pytest.mark.parametrize("option", ["secretKeyFile", "environmentFile"])
@pytest.mark.parametrize(
    "value",
    [
        '"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-cache-key"',
        'builtins.storeDir + "/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-key"',
        # A path value: interpolated anywhere, it would copy the key into the store.
        "/run/secrets/cache-key",
        '"secrets/cache-key"',
    ],
)
def test_secrets_in_the_store_or_as_path_values_are_refused(
    lib: str, option: str, value: str
) -> None:
    without = ["externalPath"] if "without" in lib else []
    message = refusal(
        BASE, modules=[f"{{ services.nix-cache-uploader.{option} = {value}; }}"],
        without_types=without, select=SERVICE_CONFIG,
    )  # fmt: skip
    assert f"services.nix-cache-uploader.{option}' is not of type" in message
    assert "absolute path not in the Nix store" in message


def test_the_lib_without_external_path_still_accepts_a_good_key() -> None:
    found = evaluate(BASE, select=SERVICE_CONFIG, without_types=["externalPath"]).value
    assert found["LoadCredential"] == f"secret-key:{KEY}"


# -- the service -------------------------------------------------------------

HARDENING: dict[str, object] = {
    "NoNewPrivileges": True,
    "ProtectSystem": "strict",
    "ProtectHome": True,
    "PrivateTmp": True,
    "PrivateDevices": True,
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectKernelTunables": True,
    "ProtectKernelModules": True,
    "ProtectKernelLogs": True,
    "ProtectControlGroups": True,
    "RestrictNamespaces": True,
    "RestrictRealtime": True,
    "LockPersonality": True,
    "MemoryDenyWriteExecute": True,
    "SystemCallFilter": ["@system-service", "~@privileged"],
    "RestrictAddressFamilies": ["AF_UNIX", "AF_INET", "AF_INET6"],
    "Restart": "on-failure",
    "KillMode": "mixed",
    "KillSignal": "SIGTERM",
    "User": "nix-cache-uploader",
    "Group": "nix-cache-uploader",
    "StateDirectory": "nix-cache-uploader",
    "LoadCredential": f"secret-key:{KEY}",
    "ReadWritePaths": [DEFAULT_SPOOL, DEFAULT_GC_ROOTS],
    "Nice": 19,
    "CPUWeight": 20,
    "IOSchedulingClass": "idle",
}


def test_the_service_is_hardened() -> None:
    found = service(BASE)
    assert {name: found.get(name) for name in HARDENING} == HARDENING
    assert found["ExecStart"].endswith(" --secret-key-file %d/secret-key")
    assert "EnvironmentFile" not in found


def test_the_service_runs_at_normal_priority_when_asked() -> None:
    found = service(with_settings(**{"low-priority": False}))
    assert not {"Nice", "CPUWeight", "IOSchedulingClass"} & set(found)


# Each directory the service writes must be in ReadWritePaths, or
# ProtectSystem=strict makes it read-only; one that may be missing gets '-',
# and a tmpfiles rule creates it without changing one that exists.
@pytest.mark.parametrize(
    ("settings", "writable", "rules"),
    [
        (
            {"to": "file:///srv/nix-cache"},
            ["-/srv/nix-cache"],
            ["d /srv/nix-cache :0755 :nix-cache-uploader :nix-cache-uploader -"],
        ),
        ({"to": "file://localhost/srv/nix-cache/?compression=xz"}, ["-/srv/nix-cache"], None),
        (
            {"tmp-dir": "/var/cache/ncu"},
            ["-/var/cache/ncu"],
            ["d /var/cache/ncu :0755 :nix-cache-uploader :nix-cache-uploader -"],
        ),
        ({"tmp-dir": "/tmp"}, [], []),  # PrivateTmp= makes it writable already
        (
            {"state-dir": "/srv/state"},
            ["/srv/state"],
            ["d /srv/state 0755 nix-cache-uploader nix-cache-uploader -"],
        ),
    ],
)
def test_every_directory_the_service_writes_is_writable_and_made(
    settings: dict[str, str], writable: list[str], rules: list[str] | None
) -> None:
    found = evaluate(
        with_settings(**settings),
        select=f"{{ service = {SERVICE_CONFIG}; rules = config.systemd.tmpfiles.rules; }}",
    ).value
    assert found["service"]["ReadWritePaths"] == [DEFAULT_SPOOL, DEFAULT_GC_ROOTS, *writable]
    if rules is not None:
        assert found["rules"][2:] == rules


def test_percent_signs_reach_systemd_literally() -> None:
    found = evaluate(
        {**with_settings(spool="/srv/100%spool"), "secretKeyFile": "/run/100%.key",
         "environmentFile": "/run/100%.env"},
        select=f"{{ service = {SERVICE_CONFIG}; rules = config.systemd.tmpfiles.rules; }}",
    ).value  # fmt: skip
    assert found["service"]["LoadCredential"] == "secret-key:/run/100%%.key"
    assert found["service"]["EnvironmentFile"] == "/run/100%%.env"
    assert found["service"]["ReadWritePaths"][0] == "/srv/100%%spool"
    assert found["rules"][0] == "d /srv/100%%spool 2770 root nix-cache-uploader -"


def test_extra_arguments_are_appended_literally() -> None:
    found = service({**BASE, "extraArgs": ["-v", "--metrics", "[::1]:9%d $HOME"]})
    assert found["ExecStart"].endswith(
        ' --secret-key-file %d/secret-key -v --metrics "[::1]:9%%d $$HOME"'
    )


@pytest.mark.parametrize(
    ("settings", "unit_settings"),
    [
        ({}, Settings()),
        ({"low-priority": False}, Settings(low_priority=False)),
        ({"to": "file:///srv/nix-cache", "tmp-dir": "/srv/tmp"},
         Settings(to="file:///srv/nix-cache", tmp_dir="/srv/tmp")),
        ({"state-dir": "/srv/state", "tmp-dir": "/tmp"},
         Settings(state_dir="/srv/state", tmp_dir="/tmp")),
    ],
)  # fmt: skip
def test_the_module_and_the_installed_unit_agree(
    settings: dict[str, Any], unit_settings: Settings
) -> None:
    """Both deployments get the same directives and writable directories."""
    found = service(with_settings(**settings))
    params = UnitParams(("/bin/nix-cache-uploader",), "/etc/c.toml", KEY, "/etc/env",
                        "nix-cache-uploader", "nix-cache-uploader", ("/bin",))  # fmt: skip
    unit = render_unit(params, unit_settings).split("[Service]")[1].split("[Install]")[0]
    in_unit: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            in_unit.setdefault(name, []).append(value)
    # The module sets the environment through `environment` and `path`, and
    # an EnvironmentFile only when given one.
    assert set(found) == set(in_unit) - {"Environment", "EnvironmentFile"}
    assert found["ReadWritePaths"] == " ".join(in_unit["ReadWritePaths"]).split()


# -- the post-build hook -------------------------------------------------------


def hook_wrapper(config: dict[str, Any], modules: Sequence[str] = ()) -> tuple[str, str]:
    """The text of the script nix.conf names, and the hook it should run."""
    found = evaluate(
        config,
        modules=modules,
        select="""{
          setting = toString config.nix.settings.post-build-hook;
          text = config.nix.settings.post-build-hook.text;
          package = toString config.services.nix-cache-uploader.package;
          users = config.nix.settings.extra-allowed-users;
        }""",
    ).value
    assert found["setting"].startswith("/nix/store/")
    assert found["users"] == ["nix-cache-uploader"]
    return found["text"], f"{found['package']}/libexec/nix-cache-uploader/post-build-hook"


def run_wrapper(text: str, hook: str, stand_in: Path) -> subprocess.CompletedProcess[str]:
    script = stand_in.parent / "wrapper"
    script.write_text(text.replace(hook, str(stand_in)))
    return subprocess.run(["bash", str(script)], capture_output=True, text=True)


def test_the_hook_gets_the_spool(tmp_path: Path) -> None:
    text, hook = hook_wrapper(with_settings(spool="/srv/my spool"))
    assert hook in text
    stand_in = tmp_path / "hook"
    stand_in.write_text('#!/bin/sh\necho "spool=$NIX_CACHE_UPLOADER_SPOOL"\nexit 0\n')
    stand_in.chmod(0o755)
    out = run_wrapper(text, hook, stand_in)
    assert (out.returncode, out.stdout) == (0, "spool=/srv/my spool\n")


@pytest.mark.parametrize("hook_text", [None, "#!/nonexistent/interpreter\n", "#!/bin/sh\nexit 3\n"])
def test_a_hook_that_cannot_run_fails_no_build(tmp_path: Path, hook_text: str | None) -> None:
    text, hook = hook_wrapper(BASE)
    stand_in = tmp_path / "hook"
    if hook_text is not None:
        stand_in.write_text(hook_text)
        stand_in.chmod(0o755)
    out = run_wrapper(text, hook, stand_in)
    assert out.returncode == 0
    assert "build not queued" in out.stderr


def test_the_post_build_hook_is_exclusive() -> None:
    message = refusal(
        BASE,
        modules=['{ nix.settings.post-build-hook = "/etc/nix/other-hook"; }'],
        select="config.nix.settings.post-build-hook",
    )
    assert "nix.settings.post-build-hook" in message


def test_the_readmes_two_hooks_recipe_runs_both(tmp_path: Path) -> None:
    readme = (REPO / "nixos-module" / "README.md").read_text()
    (recipe,) = [block for block in readme.split("```nix\n") if "lib.mkForce" in block]
    recipe = recipe.split("```", 1)[0].replace("/path/to/the/other/hook", str(tmp_path / "other"))
    text, hook = hook_wrapper(BASE, [recipe])
    (tmp_path / "other").write_text("#!/bin/sh\necho other\n")
    (tmp_path / "other").chmod(0o755)
    stand_in = tmp_path / "hook"
    stand_in.write_text('#!/bin/sh\necho "uploader $NIX_CACHE_UPLOADER_SPOOL"\n')
    stand_in.chmod(0o755)
    out = run_wrapper(text, hook, stand_in)
    assert (out.returncode, out.stdout) == (0, f"uploader {DEFAULT_SPOOL}\nother\n")


# -- metrics -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "ports", "warned"),
    [("0.0.0.0:9100", [9100], False), (9101, [9101], True), ("127.0.0.1:9102", [9102], True)],
)
def test_open_firewall_opens_the_metrics_port(
    metrics: object, ports: list[int], warned: bool
) -> None:
    found = evaluate(
        {**with_settings(metrics=metrics), "openFirewall": True},
        select="config.networking.firewall.allowedTCPPorts",
    )
    assert found.value == ports
    assert bool(found.warnings) == warned


def test_the_firewall_stays_closed_by_default() -> None:
    found = evaluate(
        with_settings(metrics="0.0.0.0:9100"), select="config.networking.firewall.allowedTCPPorts"
    )
    assert found.value == []


def test_a_builder_in_attest_mode_gets_its_own_key_and_never_the_cache_key() -> None:
    config = {**BASE, "secretKeyFile": None, "attestKeyFile": "/run/secrets/builder"}
    unit = service(config)
    assert "--attest-key-file %d/attest-key" in unit["ExecStart"]
    assert "--secret-key-file" not in unit["ExecStart"]
    assert unit["LoadCredential"] == "attest-key:/run/secrets/builder"
    # The cache machine (publisher) keeps the usual key handling.
    assert service(BASE)["LoadCredential"] == f"secret-key:{KEY}"
    for refused in ("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-key", "relative/key"):
        with pytest.raises(EvalError):
            evaluate({**config, "attestKeyFile": refused})


# -- the gc timer and the opt-in publications ----------------------------------


def test_gc_is_off_unless_enabled() -> None:
    found = evaluate(BASE, select="{ inherit (config.systemd) timers; }").value
    assert found == {"timers": {}}
    assert "nix-cache-uploader-gc" not in evaluate(BASE, select="config.systemd.services").value


def test_the_gc_timer_runs_gc_delete_on_the_cache_daily_without_the_key() -> None:
    config = {**BASE, "gc": {"enable": True, "keepDays": 14, "grace": "12h", "extraArgs": ["-v"]}}
    found = evaluate(
        config,
        select="""{
      timer = config.systemd.timers.nix-cache-uploader-gc;
      service = config.systemd.services.nix-cache-uploader-gc.serviceConfig;
      main = config.systemd.services.nix-cache-uploader.serviceConfig;
    }""",
    ).value
    assert found["timer"]["wantedBy"] == ["timers.target"]
    assert found["timer"]["timerConfig"]["OnCalendar"] == "daily"
    assert found["timer"]["timerConfig"]["Persistent"] is True
    gc = found["service"]
    assert gc["ExecStart"].split()[1:] == [
        "gc", "--delete", "--to", "s3://my-nix-cache?region=eu-west-1",
        "--keep-days", "14", "--grace", "12h", "-v",
    ]  # fmt: skip
    assert gc["Type"] == "oneshot" and gc["User"] == "nix-cache-uploader"
    assert "LoadCredential" not in gc, "gc signs nothing: it gets no key"
    # The same hardening as the uploader.
    for directive in ("ProtectSystem", "NoNewPrivileges", "SystemCallFilter", "ProtectHome"):
        assert gc[directive] == found["main"][directive]


def test_gc_durations_need_a_unit_when_the_system_is_evaluated() -> None:
    for good in ("0", "30s", "31d", "1h30m", "1.5d"):
        config = {**BASE, "gc": {"enable": True, "narDelay": good, "grace": good}}
        gc = evaluate(config, select=SERVICE + "-gc.serviceConfig").value
        assert f"--nar-delay {good}" in gc["ExecStart"]
    for bad in ("31", "soon", "1y"):
        with pytest.raises(EvalError):
            evaluate({**BASE, "gc": {"enable": True, "narDelay": bad}}, select=SERVICE + "-gc")


def test_a_file_cache_is_writable_to_gc() -> None:
    config = {**with_settings(to="file:///srv/nix-cache"), "gc": {"enable": True}}
    gc = evaluate(config, select=SERVICE + "-gc.serviceConfig").value
    assert gc["ReadWritePaths"] == ["-/srv/nix-cache"]


def test_build_logs_and_listings_are_settings_the_config_file_carries() -> None:
    config = with_settings(**{"upload-logs": True, "write-nar-listing": True})
    toml = evaluate(config, select=f"{CONFIG_FILE}.env.configFile.value").value
    assert toml["upload-logs"] is True and toml["write-nar-listing"] is True


def test_the_services_name_the_environment_file_they_read() -> None:
    """For the messages on credentials: the program would name the file
    beside its config file, which is in the Nix store here."""
    select = (
        "{ run = config.systemd.services.nix-cache-uploader.environment; "
        "gc = config.systemd.services.nix-cache-uploader-gc.environment; }"
    )
    config = {**BASE, "gc": {"enable": True}}
    for given, named in ((None, ""), ("/run/secrets/100%.env", "/run/secrets/100%%.env")):
        found = evaluate({**config, "environmentFile": given}, select=select).value
        assert found["run"]["NIX_CACHE_UPLOADER_ENVIRONMENT_FILE"] == named
        assert found["gc"] == {"NIX_CACHE_UPLOADER_ENVIRONMENT_FILE": named}


def test_a_custom_state_dir_is_home_and_systemd_makes_no_other() -> None:
    for state, directory in (("/srv/state", None), ("/var/lib/nix-cache-uploader",
                                                       "nix-cache-uploader")):  # fmt: skip
        found = evaluate(
            with_settings(**{"state-dir": state}),
            select="let s = config.systemd.services.nix-cache-uploader; in "
            "{ home = s.environment.HOME; dir = s.serviceConfig.StateDirectory or null; }",
        ).value
        assert found == {"home": state, "dir": directory}
