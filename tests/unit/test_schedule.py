"""The order in which a push prepares its NARs (``engine._schedule``).

A narinfo waits for its references' narinfos, so a deep closure ends with a
chain of round trips; the schedule starts that chain early when round trips
cost something, and is largest first when they do not.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uploader.engine import _heights, _schedule
from uploader.store import PathInfo

MiB = 1 << 20


def infos_of(sizes: dict[str, int], refs: dict[str, tuple[str, ...]]) -> dict[str, PathInfo]:
    """Store paths named as in ``sizes``, referencing as in ``refs``."""
    out = {}
    for name, size in sizes.items():
        references = tuple(f"/nix/store/{r}" for r in refs.get(name, ()))
        info = PathInfo(f"/nix/store/{name}", "sha256:x", size, references)
        out[info.path] = info
    return out


def names(order: list[str]) -> list[str]:
    return [p.rsplit("/", 1)[1] for p in order]


def chain(length: int, size: int) -> tuple[dict[str, int], dict[str, tuple[str, ...]]]:
    """c0 ← c1 ← … : each link references the one below it."""
    sizes = {f"c{i:03}": size for i in range(length)}
    refs = {f"c{i:03}": (f"c{i - 1:03}",) for i in range(1, length)}
    return sizes, refs


def test_heights_count_the_longest_chain_standing_on_each_path() -> None:
    # a ← b ← d, a ← c ← d, d ← e: a diamond with a tail.
    above = {"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": ["e"], "e": []}
    assert _heights(above) == {"a": 4, "b": 3, "c": 3, "d": 2, "e": 1}


def test_heights_of_a_cycle_end() -> None:
    # Never in a valid Nix database; the order must still be computed.
    heights = _heights({"a": ["b"], "b": ["a"], "c": []})
    assert heights["c"] == 1
    assert set(heights) == {"a", "b", "c"}


def test_heights_of_a_deep_closure_need_no_recursion() -> None:
    depth = 20_000
    above = {f"p{i}": [f"p{i + 1}"] for i in range(depth - 1)} | {f"p{depth - 1}": []}
    assert _heights(above)["p0"] == depth


def chain_and_leaf() -> dict[str, PathInfo]:
    """50 paths of 1 MiB in a chain, and a leaf of 300 MiB on its bottom."""
    sizes, refs = chain(50, 1 * MiB)
    sizes["leaf"] = 300 * MiB
    refs["leaf"] = ("c000",)
    return infos_of(sizes, refs)


def test_near_s3_the_largest_nar_comes_first() -> None:
    infos = chain_and_leaf()
    order = names(_schedule(infos, infos, rtt=0.0))
    assert order[0] == "leaf"
    assert order[1:] == sorted(order[1:])  # equal sizes: by name


def test_far_from_s3_the_bottom_of_a_deep_chain_comes_before_a_large_leaf() -> None:
    # 50 narinfo round trips of 20 ms stand on c000: 1 s of chain, against
    # what the leaf has left to upload once compressed (its parts in
    # flight), which goes on beside the chain.
    infos = chain_and_leaf()
    order = names(_schedule(infos, infos, rtt=0.020))
    assert order[:3] == ["c000", "c001", "c002"]
    assert order.index("leaf") > order.index("c020")


def test_a_large_nar_deep_in_a_chain_starts_before_the_small_ones_above_it() -> None:
    sizes, refs = chain(50, 1 * MiB)
    sizes["c010"] = 300 * MiB
    infos = infos_of(sizes, refs)
    order = names(_schedule(infos, infos, rtt=0.020))
    assert order.index("c010") < order.index("c011")
    # Its own upload tail counts, so it goes before the paths just below it too.
    assert order.index("c010") < order.index("c009")


def test_only_the_given_paths_are_ordered_and_others_do_not_count() -> None:
    sizes, refs = chain(10, 1 * MiB)
    infos = infos_of(sizes, refs)
    # The cache has c000…c004: what stands on c005 is all that is left.
    mine = [p for p in infos if names([p])[0] >= "c005"]
    assert names(_schedule(mine, infos, rtt=0.020)) == [f"c{i:03}" for i in range(5, 10)]


@given(
    st.lists(st.sampled_from([1 * MiB, 8 * MiB, 64 * MiB]), min_size=1, max_size=30),
    st.data(),
    st.sampled_from([0.0, 0.001, 0.020, 0.080]),
)
def test_the_order_is_every_path_once_longest_tail_first(
    sizes_list: list[int], data: st.DataObject, rtt: float
) -> None:
    # Named against the order of the closure (a reference sorts after the
    # paths standing on it), so that ties broken by name prove nothing.
    def name(i: int) -> str:
        return f"p{99 - i:02}"

    sizes = {name(i): size for i, size in enumerate(sizes_list)}
    # Each path references some earlier ones: a DAG, as a closure is.
    refs = {
        name(i): tuple(name(j) for j in data.draw(st.sets(st.integers(0, i - 1), max_size=3)))
        for i in range(1, len(sizes_list))
    }
    infos = infos_of(sizes, refs)
    order = _schedule(infos, infos, rtt=rtt)
    assert sorted(order) == sorted(infos)
    if rtt == 0.0:
        # Round trips free: by size, as before the chain was weighed.
        assert [infos[p].nar_size for p in order] == sorted(sizes_list, reverse=True)
    else:
        # A path and one standing on it, as large: the one below goes first.
        for path, info in infos.items():
            for ref in info.references:
                if infos[ref].nar_size == info.nar_size:
                    assert order.index(ref) < order.index(path)


@pytest.mark.parametrize("rtt", [0.0, 0.020])
def test_the_order_does_not_depend_on_the_order_given(rtt: float) -> None:
    sizes, refs = chain(20, 2 * MiB)
    sizes.update({"x": 5 * MiB, "y": 5 * MiB})
    infos = infos_of(sizes, refs)
    forward = _schedule(list(infos), infos, rtt=rtt)
    assert _schedule(list(reversed(infos)), infos, rtt=rtt) == forward
