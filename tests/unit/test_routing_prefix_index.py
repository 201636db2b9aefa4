"""PrefixIndex: our chained block hash, exact entries from KV events, approximate entries."""

from __future__ import annotations

from disagg.routing import PrefixIndex, block_hashes

BS = 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_block_hashes_cover_only_full_blocks_and_chain() -> None:
    a = block_hashes(list(range(10)), BS)
    b = block_hashes(list(range(8)) + [99, 98, 97, 96], BS)
    assert len(a) == 2 and a == b[:2]
    assert block_hashes([9, 9, 9, 9] + list(range(4, 8)), BS)[1] != a[1]  # same tokens, other parent


def test_match_counts_leading_blocks_per_engine() -> None:
    index = PrefixIndex(BS)
    tokens = list(range(16))
    hashes = block_hashes(tokens, BS)
    index.record("a", hashes[:3])
    index.record("b", hashes[:1])
    index.record("c", hashes[1:])  # no first block: no prefix hit
    assert index.match(hashes) == {"a": 3, "b": 1}


def test_kv_events_index_blocks_by_token_chain_not_engine_hash() -> None:
    index = PrefixIndex(BS)
    tokens = list(range(12))
    assert index.store("e1", [111, 222], tokens[:8], None) == 2
    assert index.store("e1", [333], tokens[8:12], 222) == 1
    assert index.match(block_hashes(tokens, BS)) == {"e1": 3}


def test_block_with_unknown_parent_is_not_indexed() -> None:
    index = PrefixIndex(BS)
    assert index.store("e1", [333], list(range(4)), 999) == 0
    assert index.unresolved_blocks == 1
    assert index.match(block_hashes(list(range(4)), BS)) == {}


def test_removed_block_ends_the_match() -> None:
    index = PrefixIndex(BS)
    tokens = list(range(12))
    index.store("e1", [1, 2, 3], tokens, None)
    index.remove_engine_blocks("e1", [2])
    assert index.match(block_hashes(tokens, BS)) == {"e1": 1}


def test_clear_forgets_one_engine_only() -> None:
    index = PrefixIndex(BS)
    hashes = block_hashes(list(range(8)), BS)
    index.record("a", hashes)
    index.record("b", hashes)
    index.clear("a")
    assert index.match(hashes) == {"b": 2}


def test_approximate_entries_expire_but_exact_ones_stay() -> None:
    clock = Clock()
    index = PrefixIndex(BS, approx_ttl_s=10, clock=clock)
    tokens = list(range(8))
    hashes = block_hashes(tokens, BS)
    index.record("guess", hashes)
    index.store("event", [1, 2], tokens, None)
    clock.now = 5.5  # one rotation: still there
    assert index.match(hashes) == {"guess": 2, "event": 2}
    clock.now = 11
    assert index.match(hashes) == {"event": 2}
    assert index.num_blocks("guess") == 0


def test_recording_again_keeps_an_entry_alive() -> None:
    clock = Clock()
    index = PrefixIndex(BS, approx_ttl_s=10, clock=clock)
    hashes = block_hashes(list(range(8)), BS)
    for t in (0, 6, 12, 18):
        clock.now = t
        index.record("a", hashes)
    clock.now = 20
    assert index.match(hashes) == {"a": 2}


def test_exact_capacity_evicts_an_engines_oldest_blocks() -> None:
    index = PrefixIndex(BS, capacity_blocks=2)
    tokens = list(range(12))
    index.store("a", [1, 2, 3], tokens, None)
    assert index.num_blocks("a") == 2
    assert index.match(block_hashes(tokens, BS)) == {}  # the first block went first


def test_a_full_approximate_generation_rotates_early() -> None:
    index = PrefixIndex(BS, capacity_blocks=2)
    first = block_hashes(list(range(12)), BS)
    second = block_hashes(list(range(100, 112)), BS)
    third = block_hashes(list(range(200, 212)), BS)
    index.record("a", first)
    index.record("a", second)
    index.record("a", third)
    assert index.match(first) == {}
    assert index.match(third) == {"a": 3}


def test_many_engines_match_independently() -> None:
    index = PrefixIndex(BS)
    hashes = block_hashes(list(range(40)), BS)
    for e in range(100):
        index.record(f"e{e}", hashes[: 1 + e % 10])
    hits = index.match(hashes)
    assert all(hits[f"e{e}"] == 1 + e % 10 for e in range(100))


def test_a_cleared_engines_bit_is_reused_without_its_blocks() -> None:
    index = PrefixIndex(BS)
    hashes = block_hashes(list(range(8)), BS)
    index.record("old", hashes)
    index.clear("old")
    index.record("new", hashes[:1])
    assert index.match(hashes) == {"new": 1}
