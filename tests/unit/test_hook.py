"""The post-build hook, run for real by /bin/sh and dash as nix-daemon would."""

from __future__ import annotations

import grp
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from uploader._exceptions import SpoolError
from uploader.spool import Spool
from uploader.spoolentry import FORMAT_HEADER, parse_entry

HOOK = Path(__file__).parents[2] / "hook" / "post-build-hook"
HASH = "gxs9hr309n6jrgv3dzmbklh6rcf9iw7v"
DRV = f"/nix/store/{HASH}-hello-2.12.1.drv"
OUT = f"/nix/store/{HASH}-hello-2.12.1"
DEV = f"/nix/store/{HASH}-hello-2.12.1-dev"
FAILURE = re.compile(
    r"nix-cache-uploader hook: cannot write to (?P<spool>.+): (?P<why>.+); "
    r"the build of (?P<drv>.+) is not queued for upload\n"
)

# /bin/sh is dash on Debian and bash on NixOS: the hook must work with both.
SHELLS = ["/bin/sh", *filter(None, (shutil.which("dash"), shutil.which("bash")))]


@pytest.fixture(params=SHELLS)
def shell(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_spool(path: Path) -> Path:
    """A spool as installed: mode 2770 and, when we may, a group other than ours."""
    path.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, 0, spool_group().gr_gid)
    os.chmod(path, 0o2770)
    return path


def spool_group() -> grp.struct_group:
    for name in ("nixbld", "nogroup"):
        try:
            return grp.getgrnam(name)
        except KeyError:
            continue
    pytest.skip("no group nixbld or nogroup to give the spool to")


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return make_spool(tmp_path / "spool")


def run_hook(
    shell: str,
    spool: Path,
    drv: str | None = DRV,
    outs: str = "",
    *,
    argv0: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": os.environ["PATH"], "NIX_CACHE_UPLOADER_SPOOL": str(spool)}
    environment["OUT_PATHS"] = outs
    if drv is not None:
        environment["DRV_PATH"] = drv
    environment.update(env or {})
    cmd = [*(argv0 or [shell]), str(HOOK)]
    done = subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    if spool.is_dir():
        leftovers = [n for n in os.listdir(spool) if n.startswith(".tmp-")]
        assert leftovers == [], "the hook left temp files behind"
    return done


def entries(spool: Path) -> list[Path]:
    return sorted(p for p in spool.iterdir() if p.name.endswith(".entry"))


def assert_failed(done: subprocess.CompletedProcess[str], why: str) -> None:
    match = FAILURE.fullmatch(done.stderr)
    assert match is not None, f"expected one failure line, got {done.stderr!r}"
    assert why in match["why"]


def test_the_hook_is_an_executable_sh_script() -> None:
    assert HOOK.read_text().startswith("#!/bin/sh\n")
    assert stat.S_IMODE(HOOK.stat().st_mode) == 0o755


def test_an_entry_has_the_derivation_and_outputs(shell: str, spool: Path) -> None:
    done = run_hook(shell, spool, DRV, f"{OUT} {DEV}")
    assert done.stdout == done.stderr == ""
    [entry] = entries(spool)
    assert re.fullmatch(rf"{HASH}-hello-2\.12\.1\.drv\.\d+\.entry", entry.name)
    assert entry.read_text() == f"{FORMAT_HEADER}\ndrv {DRV}\nout {OUT}\nout {DEV}\n"
    parsed = parse_entry(entry.read_bytes(), entry.name)
    assert (parsed.drv, parsed.outputs) == (DRV, (OUT, DEV))


def test_an_entry_is_readable_by_the_spool_group_only(shell: str, spool: Path) -> None:
    run_hook(shell, spool)
    [entry] = entries(spool)
    st = entry.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_gid == spool.stat().st_gid
    if os.geteuid() == 0:
        assert st.st_gid == spool_group().gr_gid


def test_empty_out_paths_still_queue_the_derivation(shell: str, spool: Path) -> None:
    run_hook(shell, spool, DRV, "")
    [entry] = entries(spool)
    assert entry.read_text() == f"{FORMAT_HEADER}\ndrv {DRV}\n"
    read = Spool(spool).read(entry.name)
    assert (read.drv, read.outputs) == (DRV, ())


def test_out_paths_are_split_on_spaces_and_never_globbed(shell: str, spool: Path) -> None:
    (spool / "glob-bait").touch()
    run_hook(shell, spool, DRV, f"  {OUT}   {DEV} * ")
    [entry] = entries(spool)
    lines = entry.read_text().splitlines()
    assert lines[2:] == [f"out {OUT}", f"out {DEV}", "out *"]


def test_each_invocation_gives_its_own_entry(shell: str, spool: Path) -> None:
    run_hook(shell, spool, DRV, OUT)
    run_hook(shell, spool, DRV, OUT)
    assert len(set(Spool(spool).pending())) == 2


def test_without_drv_path_the_entry_is_named_unknown_and_gets_quarantined(
    shell: str, spool: Path
) -> None:
    run_hook(shell, spool, None, OUT)
    [entry] = entries(spool)
    assert re.fullmatch(r"unknown\.\d+\.entry", entry.name)
    with pytest.raises(SpoolError, match="line 2"):
        Spool(spool).read(entry.name)


@pytest.mark.parametrize(
    ("drv", "outs"),
    [(f"{DRV}\nout {OUT}", ""), (DRV, f"{OUT}\nout {DEV}"), (DRV, f"{OUT}\ndrv {DRV}")],
)
def test_a_newline_cannot_forge_a_line(shell: str, spool: Path, drv: str, outs: str) -> None:
    run_hook(shell, spool, drv, outs)
    [entry] = entries(spool)
    with pytest.raises(SpoolError, match="line 2: unknown line 'invalid: DRV_PATH or OUT_PATHS"):
        Spool(spool).read(entry.name)


def test_other_odd_values_are_left_for_the_uploader_to_refuse(shell: str, spool: Path) -> None:
    run_hook(shell, spool, DRV, f"{OUT}\t/etc/passwd")
    [entry] = entries(spool)
    with pytest.raises(SpoolError, match=r"line 3: .*contains whitespace"):
        Spool(spool).read(entry.name)


def test_a_name_too_long_for_the_file_system_is_cut_to_the_hash(shell: str, spool: Path) -> None:
    drv = f"/nix/store/{HASH}-{'x' * 207}.drv"
    run_hook(shell, spool, drv)
    [entry] = entries(spool)
    assert re.fullmatch(rf"{HASH}\.\d+\.entry", entry.name)
    assert Spool(spool).read(entry.name).drv == drv


def test_an_empty_path_does_not_stop_the_hook(shell: str, spool: Path) -> None:
    run_hook(shell, spool, env={"PATH": ""})
    assert len(entries(spool)) == 1


@pytest.mark.parametrize(
    "plant",
    [
        'ln -s "$VICTIM" "$TMP"',
        'touch "$TMP"',
        'mkfifo "$TMP"',
        'mkfifo "$VICTIM.fifo" && ln -s "$VICTIM.fifo" "$TMP"',
    ],
    ids=["symlink", "stale-file", "fifo", "symlink-to-fifo"],
)
def test_whatever_sits_under_the_temp_name_is_not_written_through(
    shell: str, spool: Path, tmp_path: Path, plant: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    # exec keeps the pid, so the hook's $$ is the one the planted name uses.
    script = f'TMP="$NIX_CACHE_UPLOADER_SPOOL/.tmp-$$"; {plant} && exec {shell} "$0"'
    done = run_hook(shell, spool, argv0=[shell, "-c", script], env={"VICTIM": str(victim)})
    assert done.stderr == ""
    assert victim.read_text() == "precious\n"
    [entry] = entries(spool)
    assert Spool(spool).read(entry.name).drv == DRV


def test_a_directory_planted_under_the_final_name_is_not_moved_into(
    shell: str, spool: Path
) -> None:
    name = f'"$NIX_CACHE_UPLOADER_SPOOL/{HASH}-hello-2.12.1.drv.$$.entry"'
    plant = f'mkdir {name} && exec {shell} "$0"'
    done = run_hook(shell, spool, argv0=[shell, "-c", plant])
    assert_failed(done, "renaming the entry into place failed")
    [planted] = entries(spool)
    assert planted.is_dir() and list(planted.iterdir()) == []


def test_a_missing_spool_is_reported_and_not_fatal(shell: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-spool"
    done = run_hook(shell, missing)
    assert_failed(done, "no such directory")
    match = FAILURE.fullmatch(done.stderr)
    assert match is not None and (match["spool"], match["drv"]) == (str(missing), DRV)
    assert not missing.exists()


def test_a_spool_that_is_a_file_is_reported_and_not_fatal(shell: str, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "spool"
    not_a_dir.write_text("")
    assert_failed(run_hook(shell, not_a_dir), "not a directory")
    assert not_a_dir.read_text() == ""


def test_an_unwritable_spool_is_reported_and_not_fatal(shell: str, spool: Path) -> None:
    if os.geteuid() != 0:
        spool.chmod(0o550)
        assert_failed(run_hook(shell, spool), "not writable")
        assert entries(spool) == []
        return
    # Root writes through permission bits: make the spool a read-only mount.
    subprocess.run(["mount", "--bind", str(spool), str(spool)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(spool)], check=True)
        assert_failed(run_hook(shell, spool), "not writable")
        assert entries(spool) == []
    finally:
        subprocess.run(["umount", str(spool)], check=True)


def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        # Only this case is skipped, and only because it needs a file system
        # we can fill or freeze; CI runs as root, where mounting works.
        pytest.skip(f"cannot mount a small tmpfs to fill: {done.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs to fill needs root and mount(8)")
    path = tmp_path / "tmpfs"
    mount_tmpfs(path, "size=4k")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_is_reported_and_leaves_nothing_behind(shell: str, tmpfs: Path) -> None:
    spool = make_spool(tmpfs / "spool")
    with open(tmpfs / "filler", "wb", buffering=0) as f, pytest.raises(OSError, match="No space"):
        while True:
            f.write(b"\0" * 4096)
    assert_failed(run_hook(shell, spool, DRV, OUT), "writing the entry failed")
    assert os.listdir(spool) == []


def test_a_read_only_spool_is_reported_and_not_fatal(shell: str, tmpfs: Path) -> None:
    spool = make_spool(tmpfs / "spool")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert_failed(run_hook(shell, spool), "not writable")
    assert os.listdir(spool) == []
