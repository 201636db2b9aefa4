"""The scheduler: one `pick()` per request, choosing a decode endpoint and, when it pays, a
prefill endpoint (design rule 4 of ARCHITECTURE.md).

    1. decode: filter (alive, subset hint, not saturated), then rank by prefix hits, queue,
       KV usage and freshness;
    2. decision: the prompt's tokens not cached on the chosen decode; disaggregate only when
       they exceed `pd_threshold_tokens` and some prefill endpoint has room;
    3. prefill: rank by its own prefix hits, queue, KV usage, freshness and same-node;
    4. record: both chosen endpoints get one more pending request at once, and are assumed to
       hold the prompt's blocks (approximate index entries, until KV events say otherwise).

`pick()` is synchronous and touches only in-memory state. It hashes the prompt's blocks only as
far as the prefix walk goes (a prompt nobody has seen costs one block), and leaves the rest of
step 4, hashing every block and indexing them, and the pick's metrics to `flush()`: on the event
loop's next turn, once the pick's answer is out, or at the start of the next pick, whichever
comes first. The request does not wait for that bookkeeping, and every pick still sees every
earlier one.

`run()` keeps the state current: discovery snapshots, one scrape loop per endpoint, KV event
subscribers and the dead sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
from asyncio import events as asyncio_events
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

from pydantic import BaseModel, Field

from disagg.config import RoutingConfig
from disagg.routing import metrics
from disagg.routing.background import Background
from disagg.routing.discovery import Discovery
from disagg.routing.endpoint import Endpoint, RoleSignals
from disagg.routing.errors import NoEndpointError, OverloadedError
from disagg.routing.pool import EndpointPool
from disagg.routing.prefix_index import PrefixIndex, iter_block_hashes
from disagg.worker.protocol import Role
from disagg.routing.scoring import (
    Candidates,
    KVUsageScorer,
    PrefixScorer,
    QueueScorer,
    Ranker,
    SameNodeScorer,
    SaturationFilter,
    ScoringContext,
    SubsetFilter,
)

log = logging.getLogger(__name__)

Decision = Literal["remote", "local"]


class PickRequest(BaseModel):
    model: str
    prompt_token_ids: list[int] = Field(default_factory=list)
    # The gateway's subset hint: addresses (host:port) allowed to serve as decode.
    subset: list[str] | None = None


@dataclass(slots=True)
class Prompt:
    """What a pick reads of a request, built by a caller that has checked it already (the EPP's
    prompt readers): a plain object, where building a `PickRequest` without validating it
    (`model_construct`) cost more than a small pick."""

    model: str
    prompt_token_ids: list[int]
    subset: list[str] | None = None


@dataclass
class Pick:
    decode: list[Endpoint]  # best first; [0] serves, the rest are fallbacks
    prefill: list[Endpoint]  # best first; empty: decode prefills locally
    uncached_tokens: int  # prompt tokens not cached on decode[0]
    decision: Decision
    cached_tokens: int = 0

    @property
    def decode_addresses(self) -> list[str]:
        return [e.address for e in self.decode]

    @property
    def prefill_addresses(self) -> list[str]:
        return [e.address for e in self.prefill]


class Scheduler:
    def __init__(
        self,
        config: RoutingConfig,
        *,
        model: str,
        block_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.model = model
        self.block_size = block_size
        self.fallbacks = config.fallbacks
        self.pool = EndpointPool(
            model=model,
            block_size=block_size,
            stale_after_s=config.stale_after_s,
            dead_after_s=config.dead_after_s,
            clock=clock,
        )
        self.index = PrefixIndex(block_size, clock=clock)
        self.pool.on_remove(self._forget)
        self.decode_ranker = Ranker([
            PrefixScorer(config.prefix_weight),
            QueueScorer(config.load_weight),
            KVUsageScorer(config.kv_usage_weight),
        ])
        self.prefill_ranker = Ranker([
            PrefixScorer(config.prefix_weight),
            QueueScorer(config.load_weight),
            KVUsageScorer(config.kv_usage_weight),
            SameNodeScorer(config.same_node_weight),
        ])
        self.saturation = SaturationFilter(config.max_waiting_per_worker)
        # Picks whose blocks are not indexed yet: (engine ids, the hashes the pick's walk computed,
        # that walk, suspended where the pick stopped it).
        self._unrecorded: list[tuple[list[str], list[int], Iterator[int]]] = []
        # Picks not yet in the metrics: (seconds, disaggregated, prompt tokens, cached tokens).
        self._unobserved: list[tuple[float, bool, int, int]] = []
        self._flush_scheduled = False
        self._background: Background | None = None
        self._panic_logged_at = -1e9
        metrics.watch_scheduler(self)

    # -- the pick ---------------------------------------------------------------------------

    def pick(self, req: PickRequest | Prompt) -> Pick:
        """Choose decode (and maybe prefill) endpoints for one request. Raises NoEndpointError
        (nothing can serve it: 503) or OverloadedError (all saturated: 429)."""
        started = time.perf_counter()
        if self._unobserved:
            self.flush()
        try:
            result = self._pick(req)
        except NoEndpointError:
            metrics.PICK_ERRORS.labels("no_endpoint").inc()
            raise
        except OverloadedError:
            metrics.PICK_ERRORS.labels("overloaded").inc()
            raise
        self._unobserved.append((time.perf_counter() - started, result.decision == "remote",
                                 len(req.prompt_token_ids), result.cached_tokens))
        self._flush_soon()
        return result

    def _pick(self, req: PickRequest | Prompt) -> Pick:
        if req.model != self.model:
            raise NoEndpointError(f"model {req.model!r} is not served here (this pool serves {self.model!r})")
        tokens = req.prompt_token_ids
        hashes: list[int] = []  # as far as the prefix walk went
        walk = iter_block_hashes(tokens, self.block_size, into=hashes)
        hits = self.index.match(walk)
        ctx = ScoringContext(num_blocks=len(tokens) // self.block_size, num_tokens=len(tokens))
        now = self.pool.clock()
        keep = self.fallbacks + 1

        subset = SubsetFilter(frozenset(req.subset)) if req.subset is not None else None
        decodes = self.pool.live("decode", now)
        if subset is not None:
            decodes = subset.keep(decodes)
        if not decodes:
            return self._panic_pick(req, subset, len(tokens), hashes, walk)
        whole = self._whole_role(decodes, "decode")
        open_decodes = self.saturation.keep(decodes, whole.backlogs if whole else None)
        if not open_decodes:
            raise OverloadedError(
                f"all {len(decodes)} decode endpoints have {self.config.max_waiting_per_worker}+ waiting requests"
            )
        candidates = self._candidates(open_decodes, hits, now, "decode")
        best = self.decode_ranker.rank(candidates, ctx, keep)
        decode = candidates.endpoints[best[0]]
        cached = min(candidates.prefix_blocks[best[0]] * self.block_size, len(tokens))
        uncached = len(tokens) - cached

        prefill: list[Endpoint] = []
        if uncached > self.config.pd_threshold_tokens:
            prefills = self.pool.live("prefill", now)
            whole = self._whole_role(prefills, "prefill")
            prefills = self.saturation.keep(prefills, whole.backlogs if whole else None)
            if prefills:
                ctx.decode = decode
                prefill_candidates = self._candidates(prefills, hits, now, "prefill")
                prefill = [prefill_candidates.endpoints[i]
                           for i in self.prefill_ranker.rank(prefill_candidates, ctx, keep)]

        result = Pick(
            decode=[candidates.endpoints[i] for i in best],
            prefill=prefill,
            uncached_tokens=uncached,
            decision="remote" if prefill else "local",
            cached_tokens=cached,
        )
        self._record(result, hashes, walk)
        return result

    def _panic_pick(self, req: PickRequest | Prompt, subset: SubsetFilter | None, num_tokens: int, hashes: list[int],
                    walk: Iterator[int]) -> Pick:
        """No live decode: route to the most recently seen of those not yet forgotten (they may
        only look dead because this process or the machine stalled), or refuse with 503."""
        recent: Sequence[Endpoint] = self.pool.dead_endpoints("decode")
        if subset is not None:
            recent = subset.keep(recent)
        if not recent:
            hint = f" in subset {req.subset}" if req.subset is not None else ""
            raise NoEndpointError(f"no live decode endpoint for model {self.model!r}{hint}")
        metrics.PANIC_PICKS.inc()
        now = self.pool.clock()
        if now - self._panic_logged_at > 1.0:
            self._panic_logged_at = now
            log.warning("no live decode endpoint: routing to the most recently seen, %s (silent %.1f s)",
                        recent[0].address, recent[0].silence(now))
        result = Pick(decode=list(recent[: self.fallbacks + 1]), prefill=[], uncached_tokens=num_tokens, decision="local")
        self._record(result, hashes, walk)
        return result

    def _whole_role(self, endpoints: Sequence[Endpoint], role: Role) -> RoleSignals | None:
        """The role's signal lists when `endpoints` is the whole role (the pool's own list, as
        `live()` and the filters pass it on when they drop nobody), else None."""
        signals = self.pool.signals(role)
        return signals if endpoints is signals.endpoints else None

    def _candidates(self, endpoints: Sequence[Endpoint], hits: dict[str, int], now: float, role: Role) -> Candidates:
        # Runs for every endpoint of a role on every pick. When the candidates are the whole role
        # (the usual case: all alive, no subset hint, none saturated) the signal lists are the
        # pool's own (`RoleSignals`) and only the few endpoints with prefix hits are looked up;
        # otherwise one comprehension per signal. Freshness only when some signal is stale
        # (EndpointPool.freshness inlined).
        freshness = None
        if not self.pool.all_fresh(role, now):
            stale = self.pool.stale_after_s
            span = max(self.pool.dead_after_s - stale, 1e-9)
            freshness = [1.0 if now - e.load_at <= stale else max(0.0, 1.0 - (now - e.load_at - stale) / span)
                         for e in endpoints]
        signals = self._whole_role(endpoints, role)
        if signals is not None:
            prefix_blocks = [0] * len(endpoints)
            slot_of = signals.slot_of
            for engine_id, blocks in hits.items():
                slot = slot_of.get(engine_id)
                if slot is not None:
                    prefix_blocks[slot] = blocks
            return Candidates(endpoints=signals.endpoints, prefix_blocks=prefix_blocks, freshness=freshness,
                              queues=signals.queues, kv_free=signals.kv_free)
        return Candidates(
            endpoints=list(endpoints),
            prefix_blocks=[hits.get(e.engine_id, 0) for e in endpoints] if hits else [0] * len(endpoints),
            freshness=freshness,
            queues=[e.queue for e in endpoints],
            kv_free=[e.kv_free for e in endpoints],
        )

    def _record(self, result: Pick, hashes: list[int], walk: Iterator[int]) -> None:
        """What the pick implies: one more request on each chosen endpoint now, and (approximate
        mode) the prompt's blocks cached on both, at the next `flush()`."""
        chosen = result.decode[:1] + result.prefill[:1]
        for endpoint in chosen:
            endpoint.pending += 1
        if self.config.approximate_prefix and hashes:  # the walk reaches block 0 of any full block
            self._unrecorded.append(([e.engine_id for e in chosen], hashes, walk))

    def _flush_soon(self) -> None:
        if self._flush_scheduled:
            return
        # The low-level lookup: no exception to raise and catch when there is no loop.
        loop = asyncio_events._get_running_loop()
        if loop is None:
            return  # no event loop (a benchmark, a synchronous caller): the next pick flushes
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """The bookkeeping of the picks made so far, once their answers are out: their metrics,
        and (approximate entries) their prompts' blocks: hash each prompt's blocks past where its
        pick's walk stopped, and record them on the endpoints still here."""
        unrecorded, self._unrecorded = self._unrecorded, []
        unobserved, self._unobserved = self._unobserved, []
        self._flush_scheduled = False
        for seconds, remote, prompt_tokens, cached_tokens in unobserved:
            metrics.PICK_DURATION.observe(seconds)
            (metrics.PD_REMOTE if remote else metrics.PD_LOCAL).inc()
            metrics.PROMPT_TOKENS.inc(prompt_tokens)
            metrics.PREFIX_HIT_TOKENS.inc(cached_tokens)
        for engine_ids, hashes, walk in unrecorded:
            present = [e for e in engine_ids if e in self.pool]
            if present:
                for _ in walk:  # resume: the blocks past where the pick stopped, appended to hashes
                    pass
                self.index.record_pick(present, hashes)

    def _forget(self, endpoint: Endpoint, reason: str) -> None:
        self.index.clear(endpoint.engine_id)
        metrics.ENDPOINT_REMOVALS.labels(reason).inc()
        if self._background is not None:
            self._background.stop_endpoint(endpoint.engine_id)

    # -- keeping state current --------------------------------------------------------------

    async def run(self, discovery: Discovery) -> None:
        """Follow `discovery`, scrape every endpoint's /metrics, subscribe to KV events and sweep
        dead endpoints, until cancelled."""
        background = Background(self)
        self._background = background
        try:
            await background.run(discovery)
        finally:
            self._background = None
            with contextlib.suppress(Exception):
                await asyncio.shield(background.close())

