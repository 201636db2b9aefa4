"""Scheduler.pick: the P/D decision, load and prefix awareness, fallbacks, refusals."""

from __future__ import annotations

import asyncio

import pytest

from disagg.config import RoutingConfig
from disagg.routing import NoEndpointError, OverloadedError, PickRequest, Scheduler, block_hashes
from disagg.bench.standin import make_info
from disagg.messages import EngineLoad

BS = 32


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(clock: Clock | None = None, **routing) -> Scheduler:
    return Scheduler(RoutingConfig(**routing), model="tiny", block_size=BS, clock=clock or Clock())


def add(s: Scheduler, role: str, address: str, *, waiting: int = 0, running: int = 0, kv: float = 0.0, node: str = "",
        engine_id: str | None = None):
    e = s.pool.upsert(make_info(role, address, node_id=node, engine_id=engine_id))
    s.pool.update_load(e.engine_id, EngineLoad(waiting=waiting, running=running, kv_usage=kv))
    return e


def req(n_tokens: int, start: int = 0, **kw) -> PickRequest:
    return PickRequest(model="tiny", prompt_token_ids=list(range(start, start + n_tokens)), **kw)


def test_picks_least_loaded_decode() -> None:
    s = make_scheduler()
    add(s, "decode", "d1:1", running=4)
    add(s, "decode", "d2:1", running=1)
    assert s.pick(req(10)).decode[0].address == "d2:1"


def test_a_burst_between_scrapes_spreads_over_equal_decodes() -> None:
    s = make_scheduler(prefix_weight=0)
    for i in range(4):
        add(s, "decode", f"d{i}:1")
    chosen = [s.pick(req(10, start=1000 * i)).decode[0].address for i in range(8)]
    assert sorted(chosen.count(a) for a in set(chosen)) == [2, 2, 2, 2]


def test_short_prompt_prefills_locally() -> None:
    s = make_scheduler(pd_threshold_tokens=256)
    add(s, "decode", "d1:1")
    add(s, "prefill", "p1:1")
    pick = s.pick(req(200))
    assert pick.decision == "local" and pick.prefill == [] and pick.uncached_tokens == 200


def test_long_uncached_prompt_disaggregates() -> None:
    s = make_scheduler(pd_threshold_tokens=256)
    add(s, "decode", "d1:1")
    add(s, "prefill", "p1:1")
    pick = s.pick(req(1000))
    assert pick.decision == "remote" and [e.address for e in pick.prefill] == ["p1:1"]


def test_prompt_cached_on_decode_prefills_locally() -> None:
    s = make_scheduler(pd_threshold_tokens=256)
    add(s, "decode", "d1:1")
    add(s, "prefill", "p1:1")
    assert s.pick(req(1000)).decision == "remote"
    again = s.pick(req(1000))  # decode now holds 31 of its blocks
    assert again.decision == "local"
    assert again.uncached_tokens == 1000 - 31 * BS


def test_without_prefill_workers_decode_prefills_locally() -> None:
    s = make_scheduler()
    add(s, "decode", "d1:1")
    assert s.pick(req(5000)).decision == "local"


def test_saturated_prefills_mean_local_prefill() -> None:
    s = make_scheduler(max_waiting_per_worker=4)
    add(s, "decode", "d1:1")
    add(s, "prefill", "p1:1", waiting=4)
    assert s.pick(req(5000)).decision == "local"


def test_prefill_on_the_decode_node_is_preferred() -> None:
    s = make_scheduler()
    add(s, "decode", "d1:1", node="n1")
    add(s, "prefill", "p-far:1", node="n2")
    add(s, "prefill", "p-near:1", node="n1")
    assert s.pick(req(5000)).prefill[0].address == "p-near:1"


def test_shared_prefix_follows_the_decode_that_holds_it() -> None:
    s = make_scheduler()
    add(s, "decode", "d1:1")
    add(s, "decode", "d2:1")
    prefix = list(range(2000))
    first = s.pick(PickRequest(model="tiny", prompt_token_ids=prefix + [1])).decode[0].address
    for i in range(10):
        pick = s.pick(PickRequest(model="tiny", prompt_token_ids=prefix + [5000 + i] * 40))
        assert pick.decode[0].address == first


def test_a_late_load_signal_does_not_take_the_prefix_away() -> None:
    """A decode busy enough to answer scrapes late (its load signal 1.5 s old, freshness ~0.3)
    still gets the requests whose KV it holds; only its load ratings count for less."""
    clock = Clock()
    s = make_scheduler(clock)
    holder = add(s, "decode", "holder:1")
    other = add(s, "decode", "other:1")
    prefix = list(range(2000))
    s.pick(PickRequest(model="tiny", prompt_token_ids=prefix + [1], subset=["holder:1"]))
    clock.now += 1.5
    s.pool.update_load(other.engine_id, EngineLoad())
    s.pool.touch(holder.engine_id)
    for i in range(5):
        pick = s.pick(PickRequest(model="tiny", prompt_token_ids=prefix + [5000 + i] * 40))
        assert pick.decode[0].address == "holder:1"


def test_unrelated_prompts_spread_by_load() -> None:
    s = make_scheduler()
    add(s, "decode", "d1:1")
    add(s, "decode", "d2:1")
    chosen = {s.pick(req(500, start=10_000 * i)).decode[0].address for i in range(4)}
    assert chosen == {"d1:1", "d2:1"}


def test_fallbacks_are_ordered_and_bounded() -> None:
    s = make_scheduler()
    for i, running in enumerate([3, 0, 5, 1, 9]):
        add(s, "decode", f"d{i}:1", running=running)
        add(s, "prefill", f"p{i}:1", running=running)
    pick = s.pick(req(5000))
    assert pick.decode_addresses == ["d1:1", "d3:1", "d0:1"]
    assert pick.prefill_addresses == ["p1:1", "p3:1", "p0:1"]


def test_stale_endpoint_loses_to_fresh_one() -> None:
    clock = Clock()
    s = make_scheduler(clock)
    stale = add(s, "decode", "stale:1")
    clock.now += 1.5
    add(s, "decode", "fresh:1", running=2)
    s.pool.touch(stale.engine_id)  # alive, but its load signal is 1.5 s old
    assert s.pick(req(10)).decode[0].address == "fresh:1"


def test_dead_endpoint_is_never_picked() -> None:
    clock = Clock()
    s = make_scheduler(clock)
    add(s, "decode", "dead:1")
    clock.now += 2.5
    add(s, "decode", "alive:1", running=50)
    for _ in range(5):
        assert s.pick(req(10)).decode_addresses == ["alive:1"]


def test_with_no_live_decode_the_most_recently_seen_is_picked() -> None:
    clock = Clock()
    s = make_scheduler(clock)
    older = add(s, "decode", "older:1")
    clock.now += 1
    add(s, "decode", "newer:1")
    add(s, "prefill", "p:1")
    clock.now += 2.5  # both silent past dead_after_s, neither forgotten
    pick = s.pick(req(5000))
    assert pick.decode_addresses == ["newer:1", "older:1"] and pick.decision == "local"
    clock.now += 10
    s.pool.sweep()
    with pytest.raises(NoEndpointError):
        s.pick(req(10))
    assert older.engine_id not in s.pool


def test_subset_hint_limits_decode_choice() -> None:
    s = make_scheduler()
    add(s, "decode", "d1:1")
    add(s, "decode", "d2:1", running=10)
    assert s.pick(req(10, subset=["d2:1"])).decode_addresses == ["d2:1"]


def test_subset_without_a_match_is_no_endpoint() -> None:
    s = make_scheduler()
    add(s, "decode", "d1:1")
    with pytest.raises(NoEndpointError, match="subset"):
        s.pick(req(10, subset=["elsewhere:1"]))


def test_no_decode_is_no_endpoint() -> None:
    s = make_scheduler()
    add(s, "prefill", "p1:1")
    with pytest.raises(NoEndpointError):
        s.pick(req(10))


def test_unknown_model_is_no_endpoint() -> None:
    s = make_scheduler()
    add(s, "decode", "d1:1")
    with pytest.raises(NoEndpointError, match="not served"):
        s.pick(PickRequest(model="other", prompt_token_ids=[1]))


def test_all_decodes_saturated_is_overloaded() -> None:
    s = make_scheduler(max_waiting_per_worker=2)
    add(s, "decode", "d1:1", waiting=2)
    add(s, "decode", "d2:1", waiting=5)
    with pytest.raises(OverloadedError):
        s.pick(req(10))


def test_a_burst_between_scrapes_is_not_shed_while_the_workers_report_no_queue() -> None:
    # 3x the limit in picks before the next scrape: a fast worker has served them long ago, so
    # only what the worker reports (waiting) may refuse a request, not our count of picks.
    s = make_scheduler(max_waiting_per_worker=4)
    d1, d2 = add(s, "decode", "d1:1"), add(s, "decode", "d2:1")
    for _ in range(24):
        s.pick(req(10))
    assert d1.pending + d2.pending == 24
    s.pool.update_load(d1.engine_id, EngineLoad(waiting=4))
    s.pool.update_load(d2.engine_id, EngineLoad(waiting=4))
    with pytest.raises(OverloadedError):
        s.pick(req(10))


def test_removed_endpoint_leaves_the_prefix_index() -> None:
    s = make_scheduler()
    d = add(s, "decode", "d1:1")
    s.pick(req(500))
    s.flush()
    assert s.index.num_blocks(d.engine_id) > 0
    s.pool.remove(d.engine_id)
    assert s.index.num_blocks(d.engine_id) == 0


def test_a_picks_blocks_are_indexed_by_flush_or_before_the_next_pick() -> None:
    s = make_scheduler(pd_threshold_tokens=10_000)
    d = add(s, "decode", "d1:1")
    s.pick(req(10 * BS + 5))
    assert d.pending == 1  # counted at once
    assert s.index.num_blocks(d.engine_id) == 0  # indexed after the answer, not before
    s.flush()
    assert s.index.num_blocks(d.engine_id) == 10  # every full block, past the walk's first miss
    assert s.index.match(block_hashes(list(range(10 * BS)), BS)) == {d.engine_id: 10}
    # No flush between two picks: the second still finds the first's blocks (pick flushes first).
    s.pick(req(6 * BS, start=50_000))
    assert s.pick(req(8 * BS, start=50_000)).cached_tokens == 6 * BS


def test_a_pick_inside_an_event_loop_is_indexed_on_the_loops_next_turn() -> None:
    s = make_scheduler()
    d = add(s, "decode", "d1:1")

    async def pick_then_yield() -> tuple[int, int]:
        s.pick(req(4 * BS))
        before = s.index.num_blocks(d.engine_id)
        await asyncio.sleep(0)
        return before, s.index.num_blocks(d.engine_id)

    assert asyncio.run(pick_then_yield()) == (0, 4)


def test_an_endpoint_removed_before_the_flush_is_not_indexed() -> None:
    s = make_scheduler(pd_threshold_tokens=0)
    d, p = add(s, "decode", "d1:1"), add(s, "prefill", "p1:1")
    pick = s.pick(req(4 * BS))
    assert pick.prefill == [p]
    s.pool.remove(p.engine_id)
    s.flush()
    assert s.index.engines() == [d.engine_id] and s.index.num_blocks(d.engine_id) == 4


def test_empty_prompt_still_picks_a_decode() -> None:
    s = make_scheduler()
    add(s, "decode", "d1:1")
    pick = s.pick(PickRequest(model="tiny", prompt_token_ids=[]))
    assert pick.decode_addresses == ["d1:1"] and pick.decision == "local"


def test_the_shortlist_picks_as_ranking_every_endpoint_whenever_the_winner_is_on_it() -> None:
    # The pick ranks only the prefix holders and the least-loaded few; ranking every live
    # endpoint instead (a shortlist as long as the role) must give the same pick whenever its
    # winner was on the shortlist. Two schedulers, built alike, one of each.
    import random

    from disagg.routing.scheduler import SHORTLIST

    def build(seed: int) -> tuple[Scheduler, list[int]]:
        rng = random.Random(seed)
        s = make_scheduler(pd_threshold_tokens=64)
        for i in range(rng.choice([3, 8, 24, 40])):
            role = "decode" if i % 3 else "prefill"
            add(s, role, f"{role[0]}{i}:1", waiting=rng.randint(0, 3), running=rng.randint(0, 6),
                kv=rng.choice([0.0, 0.5, rng.random()]), node=f"n{i % 4}", engine_id=f"{role}-{i}")
        prompts = [list(range(1000 * k, 1000 * k + 32 * rng.randint(1, 12))) for k in range(6)]
        for _ in range(rng.randint(0, 10)):  # some prompts cached here and there
            s.index.record(rng.choice(s.pool.endpoints()).engine_id, block_hashes(rng.choice(prompts), BS))
        return s, rng.choice(prompts)[: rng.randint(0, 400)]

    agreed = 0
    for trial in range(80):
        shortlisting, tokens = build(trial)
        full, _ = build(trial)
        full.shortlist = 10**6  # every endpoint on the list
        a = shortlisting.pick(PickRequest(model="tiny", prompt_token_ids=tokens))
        b = full.pick(PickRequest(model="tiny", prompt_token_ids=tokens))
        listed = sorted(full.pool.live("decode", full.pool.clock()), key=lambda e: e.queue)
        listed = {e.address for e in listed[:SHORTLIST + full.config.fallbacks + 1]}
        if b.decode[0].address in listed or b.cached_tokens:
            assert (a.decode[0].address, a.decision, a.cached_tokens) == (
                b.decode[0].address, b.decision, b.cached_tokens), trial
            if b.prefill and a.prefill:
                assert a.prefill[0].address == b.prefill[0].address or b.prefill[0].address not in {
                    e.address for e in sorted(full.pool.live("prefill", full.pool.clock()),
                                              key=lambda e: e.queue)[:SHORTLIST + full.config.fallbacks + 1]}, trial
            agreed += 1
    assert agreed > 40  # the comparison ran on most trials


def test_a_picks_metrics_count_once_its_answer_is_out() -> None:
    from prometheus_client import REGISTRY

    def remote() -> float:
        return REGISTRY.get_sample_value("disagg_pd_decisions_total", {"decision": "remote"}) or 0.0

    def hit_tokens() -> float:
        return REGISTRY.get_sample_value("disagg_prefix_hit_tokens_total") or 0.0

    s = make_scheduler(pd_threshold_tokens=64)
    add(s, "decode", "d1:1")
    add(s, "prefill", "p1:1")
    before, hits_before = remote(), hit_tokens()
    s.pick(req(8 * BS))
    assert remote() == before  # not on the request's path
    s.flush()
    assert remote() == before + 1
    s.pick(req(8 * BS))  # cached on d1 now: local, 8 blocks of hits
    s.pick(req(10))  # the next pick does the previous one's bookkeeping first
    assert hit_tokens() == hits_before + 8 * BS
