"""A simulated vLLM engine: vLLM v1's scheduler at the level that sets latencies, on simpy time.

Every step runs one batch under a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`), in vLLM's order:

    1. running sequences: every decoding one computes one token; a prompt still being prefilled
       continues with the budget left (chunked prefill);
    2. waiting sequences, first come first served: prefix-cache hit (whole blocks, at most all
       but the last token), then as much of the prompt as the budget allows; a sequence whose KV
       comes from a prefill worker (`remote`) gets blocks for it and waits for the load without
       using the budget;
    3. blocks: a step that cannot get the blocks it needs preempts the newest running sequence
       (recompute: it goes back to the front of the queue, prompt and generated tokens to be
       prefilled again) until it can; a waiting sequence that does not fit waits.

The step lasts `CostModel.step_s` of its batch. At its end a sequence that finished its prompt
samples a token (its first one, or the next after a preemption), a decoding one samples its next;
full prompt blocks enter the prefix cache and are announced as KV events (BlockStored, and
BlockRemoved for the cached blocks evicted to make room). Freed blocks stay cached until evicted,
least recently freed first.

Decoding sequences are not visited one by one: the step adds one token to all of them at once.
What differs between them is kept where it changes: the step each one finishes at (a heap), and
the step each one needs its next block at (a count per step modulo the block size). So a step
costs the same with 2 or 200 sequences decoding. Steps that only decode are not simulated one by
one either: they follow each other unchanged until a sequence finishes, the blocks run out or
something arrives, so they run as one timeout (cut at the step in progress when something arrives),
with the same times, blocks and order as one step at a time.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import simpy

from disagg.messages import EngineLoad, Role
from disagg.routing.kv_events import BlockRemoved, BlockStored, KVEventBatch
from disagg.sim.cost import CostModel, attention
from disagg.sim.trace import SimRequest

_order = itertools.count()


@dataclass(eq=False, slots=True)
class Seq:
    """One request on one engine. `done` fires with True when it finished, False when the engine
    died (or refused it); `first_token_s` and `last_token_s` are set as its tokens are sampled."""

    request: SimRequest
    max_tokens: int
    done: simpy.Event
    remote: object | None = None  # where its prompt's KV is loaded from (the cluster's handle); None: computed here
    num_tokens: int = 0  # prompt + generated
    computed: int = 0  # tokens whose KV is in this engine
    generated: int = 0
    refs: list[int] = field(default_factory=list)  # prefix-cache blocks it holds (their hashes)
    private: int = 0  # blocks it holds outside the prefix cache
    cached_tokens: int = 0  # prefix-cache hit at its (last) admission
    first_token_s: float | None = None
    last_token_s: float | None = None
    preemptions: int = 0
    # while decoding: the step it joined at, its KV length then, and which join this is
    joined_step: int = 0
    joined_len: int = 0
    epoch: int = 0
    state: str = "new"  # new | waiting | loading | running | decoding | held | finished | failed

    def __post_init__(self) -> None:
        self.num_tokens = len(self.request.tokens)


class Batch:
    """What one step runs."""

    __slots__ = ("chunks", "prefill_tokens", "attention", "decode_seqs", "context")

    def __init__(self) -> None:
        self.chunks: list[tuple[Seq, int]] = []
        self.prefill_tokens = self.attention = self.decode_seqs = self.context = 0


class Engine:
    """One simulated engine. Lifecycle: `submit` sequences; the engine steps while it has work;
    `release` frees a finished sequence's blocks that were held for a transfer (prefill side);
    `loaded` tells a remote sequence its KV arrived, or failed to (decode side); `kill` ends it."""

    def __init__(self, env: simpy.Environment, engine_id: str, role: Role, cost: CostModel, *,
                 on_events: Callable[["Engine", KVEventBatch], None],
                 on_load: Callable[["Engine", Seq, int], None] | None = None, label: str = "") -> None:
        self.env, self.engine_id, self.role, self.cost = env, engine_id, role, cost
        self.label = label or role
        self.on_events, self.on_load = on_events, on_load
        lim = cost.limits
        self.block_size, self.budget, self.max_seqs = lim.block_size, lim.max_num_batched_tokens, lim.max_num_seqs
        self.num_blocks = lim.num_blocks
        self.free = lim.num_blocks  # blocks neither held nor cached
        self.cache: dict[int, int] = {}  # cached block hash -> sequences holding it
        self.evictable: dict[int, None] = {}  # cached blocks no sequence holds, least recently freed first
        self.waiting: deque[Seq] = deque()
        self.loading: set[Seq] = set()
        self.running: dict[Seq, None] = {}  # admission order: the last is preempted first
        self.prefilling: dict[Seq, None] = {}  # the running ones whose prompt is not all in yet
        self.steps = 0
        # the decoding sequences, all at once
        self.decoding = 0
        self.decode_len = 0  # their KV tokens, summed
        self.block_due = [0] * self.block_size  # per step modulo block size: how many need a block then
        self.finishing: list[tuple[int, int, int, Seq]] = []  # (step it finishes at, order, epoch, seq)
        self.alive = True
        self.busy_s = 0.0
        self.prefix_queries = self.prefix_hits = self.preemptions = 0
        self._events: list = []
        self._wake: simpy.Event | None = None
        self._in_run: tuple | None = None  # a decode run in progress: (started, elapsed(steps), steps)
        self.process = env.process(self._run())

    # -- what callers do ------------------------------------------------------------------------

    def submit(self, seq: Seq) -> None:
        if not self.alive:
            seq.state = "failed"
            seq.done.succeed(False)
            return
        seq.state = "waiting"
        self.waiting.append(seq)
        self._poke()

    def release(self, seq: Seq) -> None:
        """Free the blocks a finished sequence kept for a transfer (the decode's ack, or the lease's end)."""
        if self.alive and seq.state == "held":
            self._free(seq)
            seq.state = "finished"

    def loaded(self, seq: Seq, ok: bool) -> None:
        """A remote sequence's KV arrived (all but its last prompt token, which decode computes to
        sample from), or the transfer failed and the prompt is computed here instead."""
        if not self.alive or seq.state != "loading":
            return
        self.loading.discard(seq)
        seq.remote = None
        if ok:
            seq.computed = seq.num_tokens - 1
            self._cache_blocks(seq, len(seq.refs), seq.computed // self.block_size)
            self._flush_events()
        else:
            self._free(seq)
            seq.computed = 0
        seq.state = "waiting"
        self.waiting.appendleft(seq)  # it was admitted before those still waiting
        self._poke()

    def kill(self) -> None:
        """The engine dies: every sequence on it fails, its blocks are gone."""
        self.alive = False
        seqs = [*self.waiting, *self.loading, *self.running]
        self.waiting.clear()
        self.loading.clear()
        self.running.clear()
        self.prefilling.clear()
        self.finishing.clear()
        self.decoding = 0
        for seq in seqs:
            seq.state = "failed"
            seq.done.succeed(False)
        self._poke()

    def load(self) -> EngineLoad:
        """What a scrape of this worker reads."""
        used = self.num_blocks - self.free - len(self.evictable)
        if self._in_run is not None:  # the blocks of a decode run's steps so far (allocated at its end)
            due, b = self.block_due, self.block_size
            used += sum(due[(self.steps + i) % b] for i in range(1, self._run_steps_done() + 1))
        return EngineLoad(waiting=len(self.waiting) + len(self.loading), running=len(self.running),
                          kv_usage=used / self.num_blocks, free_blocks=self.num_blocks - used,
                          num_blocks=self.num_blocks)

    # -- the engine's loop ----------------------------------------------------------------------

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def _run(self):
        while self.alive:
            batch = self._schedule()
            self._flush_events()
            if batch is None:
                self._wake = self.env.event()
                yield self._wake
                continue
            if batch.chunks:
                steps = 1
                seconds = self.cost.step_s(batch.prefill_tokens, batch.attention, batch.decode_seqs, batch.context)
                yield self.env.timeout(seconds)
            else:
                steps, seconds = yield from self._decode_run(batch)
            if not self.alive:
                return
            self.busy_s += seconds
            self._complete(batch, steps)
            self._flush_events()

    def _decode_run(self, batch: Batch):
        """Decode-only steps back to back, up to the first that finishes a sequence or would run
        out of blocks; something arriving cuts the run at the end of the step in progress.
        Returns (steps, seconds)."""
        n = self.decoding
        first = self.cost.step_s(0, 0, n, batch.context)
        grow = self.cost.step_s(0, 0, n, batch.context + n) - first  # each step's context is n tokens longer

        def elapsed(steps: int) -> float:
            return steps * first + grow * steps * (steps - 1) / 2

        steps = self._run_length()
        self._wake = self.env.event()
        run = self.env.timeout(elapsed(steps))
        self._in_run = (self.env.now, elapsed, steps)
        woken = yield run | self._wake
        if run not in woken and self.alive:
            steps = self._run_steps_done() + 1  # to the end of the step in progress
            self._in_run = (self._in_run[0], elapsed, steps)
            yield self.env.timeout(max(self._in_run[0] + elapsed(steps) - self.env.now, 0.0))
        self._in_run = None
        return steps, elapsed(steps)

    def _run_steps_done(self) -> int:
        """Steps of the current decode run that have ended by now."""
        started, elapsed, steps = self._in_run
        done = 0
        while done < steps and started + elapsed(done + 1) <= self.env.now:
            done += 1
        return done

    def _run_length(self) -> int:
        """How many decode-only steps from now change nothing but the decoding sequences' lengths."""
        while self.finishing and self.finishing[0][2] != self.finishing[0][3].epoch:
            heapq.heappop(self.finishing)  # preempted since (it rejoined under a new epoch, or not yet)
        steps = self.finishing[0][0] - self.steps + 1 if self.finishing else 1 << 12
        room = self.free  # evicting would announce BlockRemoved: one step at a time then
        for i in range(1, steps):  # the first step's blocks are allocated already
            room -= self.block_due[(self.steps + i) % self.block_size]
            if room < 0:
                return i
        return max(steps, 1)

    def _schedule(self) -> Batch | None:
        batch = Batch()
        budget = self.budget
        # 1. running: decoding sequences (one token each), then prompts being prefilled
        if self.decoding:
            while self.decoding and not self._allocate(self.block_due[self.steps % self.block_size]):
                self._preempt()
            batch.decode_seqs = self.decoding
            batch.context = self.decode_len + self.decoding
            budget -= self.decoding
        for seq in list(self.prefilling):
            if seq.state != "running" or budget <= 0:
                continue  # preempted meanwhile, or no budget left
            chunk = min(seq.num_tokens - seq.computed, budget)
            if self._allocate(self._blocks_for(seq.computed + chunk) - self._held(seq)):
                self._add_chunk(batch, seq, chunk)
                budget -= chunk
            else:
                self._preempt(seq)  # the newest running sequences are the prompts still prefilling
        # 2. waiting, first come first served
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            hit = self._hit(seq) if not seq.computed else []
            start = seq.computed + len(hit) * self.block_size
            upto = seq.num_tokens if seq.remote else min(start + budget, seq.num_tokens)
            if not self._admit(seq, hit, upto):
                break  # it waits for blocks, and those behind it wait for it
            self.waiting.popleft()
            if seq.remote:
                seq.state = "loading"
                self.loading.add(seq)
                assert self.on_load is not None, "a remote sequence on an engine that cannot load KV"
                self.on_load(self, seq, seq.num_tokens - seq.computed)
                continue
            seq.state = "running"
            self.running[seq] = None
            self.prefilling[seq] = None
            chunk = upto - seq.computed
            self._add_chunk(batch, seq, chunk)
            budget -= chunk
        if not batch.chunks and not batch.decode_seqs:
            return None
        return batch

    def _complete(self, batch: Batch, steps: int = 1) -> None:
        now = self.env.now
        for i in range(1, steps):  # blocks of a decode run's later steps (there was room: `_run_length`)
            self._allocate(self.block_due[(self.steps + i) % self.block_size])
        self.steps += steps
        if self.decoding:  # every decoding sequence computed one token per step and sampled the next
            self.decode_len += self.decoding * steps
            done_step = self.steps - 1
            while self.finishing and self.finishing[0][0] <= done_step:
                _, _, epoch, seq = heapq.heappop(self.finishing)
                if seq.state == "decoding" and epoch == seq.epoch:
                    self._leave_decoding(seq)
                    seq.generated = seq.max_tokens
                    self._finish(seq, now)
        for seq, chunk in batch.chunks:
            if seq.state != "running":
                continue
            before = seq.computed
            seq.computed += chunk
            self._cache_blocks(seq, before // self.block_size, seq.computed // self.block_size)
            if seq.computed < seq.num_tokens:
                continue
            seq.generated += 1  # the prompt is in: sample a token
            seq.num_tokens += 1
            del self.prefilling[seq]
            if seq.first_token_s is None:
                seq.first_token_s = now
            if seq.generated >= seq.max_tokens:
                del self.running[seq]
                self._finish(seq, now)
            else:
                self._join_decoding(seq)

    # -- decoding, all at once --------------------------------------------------------------------

    def _join_decoding(self, seq: Seq) -> None:
        seq.state = "decoding"
        seq.epoch += 1
        seq.joined_step, seq.joined_len = self.steps, seq.num_tokens - 1
        self.decoding += 1
        self.decode_len += seq.joined_len
        self.block_due[(seq.joined_step - seq.joined_len) % self.block_size] += 1
        finish = seq.joined_step + seq.max_tokens - seq.generated - 1
        heapq.heappush(self.finishing, (finish, next(_order), seq.epoch, seq))

    def _leave_decoding(self, seq: Seq) -> None:
        """Take `seq` out of the decoding aggregate; its fields become its own again."""
        steps = self.steps - seq.joined_step
        kv = seq.joined_len + steps
        self.decoding -= 1
        self.decode_len -= kv
        self.block_due[(seq.joined_step - seq.joined_len) % self.block_size] -= 1
        seq.generated += steps
        seq.num_tokens = kv + 1
        seq.computed = kv
        seq.private = self._blocks_for(kv) - len(seq.refs)

    # -- blocks -------------------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _held(self, seq: Seq) -> int:
        return len(seq.refs) + seq.private

    def _allocate(self, n: int) -> bool:
        """Take `n` blocks: free ones first, then the least recently freed cached ones."""
        if n <= 0:
            return True
        if n > self.free + len(self.evictable):
            return False
        take = min(n, self.free)
        self.free -= take
        evicted = []
        for _ in range(n - take):
            h = next(iter(self.evictable))
            del self.evictable[h], self.cache[h]
            evicted.append(h)
        if evicted:
            self._events.append(BlockRemoved(block_hashes=evicted))
        return True

    def _hit(self, seq: Seq) -> list[int]:
        """The leading prompt blocks already cached (all but the last token); changes nothing."""
        hashes = seq.request.hashes(self.block_size)
        limit = min(len(hashes), (seq.num_tokens - 1) // self.block_size)
        n = 0
        while n < limit and hashes[n] in self.cache:
            n += 1
        return hashes[:n]

    def _admit(self, seq: Seq, hit: list[int], upto: int) -> bool:
        """Hold the cached blocks `hit` and blocks for the KV of tokens up to `upto`, if they fit
        (taking a cached block off the free list makes it unavailable to evict)."""
        need = self._blocks_for(upto) - len(hit) - self._held(seq)
        hit_evictable = sum(1 for h in hit if not self.cache[h])
        if need > self.free + len(self.evictable) - hit_evictable:
            return False
        for h in hit:
            if not self.cache[h]:
                del self.evictable[h]
            self.cache[h] += 1
        if hit or not seq.computed:
            seq.refs = list(hit)
            seq.computed = seq.cached_tokens = len(hit) * self.block_size
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.computed
        self._allocate(need)
        seq.private = self._blocks_for(upto) - len(seq.refs)
        return True

    def _unref(self, hashes: list[int]) -> None:
        for h in reversed(hashes):  # the prompt's tail is evicted first
            left = self.cache.get(h)
            if left is None:
                continue
            self.cache[h] = left - 1
            if left == 1:
                self.evictable[h] = None

    def _cache_blocks(self, seq: Seq, start: int, end: int) -> None:
        """Prompt blocks start..end-1 of `seq` are full: put those not cached yet in the cache."""
        hashes = seq.request.hashes(self.block_size)
        end = min(end, len(hashes))
        stored = []
        for j in range(max(start, len(seq.refs)), end):
            h = hashes[j]
            if h in self.cache or len(seq.refs) != j:
                continue  # computed twice at once (the other copy is cached), or a gap before it
            self.cache[h] = 1
            seq.refs.append(h)
            seq.private -= 1
            stored.append(j)
        if stored:
            first, last = stored[0], stored[-1] + 1
            tokens = seq.request.tokens
            b = self.block_size
            self._events.append(BlockStored(block_hashes=hashes[first:last],
                                            parent_block_hash=hashes[first - 1] if first else None,
                                            token_ids=tokens[first * b:last * b], block_size=b))

    def _free(self, seq: Seq) -> None:
        self.free += seq.private
        seq.private = 0
        self._unref(seq.refs)
        seq.refs = []

    def _add_chunk(self, batch: Batch, seq: Seq, chunk: int) -> None:
        seq.private = self._blocks_for(seq.computed + chunk) - len(seq.refs)
        batch.chunks.append((seq, chunk))
        batch.prefill_tokens += chunk
        batch.attention += attention(seq.computed, chunk)

    def _preempt(self, seq: Seq | None = None) -> None:
        """Recompute a running sequence (the newest) later: free its blocks, back to the queue's front."""
        seq = seq if seq is not None else next(reversed(self.running))
        del self.running[seq]
        self.prefilling.pop(seq, None)
        if seq.state == "decoding":
            self._leave_decoding(seq)
        self._free(seq)
        seq.computed = 0
        seq.state = "waiting"
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _finish(self, seq: Seq, now: float) -> None:
        seq.last_token_s = now
        self.running.pop(seq, None)
        if self.role == "prefill":  # its blocks wait for the decode's read
            seq.state = "held"
        else:
            self._free(seq)
            seq.state = "finished"
        seq.done.succeed(True)

    def _flush_events(self) -> None:
        if self._events:
            batch = KVEventBatch(ts=self.env.now, events=self._events)
            self._events = []
            self.on_events(self, batch)
