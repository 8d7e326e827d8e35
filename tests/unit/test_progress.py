from __future__ import annotations

import io

from uploader.progress import TerminalProgress, human_bytes, plural
from uploader.store import PathInfo


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 << 30) == "3.0 GiB"


def test_progress_line_is_redrawn_in_place_and_ends_with_a_newline() -> None:
    out = io.StringIO()
    progress = TerminalProgress(out, min_interval=0)
    progress.start(2, 3 << 20)
    info = PathInfo(
        path="/nix/store/" + "a" * 32 + "-x", nar_hash="", nar_size=1 << 20, references=()
    )
    progress.advance(info, True)
    progress.advance(info, True)
    progress.finish()
    text = out.getvalue()
    frames = text.split("\r\x1b[K")[1:]
    assert frames[0].startswith("[0/2] 0 B / 3.0 MiB")
    assert frames[-1].startswith("[2/2] 2.0 MiB / 3.0 MiB")
    assert text.endswith("\n") and text.count("\n") == 1


def test_progress_of_items_without_bytes_shows_a_label_and_a_rate() -> None:
    out = io.StringIO()
    progress = TerminalProgress(out, min_interval=0, label="narinfos")
    progress.start(3, 0)
    progress.step(3, 0)
    progress.finish()
    frames = out.getvalue().split("\r\x1b[K")[1:]
    assert frames[-1].startswith("narinfos [3/3] ") and frames[-1].rstrip().endswith("/s")
    assert "B" not in frames[-1]


def test_plural_and_human_bytes_at_their_edges() -> None:
    """Broken, output would read "0 path" or "1024 B" instead of "1.0 KiB"."""
    assert plural(0, "path") == "0 paths"
    assert plural(1, "entry", "entries") == "1 entry"
    assert human_bytes(1024) == "1.0 KiB"
    assert human_bytes(1024 * 1024) == "1.0 MiB"


def test_the_last_progress_frame_is_drawn_even_when_throttled() -> None:
    """Broken, a fast push would end on a frame stuck at [1/2] instead of [2/2]."""
    out = io.StringIO()
    progress = TerminalProgress(out, min_interval=3600)
    progress.start(2, 0)
    progress.step(1, 0)  # throttled
    progress.step(1, 0)  # the last: drawn anyway
    frames = out.getvalue().split("\r\x1b[K")[1:]
    assert frames[-1].startswith("[2/2] ")
