"""Content addresses checked against store paths, with paths Nix 2.8 made."""

from __future__ import annotations

import pytest

from uploader.quorum.ca import ca_gives_path

TEXT = "/nix/store/6szd5cb0dr6hpgj71b63gph9wdscgw60-qtext"
# (store path, CA, references) as `nix path-info --json` printed them.
NIX_MADE = [
    (TEXT, "text:sha256:1ricphqs68yf4qb5wbawdjysh6l64mfmbxgbrk1vc3zbijx7js9j", ()),
    (
        "/nix/store/jkjpymhj907k0xmampx4pffcmr458mwd-qtext2",
        "text:sha256:0x6h38rcq8hqibzq7gb35587fv8q2sm2753gsh633zkf3f8dbhj7",
        (TEXT,),
    ),
    (
        "/nix/store/8y6z9ampixvf6ijhgk1vg28q3v65pvy1-qflat",
        "fixed:sha256:1xk2hhjr0f2n4adj1h688wlz59xpl86y1r8bd2pjasg8gy16mikb",
        (),
    ),
    (
        "/nix/store/mf26wil4i3529j9imjqf6lhvmyc1wszk-qdir",
        "fixed:r:sha256:1jpg5v8rcf4d08rlpq51vnd1w800l64h34r0bw4vkb6z3qlk089k",
        (),
    ),
]


@pytest.mark.parametrize(("path", "ca", "refs"), NIX_MADE)
def test_content_addresses_made_by_nix_give_their_paths(
    path: str, ca: str, refs: tuple[str, ...]
) -> None:
    assert ca_gives_path(path, ca, refs)


@pytest.mark.parametrize(("path", "ca", "refs"), NIX_MADE)
def test_any_change_breaks_the_claim(path: str, ca: str, refs: tuple[str, ...]) -> None:
    other_hash = ca[:-1] + ("0" if ca[-1] != "0" else "1")
    assert not ca_gives_path(path, other_hash, refs)
    assert not ca_gives_path(path.replace("-q", "-z"), ca, refs)
    assert not ca_gives_path(path, ca, (*refs, "/nix/store/" + "0" * 32 + "-extra"))


def test_other_forms_are_not_accepted() -> None:
    assert not ca_gives_path(TEXT, "text:sha1:" + "0" * 32, ())
    assert not ca_gives_path(TEXT, "nonsense", ())
    assert not ca_gives_path(TEXT, "text:sha256:not-a-hash", ())
