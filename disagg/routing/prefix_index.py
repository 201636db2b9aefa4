"""Which engine holds which prompt blocks.

Blocks are named by our own chained hash of their token ids (`block_hashes`), never by an
engine's hash: vLLM's hashes depend on its hash seed and algorithm, ours only on the tokens, so
a prompt and a KV event that carry the same tokens always meet.

Two kinds of entries share one index:
- exact ones, from an engine's KV events (`store` / `remove_engine_blocks` / `clear`), which live
  until the engine says the block is gone;
- approximate ones, learned from our own routing decisions (`record`), which expire after
  `approx_ttl_s`. They also cover the gap between a pick and the engine's events about it.

Each engine holds at most `capacity_blocks` entries; the oldest go first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

ROOT_HASH = 0
_NEVER = math.inf


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Chained hashes of the full blocks of `token_ids`: block i's hash covers blocks 0..i.

    Python hashes tuples of ints the same way in every process (only str and bytes hashing is
    seeded), so this is stable across restarts of the same interpreter version.
    """
    hashes: list[int] = []
    h = parent
    tokens = tuple(token_ids)  # one copy; tuple slices are cheap
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hash((h, tokens[start:start + block_size]))
        hashes.append(h)
    return hashes


@dataclass
class _EngineBlocks:
    # our hash -> None, in insertion order (oldest first) for capacity eviction
    order: dict[int, None]
    # the engine's own block hash -> ours, to follow parent links and removals in KV events
    from_engine: dict[Hashable, int]


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
        # our hash -> {engine_id: expiry (inf for exact entries)}
        self._holders: dict[int, dict[str, float]] = {}
        self._engines: dict[str, _EngineBlocks] = {}
        self.unresolved_blocks = 0  # blocks whose parent we never saw (events lost)

    # -- queries ----------------------------------------------------------------------------

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """For each engine holding the first block, how many leading blocks of `hashes` it holds.
        Does not modify the index."""
        hits: dict[str, int] = {}
        if not hashes:
            return hits
        now = self.clock()
        alive: set[str] | None = None
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            here = {e for e, expiry in holders.items() if expiry > now}
            alive = here if alive is None else alive & here
            if not alive:
                break
            for engine_id in alive:
                hits[engine_id] = i + 1
        return hits

    def num_blocks(self, engine_id: str | None = None) -> int:
        if engine_id is not None:
            blocks = self._engines.get(engine_id)
            return len(blocks.order) if blocks else 0
        return sum(len(b.order) for b in self._engines.values())

    def engines(self) -> list[str]:
        return list(self._engines)

    # -- approximate entries ----------------------------------------------------------------

    def record(self, engine_id: str, hashes: Sequence[int]) -> None:
        """We just sent these blocks' prompt to `engine_id`: assume it holds them for a while
        (an exact entry stays exact)."""
        expiry = self.clock() + self.approx_ttl_s
        blocks = self._blocks(engine_id)
        order = blocks.order
        holders_of = self._holders
        for h in hashes:
            holders = holders_of.get(h)
            if holders is None:
                holders = holders_of[h] = {}
            if holders.get(engine_id, 0.0) < expiry:
                holders[engine_id] = expiry
            order.pop(h, None)
            order[h] = None
        if len(order) > self.capacity_blocks:
            self._evict(engine_id, blocks)

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
        blocks = self._blocks(engine_id)
        if parent_engine_hash is None:
            parent = ROOT_HASH
        else:
            found = blocks.from_engine.get(parent_engine_hash)
            if found is None:
                self.unresolved_blocks += len(engine_hashes)
                return 0
            parent = found
        ours = block_hashes(token_ids, self.block_size, parent)
        n = min(len(ours), len(engine_hashes))
        for engine_hash, h in zip(engine_hashes[:n], ours[:n]):
            blocks.from_engine[engine_hash] = h
            self._holders.setdefault(h, {})[engine_id] = _NEVER
            self._touch(blocks, h)
        self._evict(engine_id, blocks)
        return n

    def remove_engine_blocks(self, engine_id: str, engine_hashes: Sequence[Hashable]) -> None:
        """A BlockRemoved event: the engine evicted these blocks."""
        blocks = self._engines.get(engine_id)
        if blocks is None:
            return
        for engine_hash in engine_hashes:
            h = blocks.from_engine.pop(engine_hash, None)
            if h is not None:
                self._drop(engine_id, blocks, h)

    def clear(self, engine_id: str) -> None:
        """AllBlocksCleared, or the engine left the pool: forget everything it held."""
        blocks = self._engines.pop(engine_id, None)
        if blocks is None:
            return
        for h in blocks.order:
            holders = self._holders.get(h)
            if holders is not None:
                holders.pop(engine_id, None)
                if not holders:
                    del self._holders[h]

    def expire(self) -> int:
        """Drop approximate entries past their expiry; returns how many. `match` already ignores
        them: this only frees memory."""
        now = self.clock()
        dropped = 0
        for engine_id, blocks in list(self._engines.items()):
            stale = [h for h in blocks.order if self._holders.get(h, {}).get(engine_id, _NEVER) <= now]
            for h in stale:
                self._drop(engine_id, blocks, h)
            dropped += len(stale)
        return dropped

    # -- internals --------------------------------------------------------------------------

    def _blocks(self, engine_id: str) -> _EngineBlocks:
        blocks = self._engines.get(engine_id)
        if blocks is None:
            blocks = self._engines[engine_id] = _EngineBlocks(order={}, from_engine={})
        return blocks

    @staticmethod
    def _touch(blocks: _EngineBlocks, h: int) -> None:
        blocks.order.pop(h, None)
        blocks.order[h] = None

    def _drop(self, engine_id: str, blocks: _EngineBlocks, h: int) -> None:
        blocks.order.pop(h, None)
        holders = self._holders.get(h)
        if holders is not None:
            holders.pop(engine_id, None)
            if not holders:
                del self._holders[h]

    def _evict(self, engine_id: str, blocks: _EngineBlocks) -> None:
        while len(blocks.order) > self.capacity_blocks:
            oldest = next(iter(blocks.order))
            self._drop(engine_id, blocks, oldest)
