"""The ranker's last step in C (disagg/routing/_rank.c) ranks as the Python code does: the same
candidates in the same order, ties and their rotating start included, for pools of every size
and many ties."""

from __future__ import annotations

import random

import pytest

from disagg.routing import scoring
from disagg.routing.fakes import make_info
from disagg.routing.pool import EndpointPool
from disagg.routing.scoring import (Candidates, KVUsageScorer, PrefixScorer, QueueScorer, Ranker, SameNodeScorer,
                                    ScoringContext)

pytestmark = pytest.mark.skipif(scoring._top is None, reason="the C ranker is not built here")


def _candidates(rng: random.Random, n: int) -> tuple[Candidates, ScoringContext]:
    pool = EndpointPool(model="tiny", block_size=32, stale_after_s=1.0, dead_after_s=2.0)
    endpoints = [pool.upsert(make_info("decode", f"10.0.0.{i}:8000", model="tiny", node_id=f"n{i % 3}"))
                 for i in range(n)]
    coarse = rng.random() < 0.5  # few distinct values: ties everywhere
    candidates = Candidates(
        endpoints=endpoints,
        prefix_blocks=[rng.choice([0, 0, 4, 8]) if coarse else rng.randrange(0, 32) for _ in range(n)],
        freshness=None if rng.random() < 0.5 else [rng.choice([1.0, 0.5, 0.25]) for _ in range(n)],
        queues=[rng.randrange(0, 3 if coarse else 50) for _ in range(n)],
        kv_free=[rng.choice([0.5, 1.0]) if coarse else rng.random() for _ in range(n)],
    )
    decode = endpoints[rng.randrange(n)] if rng.random() < 0.5 else None
    return candidates, ScoringContext(num_blocks=32, num_tokens=1024, decode=decode)


def test_the_c_ranker_ranks_as_the_python_one(monkeypatch) -> None:
    rng = random.Random(5)
    weights = [(2.0, 1.0, 1.0, 0.5), (1.0, 1.0, 1.0, 1.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0), (3.0, 0.5, 2.0, 0.0)]
    top_fn = scoring._top
    compared = ties = 0
    for _ in range(400):
        n = rng.choice([2, 3, 5, 8, 32, 128])
        candidates, ctx = _candidates(rng, n)
        w = rng.choice(weights)
        rankers = {}
        for name in ("c", "python"):  # each its own turn, advancing alike
            rankers[name] = Ranker([PrefixScorer(w[0]), QueueScorer(w[1]), KVUsageScorer(w[2]), SameNodeScorer(w[3])])
        for _ in range(3):
            top = rng.choice([0, 1, 3, n, n + 2])
            monkeypatch.setattr(scoring, "_top", top_fn)
            fast = rankers["c"].rank(candidates, ctx, top)
            monkeypatch.setattr(scoring, "_top", None)
            slow = rankers["python"].rank(candidates, ctx, top)
            assert fast == slow, (n, top, w)
            compared += 1
            ties += len(set(candidates.queues)) < n
    assert compared == 1200 and ties > 300  # ties were part of it
