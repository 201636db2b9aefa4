"""Picker replicas share their picks over ZMQ: loads and approximate prefixes agree, and the lag,
the losses and the agreement are measured; a replica that restarts rejoins."""

from __future__ import annotations

import asyncio

import pytest_asyncio
from prometheus_client import REGISTRY

from disagg.bench.standin import make_info
from disagg.config import RoutingConfig
from disagg.messages import EngineLoad
from disagg.routing import PickRequest, Scheduler
from disagg.routing.peers import PeerSync, PickNotice, StaticPeers, _encode

DECODES = [f"10.0.0.{i}:8000" for i in range(1, 5)]


def replica() -> Scheduler:
    # No scraper here: signals never age.
    s = Scheduler(RoutingConfig(stale_after_s=60, dead_after_s=120, pd_threshold_tokens=10_000), model="tiny",
                  block_size=32)
    for i, address in enumerate(DECODES):
        e = s.pool.upsert(make_info("decode", address, engine_id=f"decode-{i}"))
        s.pool.update_load(e.engine_id, EngineLoad(num_blocks=1000))
    return s


async def eventually(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest_asyncio.fixture(loop_scope="function")
async def pair():
    a, b = replica(), replica()
    sync_a, sync_b = PeerSync(a, "a", sample_every=1, heartbeat_s=0.05), PeerSync(b, "b", sample_every=1,
                                                                                 heartbeat_s=0.05)
    peers = StaticPeers([sync_a.endpoint, sync_b.endpoint])
    tasks = [asyncio.create_task(sync_a.run(peers)), asyncio.create_task(sync_b.run(peers))]
    await eventually(lambda: sync_a.lag() and sync_b.lag())  # both hear each other's heartbeats
    yield a, b, sync_a, sync_b
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def prompt(i: int, prefix: int = 0) -> PickRequest:
    return PickRequest(model="tiny", prompt_token_ids=list(range(prefix, prefix + 512)) + [i] * 40)


async def test_a_peers_picks_count_as_pending_load_here(pair) -> None:
    a, b, *_ = pair
    chosen = [a.pick(prompt(i, prefix=10_000 * i)).decode[0].engine_id for i in range(6)]
    await eventually(lambda: sum(e.pending for e in b.pool.endpoints()) == 6)
    assert {e.engine_id: e.pending for e in b.pool.endpoints()} == {e: chosen.count(e) for e in set(chosen)} | {
        e.engine_id: 0 for e in b.pool.endpoints() if e.engine_id not in chosen}
    # b sends its own next pick to one of the decodes a loaded least (6 picks over 4: 2, 2, 1, 1).
    least = {e.engine_id for e in b.pool.endpoints() if e.pending == 1}
    assert len(least) == 2 and b.pick(prompt(99, prefix=900_000)).decode[0].engine_id in least


async def test_a_prefix_one_replica_routed_sticks_on_the_other(pair) -> None:
    a, b, *_ = pair
    first = a.pick(prompt(0, prefix=5_000)).decode[0].engine_id
    await eventually(lambda: b.index.num_blocks() > 0)
    assert all(b.pick(prompt(i, prefix=5_000)).decode[0].engine_id == first for i in range(1, 6))


async def test_sampled_picks_are_compared_and_agree_when_the_views_agree(pair) -> None:
    a, b, sync_a, sync_b = pair
    for i in range(8):
        a.pick(prompt(i, prefix=1000 * i))
        await asyncio.sleep(0.02)
    await eventually(lambda: sync_b.agreement is not None and sync_b._sampled == 8)
    assert sync_b.agreement == 1.0
    assert REGISTRY.get_sample_value("disagg_epp_pick_agreement_ratio") is not None


async def test_lag_is_small_while_the_peer_speaks_and_grows_when_it_stops(pair) -> None:
    a, b, sync_a, sync_b = pair
    assert sync_b.lag()["a"] < 1.0
    sync_a._pub.close(linger=0)  # a goes quiet (its heartbeats stop)
    await asyncio.sleep(0.5)
    assert sync_b.lag()["a"] >= 0.4


def test_lost_notices_are_counted_and_a_restarted_peer_rejoins() -> None:
    b = replica()
    sync_b = PeerSync(b, "b")
    lost = lambda: REGISTRY.get_sample_value("disagg_epp_peer_notices_lost_total", {"peer": "a"}) or 0.0  # noqa: E731
    before = lost()
    for seq in (0, 1, 4):  # 2 and 3 never arrive
        sync_b.apply(_encode(PickNotice("a", seq, 0.0, [])))
    assert lost() == before + 2
    sync_b.apply(_encode(PickNotice("a", 0, 0.0, [])))  # a restarted: its count starts over
    sync_b.apply(_encode(PickNotice("a", 1, 0.0, [])))
    assert lost() == before + 2
    sync_b._pub.close(linger=0)
    sync_b._sub.close(linger=0)


def test_a_notice_for_an_unknown_endpoint_is_ignored() -> None:
    from disagg.routing.peers import SharedPick

    b = replica()
    sync_b = PeerSync(b, "b")
    sync_b.apply(_encode(PickNotice("a", 0, 0.0, [SharedPick(["gone-engine"], 0.0, [1, 2])])))
    assert sum(e.pending for e in b.pool.endpoints()) == 0 and b.index.num_blocks() == 0
    sync_b._pub.close(linger=0)
    sync_b._sub.close(linger=0)
