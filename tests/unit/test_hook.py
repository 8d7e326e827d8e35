"""The post-build hook, run for real by dash and bash (Debian's and NixOS's
/bin/sh) as nix-daemon would."""

from __future__ import annotations

import grp
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.entries import DEV, DRV, HASH, OUT
from tests.support.requirements import require_binary
from tests.support.tmpfs import small_tmpfs
from uploader._exceptions import IncompleteEntryError, SpoolError
from uploader.spool import Spool
from uploader.spoolentry import END_LINE, FORMAT_HEADER, parse_entry

HOOK = Path(__file__).parents[2] / "hook" / "post-build-hook"
# <derivation name>.<token>.<attempt>.entry; the token comes from the kernel's
# random UUIDs, or is the hook's pid where they are not available.
NAME = re.compile(rf"{HASH}-hello-2\.12\.1\.drv\.[0-9a-f]{{8}}-[0-9a-f]{{4}}\.1\.entry")
UUID = "/proc/sys/kernel/random/uuid"
FAILURE = re.compile(
    r"nix-cache-uploader hook: cannot write to (?P<spool>.+): (?P<why>.+); "
    r"the build of (?P<drv>.+) is not queued for upload\n"
)

# /bin/sh is dash on Debian and bash on NixOS (where bash runs as sh, in
# POSIX mode): the hook must work with both.
SHELLS = ["/bin/sh", "dash", "bash --posix"]


@pytest.fixture(params=SHELLS)
def shell(request: pytest.FixtureRequest) -> str:
    program, *options = str(request.param).split()
    return " ".join([require_binary(program), *options])


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
    cmd = [*(argv0 or shell.split()), str(HOOK)]
    done = subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done


def with_uuid(shell: str, uuid_text: str, tmp_path: Path, then: str = ":") -> list[str]:
    """A command that runs the hook (as its "$0") where the kernel's random
    UUID reads ``uuid_text``, after the shell code ``then`` (run with the pid
    the hook will have): predictable names, to plant things under them."""
    require_binary("unshare")
    if os.geteuid() != 0:
        pytest.skip("faking the kernel's UUID needs root (a mount namespace)")
    fake = tmp_path / "uuid"
    fake.write_text(uuid_text)
    script = f'mount --bind {fake} {UUID} && {{ {then}; }} && exec {shell} "$0"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


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
    assert NAME.fullmatch(entry.name)
    assert entry.read_text() == f"{FORMAT_HEADER}\ndrv {DRV}\nout {OUT}\nout {DEV}\n{END_LINE}\n"
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
    assert entry.read_text() == f"{FORMAT_HEADER}\ndrv {DRV}\n{END_LINE}\n"
    read = Spool(spool).read(entry.name)
    assert (read.drv, read.outputs) == (DRV, ())


def test_out_paths_are_split_on_spaces_and_never_globbed(shell: str, spool: Path) -> None:
    (spool / "glob-bait").touch()
    run_hook(shell, spool, DRV, f"  {OUT}   {DEV} * ")
    [entry] = entries(spool)
    lines = entry.read_text().splitlines()
    assert lines[2:] == [f"out {OUT}", f"out {DEV}", "out *", END_LINE]


def test_concurrent_invocations_give_their_own_entries(shell: str, spool: Path) -> None:
    env = {"NIX_CACHE_UPLOADER_SPOOL": str(spool), "DRV_PATH": DRV, "OUT_PATHS": OUT}
    hooks = [subprocess.Popen([*shell.split(), str(HOOK)], env=env) for _ in range(20)]
    assert [h.wait(timeout=30) for h in hooks] == [0] * 20
    names = Spool(spool).pending()
    assert len(names) == 20
    assert all(Spool(spool).read(n).outputs == (OUT,) for n in names)


def test_without_drv_path_the_entry_is_named_unknown_and_gets_quarantined(
    shell: str, spool: Path
) -> None:
    run_hook(shell, spool, None, OUT)
    [entry] = entries(spool)
    assert re.fullmatch(r"unknown\.[0-9a-f]{8}-[0-9a-f]{4}\.1\.entry", entry.name)
    with pytest.raises(SpoolError, match="line 2"):
        Spool(spool).read(entry.name)


def test_a_derivation_named_with_a_leading_dot_is_still_queued_as_unknown(
    shell: str, spool: Path
) -> None:
    """The uploader skips names starting with a dot (files in the making).
    If the hook kept such a derivation name, the entry would sit in the
    spool forever, neither uploaded nor quarantined: the build would be lost
    without a word."""
    run_hook(shell, spool, "/nix/store/.hidden.drv", OUT)
    [entry] = entries(spool)
    assert re.fullmatch(r"unknown\.[0-9a-f]{8}-[0-9a-f]{4}\.1\.entry", entry.name)
    assert entry.name in Spool(spool).pending()


@pytest.mark.parametrize(
    ("drv", "outs"),
    [(f"{DRV}\nout {OUT}", ""), (DRV, f"{OUT}\nout {DEV}"), (DRV, f"{OUT}\ndrv {DRV}")],
)
def test_a_newline_cannot_forge_a_line(shell: str, spool: Path, drv: str, outs: str) -> None:
    run_hook(shell, spool, drv, outs)
    [entry] = entries(spool)
    with pytest.raises(
        SpoolError, match="the hook marked this entry invalid: DRV_PATH or OUT_PATHS contains a"
    ):
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
    assert re.fullmatch(rf"{HASH}\.[0-9a-f]{{8}}-[0-9a-f]{{4}}\.1\.entry", entry.name)
    assert Spool(spool).read(entry.name).drv == drv


def test_an_empty_path_does_not_stop_the_hook(shell: str, spool: Path) -> None:
    run_hook(shell, spool, env={"PATH": ""})
    assert len(entries(spool)) == 1


@pytest.mark.parametrize("spool_state", ["ready", "missing"])
def test_the_hook_starts_no_process(shell: str, tmp_path: Path, spool_state: str) -> None:
    """Only builtins: the one process is the shell nix-daemon starts."""
    strace = require_binary("strace")
    spool = make_spool(tmp_path / "spool") if spool_state == "ready" else tmp_path / "missing"
    log = tmp_path / "strace.log"
    calls = "trace=execve,execveat,fork,vfork,clone,clone3"
    run_hook(shell, spool, argv0=[strace, "-f", "-qq", "-e", calls, "-o", str(log), *shell.split()])
    traced = [line for line in log.read_text().splitlines() if "(" in line]
    assert len(traced) == 1 and "execve(" in traced[0], traced
    assert len(entries(spool) if spool.is_dir() else []) == (spool_state == "ready")


def test_the_entry_is_created_exclusively(shell: str, tmp_path: Path) -> None:
    """The check that nothing sits under the name comes before the entry is
    opened; only O_EXCL (the shell's noclobber) closes the race between the
    two, where a symlink planted just then would be written through."""
    strace = require_binary("strace")
    spool = make_spool(tmp_path / "spool")
    log = tmp_path / "strace.log"
    run_hook(
        shell,
        spool,
        argv0=[strace, "-qq", "-e", "trace=open,openat", "-o", str(log), *shell.split()],
    )
    opened = [
        line for line in log.read_text().splitlines() if str(spool) in line and "O_CREAT" in line
    ]
    assert opened and all("O_EXCL" in line for line in opened), opened
    assert len(entries(spool)) == 1


PLANTS = {
    "symlink": 'ln -s "$VICTIM" "$ENTRY"',
    "dangling-symlink": 'ln -s "$VICTIM.new" "$ENTRY"',
    "stale-file": 'echo precious >"$ENTRY"',
    "fifo": 'mkfifo "$ENTRY"',
    "symlink-to-fifo": 'mkfifo "$VICTIM.fifo" && ln -s "$VICTIM.fifo" "$ENTRY"',
    "directory": 'mkdir "$ENTRY"',
}
PLANTED = f"{HASH}-hello-2.12.1.drv.feedface-cafe"


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
def test_whatever_sits_under_the_entry_name_is_not_written_through(
    shell: str, spool: Path, tmp_path: Path, plant: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    then = f'ENTRY="$NIX_CACHE_UPLOADER_SPOOL/{PLANTED}.1.entry"; {plant}'
    uuid = "feedface-cafe-4bad-8bad-0123456789ab\n"
    argv0 = with_uuid(shell, uuid, tmp_path, then)
    done = run_hook(shell, spool, argv0=argv0, env={"VICTIM": str(victim)})
    assert done.stderr == ""
    assert victim.read_text() == "precious\n"
    assert not Path(f"{victim}.new").exists()
    planted = spool / f"{PLANTED}.1.entry"
    if planted.is_file() and not planted.is_symlink():
        assert planted.read_text() == "precious\n"
    # The hook passed over the planted name to the next.
    assert Spool(spool).read(f"{PLANTED}.2.entry").drv == DRV


def test_when_every_name_is_taken_the_hook_says_so(shell: str, spool: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    names = f'"$NIX_CACHE_UPLOADER_SPOOL/{PLANTED}.$n.entry"'
    then = f'for n in 1 2 3; do ln -s "$VICTIM" {names}; done'
    uuid = "feedface-cafe-4bad-8bad-0123456789ab\n"
    argv0 = with_uuid(shell, uuid, tmp_path, then)
    done = run_hook(shell, spool, argv0=argv0, env={"VICTIM": str(victim)})
    assert_failed(done, "cannot create an entry (a name taken each time)")
    assert victim.read_text() == "precious\n"
    assert all(p.is_symlink() for p in entries(spool))


@pytest.mark.parametrize(
    "uuid", ["", "not a uuid\n", "../../../../etc/x-y-z-w-v\n"], ids=["empty", "garbage", "path"]
)
def test_without_a_kernel_uuid_the_pid_names_the_entry(
    shell: str, spool: Path, tmp_path: Path, uuid: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    # The pid is predictable: a name planted under it is passed over too.
    then = f'ln -s "$VICTIM" "$NIX_CACHE_UPLOADER_SPOOL/{HASH}-hello-2.12.1.drv.$$.1.entry"'
    argv0 = with_uuid(shell, uuid, tmp_path, then)
    done = run_hook(shell, spool, argv0=argv0, env={"VICTIM": str(victim)})
    assert done.stderr == ""
    assert victim.read_text() == "precious\n"
    [planted, entry] = entries(spool)
    assert planted.is_symlink()
    assert re.fullmatch(rf"{HASH}-hello-2\.12\.1\.drv\.\d+\.2\.entry", entry.name)
    assert Spool(spool).read(entry.name).drv == DRV


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


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "tmpfs", "4k") as path:
        yield path


def test_a_full_disk_is_reported_and_leaves_no_complete_entry(shell: str, tmpfs: Path) -> None:
    spool = make_spool(tmpfs / "spool")
    with open(tmpfs / "filler", "wb", buffering=0) as f, pytest.raises(OSError, match="No space"):
        while True:
            f.write(b"\0" * 4096)
    assert_failed(run_hook(shell, spool, DRV, OUT), "writing the entry failed")
    # Without `rm`, the hook leaves the file it created; lacking its end line,
    # it is never taken for a build to upload (and is quarantined later).
    [left] = entries(spool)
    with pytest.raises(IncompleteEntryError):
        Spool(spool).read(left.name)


def test_a_spool_out_of_inodes_is_reported_as_such(shell: str, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "few", "64k,nr_inodes=8") as few:
        spool = make_spool(few / "spool")
        with pytest.raises(OSError, match="No space"):
            for i in range(100):
                (few / f"inode-{i}").touch()
        assert_failed(run_hook(shell, spool, DRV, OUT), "cannot create a file there")
        assert entries(spool) == []


def test_a_read_only_spool_is_reported_and_not_fatal(shell: str, tmpfs: Path) -> None:
    spool = make_spool(tmpfs / "spool")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert_failed(run_hook(shell, spool), "not writable")
    assert os.listdir(spool) == []
