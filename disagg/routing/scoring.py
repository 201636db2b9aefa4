"""Filters, then weighted scorers, then the ranker: how candidates for one role are ranked.

A `Filter` removes endpoints that must not serve the request. A `Scorer` rates each candidate in
[0, 1]; the ranker sums weight x rating and orders candidates best first. Ratings drawn from the
load signal are multiplied by its freshness (a stale signal counts for less); prefix and
placement ratings are not: a busy machine that answers scrapes late must not lose the requests
whose KV it holds. Neither modifies endpoints or the index: ranking is a pure function of the
candidates, and the scheduler records the pick's consequences afterwards.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Protocol, Sequence

from disagg.routing.endpoint import Endpoint


@dataclass(slots=True)
class Candidate:
    """One endpoint a pick ranks, with what the pick knows of it."""

    endpoint: Endpoint
    prefix_blocks: int  # leading prompt blocks the endpoint already holds
    freshness: float  # 1.0 fresh .. 0.0 about to be declared dead


@dataclass(slots=True)
class ScoringContext:
    """What scorers may look at besides the candidates themselves."""

    num_blocks: int  # full blocks in the prompt
    num_tokens: int
    # The shortest and longest queue among the role's eligible endpoints (candidates or not), so
    # a candidate's queue rating is the same whichever others made the shortlist.
    queue_range: tuple[int, int] = (0, 0)
    decode: Endpoint | None = None  # when ranking prefill: the decode already chosen
    # Settles ties between equal candidates: derived from the request, so that every replica of
    # the picker settles them alike, and different requests spread over equal endpoints.
    tiebreak: int = 0


class Scorer(Protocol):
    """Rates candidates for one pick: a rating in [0, 1] per candidate, in order, higher is
    better. Must not modify the candidates or their endpoints."""

    name: str
    weight: float
    # True when the rating comes from the load signal (so its freshness discounts it).
    uses_load_signal: bool

    def score(self, candidates: Sequence[Candidate], ctx: ScoringContext) -> list[float]: ...


class Filter(Protocol):
    """Keeps the endpoints that may serve a request; must not modify them."""

    name: str

    def keep(self, endpoints: Sequence[Endpoint]) -> list[Endpoint]: ...


# -- scorers ----------------------------------------------------------------------------------


@dataclass
class PrefixScorer:
    """Fraction of the prompt's blocks already cached on the candidate."""

    weight: float
    name: str = "prefix"
    uses_load_signal: bool = False

    def score(self, candidates: Sequence[Candidate], ctx: ScoringContext) -> list[float]:
        blocks = max(ctx.num_blocks, 1)
        return [min(c.prefix_blocks / blocks, 1.0) for c in candidates]


@dataclass
class QueueScorer:
    """Fewer requests ahead (waiting + running + picks not yet in a signal) is better, relative
    to the role: the emptiest gets 1, the fullest 0."""

    weight: float
    name: str = "queue"
    uses_load_signal: bool = True

    def score(self, candidates: Sequence[Candidate], ctx: ScoringContext) -> list[float]:
        lo, hi = ctx.queue_range
        if hi <= lo:
            return [1.0] * len(candidates)
        return [max(0.0, min(1.0, (hi - c.endpoint.queue) / (hi - lo))) for c in candidates]


@dataclass
class KVUsageScorer:
    """Free KV cache is better: room to hold this prompt without evicting."""

    weight: float
    name: str = "kv_usage"
    uses_load_signal: bool = True

    def score(self, candidates: Sequence[Candidate], ctx: ScoringContext) -> list[float]:
        return [c.endpoint.kv_free for c in candidates]  # usage is clamped to [0, 1] by the pool


@dataclass
class SameNodeScorer:
    """A prefill on the decode's node moves KV without crossing the network."""

    weight: float
    name: str = "same_node"
    uses_load_signal: bool = False

    def score(self, candidates: Sequence[Candidate], ctx: ScoringContext) -> list[float]:
        node = ctx.decode.node_id if ctx.decode is not None else ""
        return [1.0 if node and c.endpoint.node_id == node else 0.0 for c in candidates]


# -- filters ----------------------------------------------------------------------------------


@dataclass
class SubsetFilter:
    """The gateway's subset hint: only these addresses may serve."""

    addresses: frozenset[str]
    name: str = "subset"

    def keep(self, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        return [e for e in endpoints if e.address in self.addresses]


@dataclass
class SaturationFilter:
    """Drops endpoints whose queue is full; when it drops all, the request is shed."""

    max_waiting: int
    name: str = "saturation"

    def keep(self, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        return [e for e in endpoints if e.backlog < self.max_waiting]


# -- ranker -----------------------------------------------------------------------------------


class Ranker:
    """Orders candidates best first by sum(weight x rating), load-signal ratings times the
    signal's freshness. Ties go to the shorter queue, then by the request's tiebreak mixed with
    each endpoint's own stable number (not a counter, nor a position in the list, which differ
    between replicas), so that equal endpoints share the load and replicas agree."""

    def __init__(self, scorers: Sequence[Scorer]) -> None:
        self.scorers = [s for s in scorers if s.weight]

    def rank(self, candidates: Sequence[Candidate], ctx: ScoringContext, top: int) -> list[Candidate]:
        """The best `top` candidates, best first."""
        n = len(candidates)
        totals = [0.0] * n
        for scorer in self.scorers:
            ratings = scorer.score(candidates, ctx)
            for i, c in enumerate(candidates):
                totals[i] += scorer.weight * ratings[i] * (c.freshness if scorer.uses_load_signal else 1.0)
        mix = ctx.tiebreak
        order = sorted(range(n), key=lambda i: (-totals[i], candidates[i].endpoint.queue,
                                                _stable_hash(candidates[i].endpoint.engine_id) ^ mix))
        return [candidates[i] for i in order[:top]]


def _stable_hash(text: str) -> int:
    """The same number in every process (Python's str hash is salted per process)."""
    return zlib.crc32(text.encode())
