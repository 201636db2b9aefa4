"""Scheduler.run with real HTTP: static discovery, /metrics scraping, death and restarts."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio

from disagg.config import RoutingConfig
from disagg.routing import PickRequest, Scheduler, StaticDiscovery, parse_endpoints
from disagg.bench.standin import StandInWorker, metrics_text
from disagg.routing.scraper import ScrapeError, parse_metrics
from disagg.messages import EngineLoad


def test_parse_vllm_metrics() -> None:
    load = parse_metrics(metrics_text(EngineLoad(waiting=3, running=2, kv_usage=0.25, num_blocks=101)))
    assert (load.waiting, load.running, load.kv_usage, load.num_blocks, load.free_blocks) == (3, 2, 0.25, 101, 75)


def test_parse_sums_engines_and_reads_old_usage_name() -> None:
    text = (
        'vllm:num_requests_waiting{engine="0"} 1.0\nvllm:num_requests_waiting{engine="1"} 2.0\n'
        "vllm:num_requests_running 4\nvllm:gpu_cache_usage_perc 0.5\n"
    )
    load = parse_metrics(text)
    assert (load.waiting, load.running, load.kv_usage) == (3, 4, 0.5)


def test_metrics_without_vllm_load_is_an_error() -> None:
    with pytest.raises(ScrapeError):
        parse_metrics("process_cpu_seconds_total 1.0\n")


def test_parse_endpoints() -> None:
    assert parse_endpoints("a:1, http://b:2,") == ["a:1", "b:2"]
    with pytest.raises(ValueError):
        parse_endpoints("nohost")


async def wait_for(cond, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest_asyncio.fixture(loop_scope="function")
async def cluster():
    workers = [StandInWorker("decode").start(), StandInWorker("decode").start(), StandInWorker("prefill").start()]
    s = Scheduler(RoutingConfig(scrape_interval_s=0.05), model="tiny", block_size=32)
    task = asyncio.create_task(s.run(StaticDiscovery([w.address for w in workers], interval_s=0.2)))
    await wait_for(lambda: len(s.pool) == 3, timeout=15)
    yield s, workers
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    for w in workers:
        w.stop()


async def test_discovered_workers_join_with_their_roles(cluster) -> None:
    s, workers = cluster
    assert {e.address for e in s.pool.endpoints("decode")} == {workers[0].address, workers[1].address}
    assert [e.address for e in s.pool.endpoints("prefill")] == [workers[2].address]


async def test_scraped_load_steers_the_pick(cluster) -> None:
    s, workers = cluster
    workers[0].load = EngineLoad(waiting=5, running=8, num_blocks=1000)
    busy = s.pool.by_address(workers[0].address)
    await wait_for(lambda: busy.load.running == 8)
    assert s.pick(PickRequest(model="tiny", prompt_token_ids=[1, 2, 3])).decode[0].address == workers[1].address


async def test_hung_worker_leaves_the_pool_within_dead_after(cluster) -> None:
    s, workers = cluster
    hung = s.pool.by_address(workers[0].address)
    workers[0].hang()
    # Out of the live pool once silent past dead_after_s (forgotten only later).
    elapsed = await wait_for(lambda: hung not in s.pool.endpoints("decode"), timeout=4.0)
    assert elapsed < 2.0 + 0.5
    for i in range(20):
        pick = s.pick(PickRequest(model="tiny", prompt_token_ids=list(range(i, i + 100))))
        assert workers[0].address not in pick.decode_addresses


async def test_worker_forgotten_while_hung_comes_back_when_it_answers(cluster) -> None:
    s, workers = cluster
    s.pool.forget_after_s = 2.5
    gone = workers[0]
    engine_id = gone.info.engine_id
    gone.hung.set()
    await wait_for(lambda: engine_id not in s.pool, timeout=6)
    gone.hung.clear()
    await wait_for(lambda: any(e.engine_id == engine_id for e in s.pool.endpoints("decode")), timeout=6)


async def test_restarted_worker_is_replaced_by_its_new_engine(cluster) -> None:
    s, workers = cluster
    old = workers[1]
    old_engine = old.info.engine_id
    old.stop()
    workers[1] = StandInWorker("decode", port=old.port).start()
    await wait_for(lambda: s.pool.by_address(old.address) is not None
                   and s.pool.by_address(old.address).engine_id == workers[1].info.engine_id)
    assert old_engine not in s.pool


async def test_the_gateways_pool_discovery_follows_the_routers_pool() -> None:
    # `disagg serve --gateway`: the router's /v1/pool names the workers; each one's descriptor
    # comes from its own endpoint; a worker gone from the pool leaves the next snapshot.
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from disagg.routing.discovery import RouterPoolDiscovery

    workers = [StandInWorker("decode").start(), StandInWorker("prefill").start()]
    listed = [w.address for w in workers]

    class Router(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps([{"address": a} for a in listed]).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    router = ThreadingHTTPServer(("127.0.0.1", 0), Router)
    threading.Thread(target=router.serve_forever, daemon=True).start()
    watch = RouterPoolDiscovery(f"http://127.0.0.1:{router.server_address[1]}", interval_s=0.05).watch()
    try:
        first = await asyncio.wait_for(anext(watch), 10)
        assert sorted((i.role, i.address) for i in first) == sorted(
            [("decode", workers[0].address), ("prefill", workers[1].address)])
        listed.pop()
        while len(snapshot := await asyncio.wait_for(anext(watch), 10)) != 1:
            pass
        assert snapshot[0].address == workers[0].address
    finally:
        await watch.aclose()
        router.shutdown()
        for w in workers:
            w.stop()
