"""The scheduler: one `pick()` per request, choosing a decode endpoint and, when it pays, a
prefill endpoint (design rule 4 of ARCHITECTURE.md).

    1. decode: filter (alive, subset hint, not saturated), then rank by prefix hits, queue,
       KV usage and freshness;
    2. decision: the prompt's tokens not cached on the chosen decode; disaggregate only when
       they exceed `pd_threshold_tokens` and some prefill endpoint has room;
    3. prefill: rank by its own prefix hits, queue, KV usage, freshness and same-node;
    4. record: both chosen endpoints get one more pending request at once, and are assumed to
       hold the prompt's blocks (approximate index entries, until KV events say otherwise).

Only the candidates that can win are ranked: the endpoints holding a prefix of the prompt, plus
the least-loaded few (`SHORTLIST` besides the fallbacks), found in the role's `LoadOrder`
without a walk over the role. An endpoint outside them has no prefix hit and a queue no shorter
than every listed one, so it could only win on its free KV cache.

`pick()` is synchronous and touches only in-memory state; `run()` keeps that state current. It hashes the prompt's blocks only as
far as the prefix walk goes (a prompt nobody has seen costs one block); the rest of step 4 (the
remaining blocks hashed and indexed) and the pick's metrics wait for `flush()`: on the event
loop's next turn, once the pick's answer is out, or at the start of the next pick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from itertools import islice
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, NamedTuple, Sequence

import msgspec

from disagg.config import RoutingConfig
from disagg.messages import Role
from disagg.routing import metrics
from disagg.routing.background import Background
from disagg.routing.discovery import Discovery
from disagg.routing.endpoint import Endpoint
from disagg.routing.errors import NoEndpointError, OverloadedError
from disagg.routing.pool import EndpointPool
from disagg.routing.prefix_index import PrefixIndex, iter_block_hashes
from disagg.routing.scoring import (
    Candidate,
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
# Least-loaded endpoints ranked besides the prefix holders and the fallbacks.
SHORTLIST = 2


class PickRequest(msgspec.Struct, kw_only=True):
    """What a pick reads of a request. Decoded from JSON with validation at the edge
    (`msgspec.json.decode(body, type=PickRequest)`); built directly by callers that tokenized
    the prompt themselves."""

    model: str
    prompt_token_ids: list[int] = msgspec.field(default_factory=list)
    # The gateway's subset hint: addresses (host:port) allowed to serve as decode.
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


class Booked(NamedTuple):
    """A pick as its bookkeeping sees it, once its answer is out: where the prompt went, and its
    blocks (the prompt's full blocks once `flush()` resumed the walk)."""

    engine_ids: list[str]  # decode, then prefill when disaggregating
    hashes: list[int]  # the blocks the pick's prefix walk hashed
    rest: Iterator[int]  # the walk, suspended where the pick stopped it; resuming appends to `hashes`
    request: PickRequest
    at: list[float]  # [when it was booked (wall clock)], filled by the booking


class _Unobserved(NamedTuple):
    """A pick not yet in the metrics."""

    seconds: float
    remote: bool
    prompt_tokens: int
    cached_tokens: int


@dataclass
class _Deferred:
    booked: list[Booked] = field(default_factory=list)
    unobserved: list[_Unobserved] = field(default_factory=list)
    scheduled: bool = False


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
        self.pool = EndpointPool(model=model, block_size=block_size, stale_after_s=config.stale_after_s,
                                 dead_after_s=config.dead_after_s, clock=clock)
        self.index = PrefixIndex(block_size, clock=clock)
        self.pool.on_remove(lambda endpoint, reason: self.index.clear(endpoint.engine_id))
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
        self.shortlist = SHORTLIST
        self._deferred = _Deferred()
        self._listeners: list[Callable[[list[Booked]], None]] = []
        self._catch_ups: list[Callable[[], None]] = []
        self._panic_logged_at = -1e9
        metrics.watch(self.pool, self.index)

    # -- the pick ---------------------------------------------------------------------------

    def pick(self, req: PickRequest) -> Pick:
        """Choose decode (and maybe prefill) endpoints for one request. Raises NoEndpointError
        (nothing can serve it: 503) or OverloadedError (all saturated: 429)."""
        started = time.perf_counter()
        for catch_up in self._catch_ups:
            catch_up()
        if self._deferred.booked or self._deferred.unobserved:
            self.flush()
        try:
            result = self._pick(req)
        except NoEndpointError:
            metrics.PICK_ERRORS.labels("no_endpoint").inc()
            raise
        except OverloadedError:
            metrics.PICK_ERRORS.labels("overloaded").inc()
            raise
        self._deferred.unobserved.append(_Unobserved(time.perf_counter() - started, result.decision == "remote",
                                                     len(req.prompt_token_ids), result.cached_tokens))
        self._flush_soon()
        return result

    def would_pick(self, req: PickRequest) -> Pick | None:
        """The pick `pick(req)` would make now, without booking it (no pending request, no index
        entry, no metrics): how replicas compare their views. None when it would refuse."""
        try:
            return self._pick(req, book=False)
        except (NoEndpointError, OverloadedError):
            return None

    def _pick(self, req: PickRequest, book: bool = True) -> Pick:
        if req.model != self.model:
            raise NoEndpointError(f"model {req.model!r} is not served here (this pool serves {self.model!r})")
        tokens = req.prompt_token_ids
        hashes: list[int] = []  # as far as the prefix walk went
        walk = iter_block_hashes(tokens, self.block_size, into=hashes)
        hits = self.index.match(walk)
        now = self.pool.clock()
        keep = self.config.fallbacks + 1

        subset = SubsetFilter(frozenset(req.subset)) if req.subset is not None else None
        ctx = ScoringContext(num_blocks=len(tokens) // self.block_size, num_tokens=len(tokens))
        shortlist = self._shortlist("decode", hits, now, keep, ctx, subset)
        if not shortlist:
            decodes = self.pool.live("decode", now)  # why none: a walk, on this rare path only
            if subset is not None:
                decodes = subset.keep(decodes)
            if not decodes and book:
                return self._panic_pick(req, subset, Booked([], hashes, walk, req, []))
            if not decodes:
                raise NoEndpointError("no live decode endpoint")
            raise OverloadedError(
                f"all {len(decodes)} decode endpoints have {self.config.max_waiting_per_worker}+ waiting requests")
        ctx.tiebreak = hash(tuple(tokens[:self.block_size]))  # the same on every replica
        best = self.decode_ranker.rank(shortlist, ctx, keep)
        cached = min(best[0].prefix_blocks * self.block_size, len(tokens))
        uncached = len(tokens) - cached

        prefill: list[Endpoint] = []
        if uncached > self.config.pd_threshold_tokens:
            ctx.decode = best[0].endpoint
            shortlist = self._shortlist("prefill", hits, now, keep, ctx, None)
            if shortlist:
                prefill = [c.endpoint for c in self.prefill_ranker.rank(shortlist, ctx, keep)]

        result = Pick(decode=[c.endpoint for c in best], prefill=prefill, uncached_tokens=uncached,
                      decision="remote" if prefill else "local", cached_tokens=cached)
        if book:
            self._book(result, Booked([], hashes, walk, req, []))
        return result

    def _shortlist(self, role: Role, hits: dict[str, int], now: float, keep: int, ctx: ScoringContext,
                   subset: SubsetFilter | None) -> list[Candidate]:
        """The live, unsaturated endpoints of `role` that can win: those holding a prefix of the
        prompt, and the `keep + shortlist` least-loaded others (from the role's load order, or
        among the subset hint's). Sets `ctx.queue_range` to the role's."""
        pool, limit = self.pool, self.saturation.max_waiting

        def eligible(e: Endpoint | None) -> bool:
            return (e is not None and e.role == role and pool.alive(e, now) and e.backlog < limit
                    and (subset is None or e.address in subset.addresses))

        order = pool.order(role)
        ctx.queue_range = order.queue_range()
        holders = [e for e in map(pool.get, hits) if eligible(e)] if hits else []
        if subset is not None:  # a short explicit list: its members, by queue
            others = sorted((e for e in map(pool.by_address, subset.addresses) if eligible(e)), key=_queue)
        else:
            others = (e for e in order.ascending() if eligible(e))
        least = list(islice((e for e in others if e.engine_id not in hits), keep + self.shortlist))
        return [Candidate(e, hits.get(e.engine_id, 0), pool.freshness(e, now)) for e in holders + least]

    def _panic_pick(self, req: PickRequest, subset: SubsetFilter | None, booked: Booked) -> Pick:
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
        result = Pick(decode=list(recent[: self.config.fallbacks + 1]), prefill=[],
                      uncached_tokens=len(req.prompt_token_ids), decision="local")
        self._book(result, booked)
        return result

    def _book(self, result: Pick, booked: Booked) -> None:
        """What the pick implies: one more request on each chosen endpoint now; at the next
        `flush()`, (approximate mode) the prompt's blocks cached on both, and the listeners told."""
        chosen = result.decode[:1] + result.prefill[:1]
        at = self.pool.wall()
        for endpoint in chosen:
            endpoint.book(at)
        booked.engine_ids.extend(e.engine_id for e in chosen)
        booked.at.append(at)
        self._deferred.booked.append(booked)

    def before_pick(self, catch_up: Callable[[], None]) -> None:
        """Call `catch_up()` at the start of every pick: the signal channels apply what has
        arrived (the event loop may hand the request over before a report already received)."""
        self._catch_ups.append(catch_up)

    def on_booked(self, listener: Callable[[list[Booked]], None]) -> None:
        """Call `listener(picks)` with each flush's picks, their hashes complete (peer sync)."""
        self._listeners.append(listener)

    def _flush_soon(self) -> None:
        if self._deferred.scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a benchmark, a synchronous caller): the next pick flushes
        self._deferred.scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """The bookkeeping of the picks made so far, once their answers are out: their metrics,
        and (approximate entries) their prompts' blocks: hash each prompt's blocks past where its
        pick's walk stopped, and record them on the endpoints still here."""
        deferred, self._deferred = self._deferred, _Deferred()
        for seen in deferred.unobserved:
            metrics.PICK_DURATION.observe(seen.seconds)
            (metrics.PD_REMOTE if seen.remote else metrics.PD_LOCAL).inc()
            metrics.PROMPT_TOKENS.inc(seen.prompt_tokens)
            metrics.PREFIX_HIT_TOKENS.inc(seen.cached_tokens)
        for pick in deferred.booked:
            if not pick.hashes:  # the walk reaches block 0 of any full block: none here
                continue
            for _ in pick.rest:  # resume: the blocks past where the pick stopped, appended to hashes
                pass
            present = [e for e in pick.engine_ids if e in self.pool]
            if present and self.config.approximate_prefix:
                self.index.record_pick(present, pick.hashes)
        for listener in self._listeners:
            listener(deferred.booked)

    # -- keeping state current --------------------------------------------------------------

    async def run(self, discovery: Discovery) -> None:
        """Follow `discovery`, read every endpoint's load, subscribe to KV events and sweep dead
        endpoints, until cancelled."""
        background = Background(self.pool, self.index, self.config)
        self.before_pick(background.loads.drain)
        try:
            await background.run(discovery)
        finally:
            self._catch_ups.remove(background.loads.drain)


def _queue(endpoint: Endpoint) -> int:
    return endpoint.queue


