"""Filters, then weighted scorers, then the picker: how candidates for one role are ranked.

A `Filter` removes endpoints that must not serve the request. A `Scorer` rates each remaining
candidate in [0, 1]; the picker sums weight x rating and orders candidates best first. Ratings
drawn from the load signal are multiplied by its freshness (a stale signal counts for less);
prefix and placement ratings are not: a busy machine that answers scrapes late must not lose the
requests whose KV it holds. Neither modifies endpoints
or the index: picking is a pure function of the pool's state, and the scheduler records the
pick's consequences afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from disagg.routing.endpoint import Endpoint

try:  # the ranker's last step in C (built with the package; optional): the same answer, faster
    from disagg.routing._rank import top as _top
except ImportError:
    _top = None


@dataclass(slots=True)
class Candidates:
    """The endpoints one pick ranks, as parallel lists (no per-candidate objects: a pick over
    hundreds of endpoints must stay in the tens of microseconds). Each list is read once from
    the endpoints when the pick starts, so scorers never walk endpoint attributes themselves."""

    endpoints: Sequence[Endpoint]
    prefix_blocks: list[int]  # leading prompt blocks each endpoint already holds
    freshness: list[float] | None  # 1.0 fresh .. 0.0 about to be declared dead; None: all 1.0
    queues: list[int]  # waiting + running + pending
    kv_free: list[float]  # 1 - KV cache usage (0..1), from the last load signal

    def __len__(self) -> int:
        return len(self.endpoints)


@dataclass(slots=True)
class ScoringContext:
    """What scorers may look at besides the candidates themselves."""

    num_blocks: int  # full blocks in the prompt
    num_tokens: int
    decode: Endpoint | None = None  # when ranking prefill: the decode already chosen


class Scorer(Protocol):
    """Rates candidates for one pick. `score` returns `weight` x a rating in [0, 1] per candidate,
    in order, higher is better (a list, which the ranker may keep but never modifies), or None
    when it rates every candidate 0; it must not modify the candidates or their endpoints. (The
    weight comes in so the rating is scaled in the same pass: a pick ranks every endpoint of a
    role.)"""

    name: str
    weight: float
    # True when the rating comes from the load signal (so its freshness discounts it).
    uses_load_signal: bool

    def score(self, candidates: Candidates, ctx: ScoringContext, weight: float) -> list[float] | None: ...


class Filter(Protocol):
    """Keeps the endpoints that may serve a request; must not modify them."""

    name: str

    def keep(self, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]: ...


# -- scorers ----------------------------------------------------------------------------------


@dataclass
class PrefixScorer:
    """Fraction of the prompt's blocks already cached on the candidate."""

    weight: float
    name: str = "prefix"
    uses_load_signal: bool = False

    def score(self, candidates: Candidates, ctx: ScoringContext, weight: float) -> list[float] | None:
        if ctx.num_blocks == 0 or not any(candidates.prefix_blocks):
            return None
        per_block = weight / ctx.num_blocks
        return [b * per_block for b in candidates.prefix_blocks]


@dataclass
class QueueScorer:
    """Fewer requests ahead (waiting + running + picks not yet in a signal) is better, relative
    to the other candidates: the emptiest gets 1, the fullest 0."""

    weight: float
    name: str = "queue"
    uses_load_signal: bool = True

    def score(self, candidates: Candidates, ctx: ScoringContext, weight: float) -> list[float] | None:
        queues = candidates.queues
        lo, hi = min(queues), max(queues)
        if hi == lo:
            return [weight] * len(queues)
        per_request = weight / (hi - lo)
        return [(hi - q) * per_request for q in queues]


@dataclass
class KVUsageScorer:
    """Free KV cache is better: room to hold this prompt without evicting."""

    weight: float
    name: str = "kv_usage"
    uses_load_signal: bool = True

    def score(self, candidates: Candidates, ctx: ScoringContext, weight: float) -> list[float] | None:
        # usage is clamped to [0, 1] by the pool
        return candidates.kv_free if weight == 1.0 else [weight * f for f in candidates.kv_free]


@dataclass
class SameNodeScorer:
    """A prefill on the decode's node moves KV without crossing the network."""

    weight: float
    name: str = "same_node"
    uses_load_signal: bool = False

    def score(self, candidates: Candidates, ctx: ScoringContext, weight: float) -> list[float] | None:
        node = ctx.decode.node_id if ctx.decode is not None else ""
        if not node:
            return None
        return [weight if e.node_id == node else 0.0 for e in candidates.endpoints]


# -- filters ----------------------------------------------------------------------------------


@dataclass
class SubsetFilter:
    """The gateway's subset hint: only these addresses may serve."""

    addresses: frozenset[str]
    name: str = "subset"

    def keep(self, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        return [e for e in endpoints if e.address in self.addresses]


@dataclass
class SaturationFilter:
    """Drops endpoints whose queue is full; when it drops all, the request is shed."""

    max_waiting: int
    name: str = "saturation"

    def keep(self, endpoints: Sequence[Endpoint], backlogs: list[int] | None = None) -> Sequence[Endpoint]:
        """`backlogs`, when given, are the endpoints' backlogs in order (`RoleSignals`): when
        none is full, the list comes back as it is without a walk."""
        limit = self.max_waiting
        if backlogs is not None and (not backlogs or max(backlogs) < limit):
            return endpoints
        return [e for e in endpoints if e.backlog < limit]


# -- picker ---------------------------------------------------------------------------------


class Ranker:
    """Orders candidates best first by sum(weight x rating), load-signal ratings times the
    signal's freshness. Ties go to the shorter queue, then to whichever comes first from a start
    that rotates with every pick, so equal endpoints share the load."""

    def __init__(self, scorers: Sequence[Scorer]) -> None:
        self.scorers = list(scorers)
        self._turn = 0

    def rank(self, candidates: Candidates, ctx: ScoringContext, top: int) -> list[int]:
        """Indices of the best `top` candidates, best first."""
        n = len(candidates)
        if n == 1:
            return [0] if top else []
        # total = sum(w x r) + freshness x sum(w_load x r_load), as few passes over the candidates
        # as it takes (on CPython 3.11 a zip comprehension of float arithmetic beats map() and
        # sum()); a scorer that rates everyone 0 adds nothing.
        steady: list[list[float]] = []
        load: list[list[float]] = []
        for scorer in self.scorers:
            scores = scorer.score(candidates, ctx, scorer.weight) if scorer.weight else None
            if scores is not None:
                (load if scorer.uses_load_signal else steady).append(scores)
        if load and candidates.freshness is not None:
            summed = load[0] if len(load) == 1 else _sum(load)
            load = [[a * f for a, f in zip(summed, candidates.freshness)]]
        terms = steady + load
        turn = self._turn = (self._turn + 1) % n if n else 0
        if _top is not None:
            return _top(terms, candidates.queues, turn, top)
        totals = terms[0] if len(terms) == 1 else _sum(terms) if terms else [0.0] * n
        total_of = totals.__getitem__
        ranked = sorted(range(n), key=total_of, reverse=True)
        head = list(map(total_of, ranked[:top + 1]))
        if len(set(head)) < len(head):
            # Equal totals where they decide who places, or in what order: among those scoring at
            # least the top-th best total, the shorter queue first, then the first from the
            # rotating start.
            cut = head[min(top, n) - 1] if top else float("inf")
            queues = candidates.queues
            ranked = sorted((i for i in ranked if totals[i] >= cut),
                            key=lambda i: (-totals[i], queues[i], (i - turn) % n))
        return ranked[:top]


def _sum(terms: list[list[float]]) -> list[float]:
    """Element-wise sum of equally long lists, in one pass for up to three (the usual count)."""
    if len(terms) == 2:
        return [a + b for a, b in zip(*terms)]
    if len(terms) == 3:
        return [a + b + c for a, b, c in zip(*terms)]
    return [sum(column) for column in zip(*terms)]
