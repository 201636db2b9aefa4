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
    clock.now = 11
    assert index.match(hashes) == {"event": 2}
    assert index.expire() == 2
    assert index.num_blocks("guess") == 0


def test_capacity_evicts_oldest_blocks() -> None:
    index = PrefixIndex(BS, capacity_blocks=2)
    hashes = block_hashes(list(range(12)), BS)
    index.record("a", hashes)
    assert index.num_blocks("a") == 2
    assert index.match(hashes) == {}  # the first block went first
