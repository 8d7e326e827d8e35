from __future__ import annotations

import grp
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from tests.support.entries import DRV, OUT, entry_bytes, v1_entry_bytes
from tests.support.tmpfs import small_tmpfs
from uploader._exceptions import ConfigError, IncompleteEntryError, SpoolError
from uploader.spool import DEFAULT_SPOOL, INCOMPLETE_GRACE, Spool, init_spool
from uploader.spoolentry import FORMAT_HEADER, MAX_ENTRY_SIZE, Entry


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    init_spool(tmp_path / "spool")
    return Spool(tmp_path / "spool")


def put(spool: Spool, name: str, data: bytes, mtime: float | None = None) -> Path:
    path = Path(spool.path, name)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_the_default_spool_is_the_one_the_hook_uses() -> None:
    hook = Path(__file__).parents[2] / "hook" / "post-build-hook"
    assert f":-{DEFAULT_SPOOL}}}" in hook.read_text()


def test_read_gives_the_entry_with_its_mtime(spool: Spool) -> None:
    put(spool, "a.entry", entry_bytes(f"drv {DRV}", f"out {OUT}"), mtime=1000.0)
    assert spool.read("a.entry") == Entry("a.entry", DRV, (OUT,), 1000.0)


def test_read_gives_format_1_entries_of_older_hooks(spool: Spool) -> None:
    put(spool, "old.entry", v1_entry_bytes(f"drv {DRV}", f"out {OUT}"), mtime=1000.0)
    assert spool.read("old.entry") == Entry("old.entry", DRV, (OUT,), 1000.0)


def test_an_entry_without_its_end_line_is_incomplete_until_the_grace_is_over(
    tmp_path: Path,
) -> None:
    now = [0.0]
    spool = Spool(tmp_path, clock=lambda: now[0])
    half = entry_bytes(f"drv {DRV}")[: -len("end\n")]
    put(spool, "half.entry", half, mtime=1000.0)
    for idle in (0.0, INCOMPLETE_GRACE - 1):
        now[0] = 1000.0 + idle
        with pytest.raises(IncompleteEntryError):
            spool.read("half.entry")
    now[0] = 1000.0 + INCOMPLETE_GRACE
    with pytest.raises(SpoolError) as info:
        spool.read("half.entry")
    assert not isinstance(info.value, IncompleteEntryError)
    assert str(info.value) == (
        "spool entry 'half.entry': incomplete: no 'end' line and no write for 10 minutes "
        "(its hook was killed, or the disk was full)"
    )
    # The grace counts from the last write: a writer that is still at it is left alone.
    put(spool, "half.entry", half, mtime=now[0] - 1)
    with pytest.raises(IncompleteEntryError):
        spool.read("half.entry")
    put(spool, "half.entry", entry_bytes(f"drv {DRV}"), mtime=1000.0)
    assert spool.read("half.entry").drv == DRV


def test_reading_a_vanished_entry_is_file_not_found(spool: Spool) -> None:
    with pytest.raises(FileNotFoundError):
        spool.read("gone.entry")


@pytest.mark.parametrize("name", ["", ".", "..", "../etc/passwd", "quarantine/x.entry"])
def test_entry_names_cannot_leave_the_spool(spool: Spool, name: str) -> None:
    with pytest.raises(SpoolError, match="not a spool entry name"):
        spool.read(name)
    with pytest.raises(SpoolError, match="not a spool entry name"):
        spool.quarantine(name, "x")


def test_an_oversize_file_is_refused_without_reading_it_whole(spool: Spool) -> None:
    put(spool, "big.entry", entry_bytes(f"drv {DRV}") + b"#" * (2 * MAX_ENTRY_SIZE))
    with pytest.raises(SpoolError, match="larger than the limit of 65536 bytes"):
        spool.read("big.entry")


def test_a_planted_symlink_is_refused_and_quarantined_itself(spool: Spool, tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0:root:/root:/bin/sh\n")
    link = Path(spool.path, "evil.entry")
    link.symlink_to(target)
    assert spool.pending() == ["evil.entry"]

    with pytest.raises(SpoolError, match="is a symlink") as info:
        spool.read("evil.entry")
    spool.quarantine("evil.entry", str(info.value))

    moved = Path(spool.quarantine_path, "evil.entry")
    assert moved.is_symlink()
    assert os.readlink(moved) == str(target)
    assert target.read_text() == "root:x:0:0:root:/root:/bin/sh\n"
    assert not link.exists() and not link.is_symlink()
    assert spool.pending() == []


def test_a_symlink_to_etc_passwd_is_not_read(spool: Spool) -> None:
    Path(spool.path, "passwd.entry").symlink_to("/etc/passwd")
    with pytest.raises(SpoolError, match="is a symlink"):
        spool.read("passwd.entry")


def test_a_fifo_is_refused_without_hanging(spool: Spool) -> None:
    os.mkfifo(Path(spool.path, "pipe.entry"))
    result: list[BaseException | Entry] = []

    def read() -> None:
        try:
            result.append(spool.read("pipe.entry"))
        except BaseException as e:
            result.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a fifo blocked"
    assert isinstance(result[0], SpoolError)
    assert "is a fifo" in str(result[0])
    spool.quarantine("pipe.entry", str(result[0]))
    assert stat.S_ISFIFO(os.lstat(Path(spool.quarantine_path, "pipe.entry")).st_mode)


def test_a_directory_named_like_an_entry_is_not_pending(spool: Spool) -> None:
    os.mkdir(Path(spool.path, "dir.entry"))
    assert spool.pending() == []
    with pytest.raises(SpoolError, match="is a directory"):
        spool.read("dir.entry")


def test_pending_is_oldest_first_and_skips_temp_files(spool: Spool) -> None:
    data = entry_bytes(f"drv {DRV}")
    put(spool, "c.entry", data, mtime=2000.0)
    put(spool, "b.entry", data, mtime=1000.0)
    put(spool, "a.entry", data, mtime=2000.0)
    put(spool, ".tmp-1234", data)
    put(spool, ".hidden.entry", data)
    put(spool, "notes.txt", data)
    spool.quarantine("a.entry", "test")
    put(spool, "a.entry", data, mtime=2000.0)
    assert spool.pending() == ["b.entry", "a.entry", "c.entry"]


def test_ack_removes_the_entry_and_is_idempotent(spool: Spool) -> None:
    put(spool, "a.entry", entry_bytes(f"drv {DRV}"))
    spool.ack("a.entry")
    spool.ack("a.entry")
    assert spool.pending() == []


def test_quarantine_and_requeue_round_trip(spool: Spool) -> None:
    put(spool, "bad.entry", b"garbage\n")
    put(spool, "worse.entry", b"\xff\xfe")
    put(spool, "good.entry", entry_bytes(f"drv {DRV}"))
    for name in ("bad.entry", "worse.entry"):
        with pytest.raises(SpoolError) as info:
            spool.read(name)
        spool.quarantine(name, str(info.value))

    assert spool.pending() == ["good.entry"]
    assert stat.S_IMODE(os.stat(spool.quarantine_path).st_mode) == 0o750
    reasons = dict(spool.quarantined())
    assert set(reasons) == {"bad.entry", "worse.entry"}
    assert f"does not start with {FORMAT_HEADER!r}" in reasons["bad.entry"]
    assert "not UTF-8" in reasons["worse.entry"]
    assert "(quarantined 20" in reasons["bad.entry"]

    assert spool.requeue(["worse.entry", "never-was.entry"]) == 1
    assert [name for name, _ in spool.quarantined()] == ["bad.entry"]
    assert spool.requeue() == 1
    assert spool.quarantined() == []
    assert sorted(os.listdir(spool.quarantine_path)) == []
    assert sorted(spool.pending()) == ["bad.entry", "good.entry", "worse.entry"]


# What uploaders that read format 1 only said of a format 2 entry.
OLDER_UPLOADERS_REFUSAL = (
    "spool entry {name!r}: unsupported format 'nix-cache-uploader-spool 2' "
    "(this uploader reads 'nix-cache-uploader-spool 1')"
)


def test_entries_quarantined_for_a_format_read_now_are_requeued(
    spool: Spool, tmp_path: Path
) -> None:
    """An older daemon quarantines the entries of a newer hook (installed
    before the daemon restarted); this one reads them, and only them."""
    entries = {
        "newer-hook.entry": entry_bytes(f"drv {DRV}"),
        "older-hook.entry": v1_entry_bytes(f"drv {DRV}"),
        "future.entry": b"nix-cache-uploader-spool 3\ndrv x\n",
        "garbage.entry": entry_bytes(f"drv {DRV}"),
        # Quarantined for something else, with the words in its own text.
        "quoting.entry": entry_bytes(f"drv {DRV}"),
    }
    others = {
        "garbage.entry": "not UTF-8",
        "quoting.entry": "spool entry 'quoting.entry': line 2: unknown line "
        "'unsupported format (this uploader reads' (expected 'drv' or 'out')",
    }
    for name, data in entries.items():
        put(spool, name, data)
        spool.quarantine(name, others.get(name, OLDER_UPLOADERS_REFUSAL.format(name=name)))
    # Planted in the quarantine: a link to an entry this uploader reads.
    secret = tmp_path / "elsewhere.entry"
    secret.write_bytes(entry_bytes(f"drv {DRV}"))
    Path(spool.quarantine_path, "planted.entry").symlink_to(secret)
    spool.record_reason("planted.entry", OLDER_UPLOADERS_REFUSAL.format(name="planted.entry"))

    assert spool.requeue_formats_read_now() == ["newer-hook.entry", "older-hook.entry"]
    assert sorted(spool.pending()) == ["newer-hook.entry", "older-hook.entry"]
    assert spool.read("newer-hook.entry").drv == DRV
    kept = [name for name, _ in spool.quarantined()]
    assert kept == ["future.entry", "garbage.entry", "planted.entry", "quoting.entry"]
    assert spool.requeue_formats_read_now() == []


def test_a_reason_is_one_line(spool: Spool) -> None:
    put(spool, "a.entry", b"x")
    spool.quarantine("a.entry", "first line\nsecond line")
    [(name, reason)] = spool.quarantined()
    assert name == "a.entry"
    assert reason.startswith("first line second line (quarantined ")
    assert Path(spool.quarantine_path, "a.entry.reason").read_text().count("\n") == 1


def test_quarantining_a_vanished_entry_does_nothing(spool: Spool) -> None:
    spool.quarantine("gone.entry", "whatever")
    assert spool.quarantined() == []


def test_stale_temp_files_are_found_and_removed(spool: Spool) -> None:
    old = time.time() - 7200
    put(spool, ".tmp-111", b"nix-cache-uploader-spool 1\n", mtime=old)
    put(spool, ".tmp-222", b"")
    Path(spool.path, ".tmp-333").symlink_to("/etc/passwd")
    os.utime(Path(spool.path, ".tmp-333"), (old, old), follow_symlinks=False)
    put(spool, "old.entry", entry_bytes(f"drv {DRV}"), mtime=old)

    assert spool.stale_temp_files(3600) == [".tmp-111", ".tmp-333"]
    assert spool.remove_stale_temp_files() == [".tmp-111", ".tmp-333"]
    assert sorted(os.listdir(spool.path)) == [".tmp-222", "old.entry"]
    assert Path("/etc/passwd").exists()


def test_watch_sees_entries_renamed_or_written_into_the_spool(spool: Spool) -> None:
    seen: list[str] = []
    changed = threading.Condition()

    def on_entry(name: str) -> None:
        with changed:
            seen.append(name)
            changed.notify_all()

    def saw(*names: str) -> bool:
        with changed:
            return changed.wait_for(lambda: all(n in seen for n in names), timeout=10)

    watch = spool.watch(on_entry)
    try:
        tmp = put(spool, ".tmp-42", entry_bytes(f"drv {DRV}"))
        os.mkdir(Path(spool.path, "sub"))
        put(spool, "sub/nested.entry", b"x")
        put(spool, "notes.txt", b"x")
        os.rename(tmp, Path(spool.path, "renamed.entry"))
        assert saw("renamed.entry")
        with open(Path(spool.path, "half.entry"), "xb", buffering=0) as half:
            half.write(entry_bytes(f"drv {DRV}")[:-4])
            put(spool, "created.entry", entry_bytes(f"drv {DRV}"))
            assert saw("created.entry")
            # inotify reports events in order: had the half-written entry's
            # creation or writes been reported, it would be seen by now.
            with changed:
                assert "half.entry" not in seen
            half.write(b"end\n")
        assert saw("half.entry")

        spool.quarantine("created.entry", "test")
        assert spool.requeue() == 1
        with changed:
            seen.remove("created.entry")
        assert saw("created.entry")
    finally:
        watch.stop()
    assert set(seen) == {"renamed.entry", "created.entry", "half.entry"}


def test_a_failing_callback_does_not_end_the_watch(spool: Spool) -> None:
    seen = threading.Event()

    def on_entry(name: str) -> None:
        if name == "first.entry":
            raise RuntimeError("boom")
        seen.set()

    watch = spool.watch(on_entry)
    try:
        put(spool, "first.entry", b"x")
        put(spool, "second.entry", b"x")
        assert seen.wait(timeout=10)
    finally:
        watch.stop()


def test_init_spool_makes_a_setgid_group_directory(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    init_spool(path)
    init_spool(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o2770


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to root needs root")
def test_init_spool_as_root_gives_the_spool_to_root_and_the_group(tmp_path: Path) -> None:
    group = next((g.gr_name for g in grp.getgrall() if g.gr_gid != 0), None)
    if group is None:
        pytest.skip("no group besides root to hand the spool to")
    gid = grp.getgrnam(group).gr_gid
    init_spool(tmp_path / "spool", group)
    st = os.stat(tmp_path / "spool")
    assert (st.st_uid, st.st_gid) == (0, gid)
    assert stat.S_IMODE(st.st_mode) == 0o2770


def test_init_spool_names_an_unknown_group(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such group 'no-such-group-xyz'"):
        init_spool(tmp_path / "spool", "no-such-group-xyz")


def test_a_full_disk_quarantines_the_entry_and_its_reason_is_written_once_there_is_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with small_tmpfs(tmp_path / "disk", "8k") as disk:
        spool = Spool(disk / "spool")
        os.mkdir(spool.path)
        os.mkdir(spool.quarantine_path, 0o750)
        put(spool, "a.entry", b"x")
        with open(disk / "filler", "wb") as f, pytest.raises(OSError, match="No space"):
            f.write(b"\0" * (1 << 20))
        with caplog.at_level("WARNING", logger="uploader.spool"):
            line = spool.quarantine("a.entry", "why it was quarantined")
        assert spool.pending() == []
        assert spool.quarantined() == [("a.entry", "(no reason recorded)")]
        assert "a.entry: the reason could not be recorded beside it" in caplog.text
        assert not Path(spool.quarantine_path, "a.entry.reason").exists()
        assert line is not None and line.startswith("why it was quarantined (quarantined ")
        with pytest.raises(OSError, match="No space"):
            spool.record_reason("a.entry", line)
        assert not Path(spool.quarantine_path, "a.entry.reason").exists()
        (disk / "filler").unlink()
        assert spool.record_reason("a.entry", line)
        assert spool.quarantined() == [("a.entry", line)]
        # An entry requeued meanwhile gets no reason file.
        assert spool.requeue() == 1
        assert not spool.record_reason("a.entry", line)
        assert os.listdir(spool.quarantine_path) == []


def test_a_quarantine_with_room_writes_its_reason_at_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    os.mkdir(spool.path)
    put(spool, "a.entry", b"x")
    assert spool.quarantine("a.entry", "bad\nentry") is None
    ((name, reason),) = spool.quarantined()
    assert name == "a.entry" and reason.startswith("bad entry (quarantined ")
