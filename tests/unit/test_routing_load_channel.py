"""Load pushed by workers: reports change the pool's view within a report; a worker with no
load channel is scraped instead; one that stops publishing leaves the live pool within 2 s."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY

from disagg.bench.standin import StandInFleet
from disagg.config import RoutingConfig
from disagg.routing import Scheduler, StaticDiscovery


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def eventually(cond, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def follow(fleet: StandInFleet) -> tuple[Scheduler, asyncio.Task]:
    scheduler = Scheduler(RoutingConfig(scrape_interval_s=0.05), model="tiny", block_size=32)
    task = asyncio.create_task(scheduler.run(StaticDiscovery([w.address for w in fleet.workers], interval_s=0.2)))
    await eventually(lambda: len(scheduler.pool.endpoints()) == len(fleet.workers))
    return scheduler, task


async def test_pushed_loads_reach_the_pool_and_no_scrape_is_made() -> None:
    fleet = StandInFleet(["decode", "decode"], model="tiny").start()
    scraped = counter("disagg_scrapes_total", result="ok")
    scheduler, task = await follow(fleet)
    try:
        fleet.workers[0].load.waiting = 5
        engine_id = fleet.workers[0].info.engine_id
        await eventually(lambda: scheduler.pool.get(engine_id).load.waiting == 5, timeout=1.0)
        assert counter("disagg_scrapes_total", result="ok") == scraped
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        fleet.stop()


async def test_a_worker_without_a_load_channel_is_scraped() -> None:
    fleet = StandInFleet(["decode"], publish=False, model="tiny").start()
    scraped = counter("disagg_scrapes_total", result="ok")
    scheduler, task = await follow(fleet)
    try:
        assert fleet.workers[0].info.load_endpoint is None
        fleet.workers[0].load.running = 3
        engine_id = fleet.workers[0].info.engine_id
        await eventually(lambda: scheduler.pool.get(engine_id).load.running == 3, timeout=2.0)
        assert counter("disagg_scrapes_total", result="ok") > scraped
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        fleet.stop()


async def test_a_worker_that_stops_publishing_leaves_the_live_pool_within_two_seconds() -> None:
    fleet = StandInFleet(["decode", "decode"], model="tiny").start()
    scheduler, task = await follow(fleet)
    try:
        quiet = fleet.workers[1]
        fleet.mute(quiet)
        left = await eventually(lambda: quiet.info.engine_id not in {e.engine_id for e in scheduler.pool.endpoints("decode")},
                                timeout=3.0)
        assert left <= 2.1
        assert [e.engine_id for e in scheduler.pool.endpoints("decode")] == [fleet.workers[0].info.engine_id]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        fleet.stop()
