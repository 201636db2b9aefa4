"""Which engine holds which prompt blocks.

Blocks are named by our own chained hash of their token ids (`block_hashes`), never by an
engine's hash: vLLM's hashes depend on its hash seed and algorithm, ours only on the tokens, so
a prompt and a KV event that carry the same tokens always meet.

Two kinds of entries share one index:
- exact ones, from an engine's KV events (`store` / `remove_engine_blocks` / `clear`), which live
  until the engine says the block is gone; each engine keeps at most `capacity_blocks`;
- approximate ones, learned from our own routing decisions (`record`), which expire: they live in
  two generations that rotate every `approx_ttl_s / 2`, so an entry lasts between half the TTL
  and the TTL, and a generation holding `capacity_blocks` rotates early. They also cover the gap
  between a pick and the engine's events about it.

Each block maps to a bit mask of the engines holding it (one bit per engine), so a match is a
chain of integer ANDs and recording a block is one dict update, whatever the number of engines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Iterator, Sequence

ROOT_HASH = 0


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Chained hashes of the full blocks of `token_ids`: block i's hash covers blocks 0..i.

    Python hashes tuples of ints the same way in every process (only str and bytes hashing is
    seeded), so this is stable across restarts of the same interpreter version.
    """
    return list(iter_block_hashes(token_ids, block_size, parent=parent))


def iter_block_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH,
                      into: list[int] | None = None) -> Iterator[int]:
    """`block_hashes` one block at a time, each also appended to `into` when given: a walk that
    stops early hashes only the blocks it reached, and can be resumed later for the rest."""
    h = parent
    # Each block copied as it is reached (not the whole prompt up front: most walks stop early).
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hash((h, tuple(token_ids[start:start + block_size])))
        if into is not None:
            into.append(h)
        yield h


@dataclass
class _ExactBlocks:
    """One engine's exact entries."""

    # our hash -> None, in insertion order (oldest first) for capacity eviction
    order: dict[int, None] = field(default_factory=dict)
    # the engine's own block hash -> ours, to follow parent links and removals in KV events
    from_engine: dict[Hashable, int] = field(default_factory=dict)


class PrefixIndex:
    def __init__(
        self,
        block_size: int,
        *,
        approx_ttl_s: float = 120.0,
        capacity_blocks: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.block_size = block_size
        self.approx_ttl_s = approx_ttl_s
        self.capacity_blocks = capacity_blocks
        self.clock = clock
        self._bits: dict[str, int] = {}  # engine id -> its bit
        self._engine_of_bit: dict[int, str] = {}
        self._free_bits: list[int] = []
        self._exact: dict[int, int] = {}  # our hash -> mask of engines with an exact entry
        self._approx_new: dict[int, int] = {}  # our hash -> mask, current generation
        self._approx_old: dict[int, int] = {}  # previous generation
        self._generation_started = clock()
        self._exact_blocks: dict[str, _ExactBlocks] = {}
        self.unresolved_blocks = 0  # blocks whose parent we never saw (events lost)

    # -- queries ----------------------------------------------------------------------------

    def match(self, hashes: Iterable[int]) -> dict[str, int]:
        """For each engine holding the first block, how many leading blocks of `hashes` it holds.
        Reads `hashes` only up to the first block nobody holds (it may be lazy: see
        `iter_block_hashes`). Does not change what the index holds."""
        self._rotate_if_due()
        exact, new, old = self._exact.get, self._approx_new.get, self._approx_old.get
        hits: dict[int, int] = {}  # bit -> leading blocks held
        alive = -1  # engines holding every block so far
        walked = 0
        for i, h in enumerate(hashes):
            walked = i + 1
            here = alive & (exact(h, 0) | new(h, 0) | old(h, 0))
            if here == alive:  # nobody dropped out at this block (the usual case)
                continue
            if i:
                _credit(hits, alive & ~here, i)
            alive = here
            if not alive:  # one walk, stopping at the first block nobody holds
                break
        if alive and walked:
            _credit(hits, alive, walked)
        engine_of = self._engine_of_bit
        return {engine_of[bit]: n for bit, n in hits.items() if bit in engine_of}

    def num_blocks(self, engine_id: str | None = None) -> int:
        """Blocks held (exact or approximate): by one engine, or index entries in all. O(size)."""
        self._rotate_if_due()
        if engine_id is None:
            return sum(len(b.order) for b in self._exact_blocks.values()) + sum(
                m.bit_count() for d in (self._approx_new, self._approx_old) for m in d.values())
        bit = self._bits.get(engine_id)
        if bit is None:
            return 0
        held = set(self._exact_blocks[engine_id].order) if engine_id in self._exact_blocks else set()
        for generation in (self._approx_new, self._approx_old):
            held.update(h for h, m in generation.items() if m & bit)
        return len(held)

    def engines(self) -> list[str]:
        return list(self._bits)

    # -- approximate entries ----------------------------------------------------------------

    def record(self, engine_id: str, hashes: Sequence[int]) -> None:
        """We just sent these blocks' prompt to `engine_id`: assume it holds them for a while."""
        self.record_pick((engine_id,), hashes)

    def record_pick(self, engine_ids: Sequence[str], hashes: Sequence[int]) -> None:
        """`record` for every engine one pick sent the prompt to (decode, and prefill when
        disaggregating), in a single pass over the blocks."""
        self._rotate_if_due()
        mask = 0
        for engine_id in engine_ids:
            mask |= self._bit(engine_id)
        new = self._approx_new
        get = new.get
        for h in hashes:
            new[h] = get(h, 0) | mask
        if len(new) > self.capacity_blocks:
            self._rotate()

    # -- exact entries (KV events) ----------------------------------------------------------

    def store(
        self,
        engine_id: str,
        engine_hashes: Sequence[Hashable],
        token_ids: Sequence[int],
        parent_engine_hash: Hashable | None,
    ) -> int:
        """A BlockStored event: the engine now holds these blocks. Returns how many were indexed
        (0 when the parent block is unknown, i.e. we missed the events that named it)."""
        blocks = self._exact_blocks.setdefault(engine_id, _ExactBlocks())
        if parent_engine_hash is None:
            parent = ROOT_HASH
        else:
            found = blocks.from_engine.get(parent_engine_hash)
            if found is None:
                self.unresolved_blocks += len(engine_hashes)
                return 0
            parent = found
        bit = self._bit(engine_id)
        ours = block_hashes(token_ids, self.block_size, parent)
        n = min(len(ours), len(engine_hashes))
        exact, order = self._exact, blocks.order
        for engine_hash, h in zip(engine_hashes[:n], ours[:n]):
            blocks.from_engine[engine_hash] = h
            exact[h] = exact.get(h, 0) | bit
            order.pop(h, None)
            order[h] = None
        while len(order) > self.capacity_blocks:
            self._drop_exact(bit, order, next(iter(order)))
        return n

    def remove_engine_blocks(self, engine_id: str, engine_hashes: Sequence[Hashable]) -> None:
        """A BlockRemoved event: the engine evicted these blocks."""
        blocks = self._exact_blocks.get(engine_id)
        bit = self._bits.get(engine_id)
        if blocks is None or bit is None:
            return
        for engine_hash in engine_hashes:
            h = blocks.from_engine.pop(engine_hash, None)
            if h is not None:
                self._drop_exact(bit, blocks.order, h)

    def clear(self, engine_id: str) -> None:
        """AllBlocksCleared, or the engine left the pool: forget everything it held (O(size))."""
        bit = self._bits.pop(engine_id, None)
        blocks = self._exact_blocks.pop(engine_id, None)
        if bit is None:
            return
        if blocks is not None:
            for h in list(blocks.order):
                self._drop_exact(bit, blocks.order, h)
        for generation in (self._approx_new, self._approx_old):
            for h in [h for h, m in generation.items() if m & bit]:
                rest = generation[h] & ~bit
                if rest:
                    generation[h] = rest
                else:
                    del generation[h]
        del self._engine_of_bit[bit]
        self._free_bits.append(bit)

    def expire(self) -> int:
        """Rotate approximate generations that are due; returns how many entries were dropped.
        `match` and `record` rotate too: this only frees memory sooner."""
        return self._rotate_if_due()

    # -- internals --------------------------------------------------------------------------

    def _bit(self, engine_id: str) -> int:
        bit = self._bits.get(engine_id)
        if bit is None:
            bit = self._free_bits.pop() if self._free_bits else 1 << len(self._engine_of_bit)
            self._bits[engine_id] = bit
            self._engine_of_bit[bit] = engine_id
        return bit

    def _drop_exact(self, bit: int, order: dict[int, None], h: int) -> None:
        order.pop(h, None)
        rest = self._exact.get(h, 0) & ~bit
        if rest:
            self._exact[h] = rest
        else:
            self._exact.pop(h, None)

    def _rotate_if_due(self) -> int:
        half = self.approx_ttl_s / 2
        elapsed = self.clock() - self._generation_started
        if elapsed < half:
            return 0
        dropped = self._rotate()
        if elapsed >= 2 * half:
            dropped += self._rotate()
        self._generation_started = self.clock()
        return dropped

    def _rotate(self) -> int:
        dropped = len(self._approx_old)
        self._approx_old = self._approx_new
        self._approx_new = {}
        return dropped


def _credit(hits: dict[int, int], bits: int, blocks: int) -> None:
    """Each engine bit in `bits` held exactly `blocks` leading blocks."""
    while bits:
        bit = bits & -bits
        hits[bit] = blocks
        bits ^= bit
