"""What keeps a pool and its prefix index current while picks are served: discovery snapshots,
each endpoint's load (pushed over its load channel, or scraped from /metrics when it has none),
one KV event subscriber per endpoint, and the sweep of dead endpoints and expired approximate
prefix entries. Runs in the pickers' event loop; `pick()` never waits on it."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from disagg.config import RoutingConfig
from disagg.routing import metrics
from disagg.routing.discovery import Discovery
from disagg.routing.endpoint import Endpoint
from disagg.routing.kv_events import KVEventBatch, KVEventSubscriber, apply_batch, subscriber_endpoint
from disagg.routing.load_channel import LoadSubscriber
from disagg.routing.pool import EndpointPool
from disagg.routing.prefix_index import PrefixIndex
from disagg.routing.scraper import ScrapeError, scrape

log = logging.getLogger(__name__)


class Background:
    def __init__(self, pool: EndpointPool, index: PrefixIndex, config: RoutingConfig) -> None:
        self.pool = pool
        self.index = index
        self.config = config
        self.sweep_interval_s = min(0.1, config.dead_after_s / 10)
        self._tasks: dict[str, list[asyncio.Task]] = {}
        self._followed: dict[str, str] = {}  # engine id -> load channel it is followed on
        self._session: aiohttp.ClientSession | None = None
        self.loads = LoadSubscriber(pool)
        pool.on_remove(lambda endpoint, reason: self._stop_endpoint(endpoint.engine_id))

    async def run(self, discovery: Discovery) -> None:
        """Until cancelled; then every task it started has ended."""
        # An answer that takes up to dead_after_s still proves the worker alive (a starved
        # machine answers slowly); a hung worker is dead at dead_after_s whatever the timeout.
        timeout = aiohttp.ClientTimeout(total=self.config.dead_after_s)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        sweep = asyncio.create_task(self._sweep_loop(), name="disagg-sweep")
        loads = asyncio.create_task(self.loads.run(), name="disagg-load-reports")
        try:
            self._follow_pool()  # endpoints registered before run() (by upsert) are followed too
            async for snapshot in discovery.watch():
                errors = self.pool.replace_all(snapshot)
                if errors:
                    metrics.REGISTRATION_ERRORS.inc(len(errors))
                self._follow_pool()
            await asyncio.Event().wait()  # discovery ended: keep scraping what we have
        finally:
            tasks = [sweep, loads, *(t for ts in self._tasks.values() for t in ts)]
            self._tasks.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._session.close()

    def _stop_endpoint(self, engine_id: str) -> None:
        for task in self._tasks.pop(engine_id, []):
            task.cancel()
        if engine_id in self._followed:
            self.loads.unfollow(self._followed.pop(engine_id))
            self.loads.forget(engine_id)

    def _follow_pool(self) -> None:
        for endpoint in self.pool.endpoints(include_dead=True):
            if endpoint.engine_id not in self._tasks:
                self._tasks[endpoint.engine_id] = self._start_endpoint(endpoint)

    def _start_endpoint(self, endpoint: Endpoint) -> list[asyncio.Task]:
        info = endpoint.info
        tasks = []
        if info.load_endpoint:
            channel = subscriber_endpoint(info.load_endpoint, endpoint.address.rpartition(":")[0])
            self.loads.follow(channel)
            self._followed[endpoint.engine_id] = channel
        else:  # a model server that does not push (plain vLLM): scrape its /metrics
            tasks.append(asyncio.create_task(self._scrape_loop(endpoint), name=f"disagg-scrape-{endpoint.address}"))
        if self.config.kv_events and info.kv_events_endpoint:
            host = endpoint.address.rpartition(":")[0]
            replay = subscriber_endpoint(info.kv_events_replay_endpoint, host) if info.kv_events_replay_endpoint else None
            engine_id = endpoint.engine_id

            def on_batch(batch: KVEventBatch) -> None:
                apply_batch(self.index, engine_id, batch)
                self.pool.touch(engine_id)

            subscriber = KVEventSubscriber(subscriber_endpoint(info.kv_events_endpoint, host), on_batch,
                                           replay_endpoint=replay)
            tasks.append(asyncio.create_task(self._guard(subscriber, endpoint),
                                             name=f"disagg-kv-events-{endpoint.address}"))
        return tasks

    async def _scrape_loop(self, endpoint: Endpoint) -> None:
        assert self._session is not None
        while endpoint.engine_id in self.pool:
            try:
                load = await scrape(self._session, endpoint.address)
            except ScrapeError as exc:
                metrics.SCRAPES.labels("error").inc()
                log.debug("scrape %s failed: %s", endpoint.address, exc)
            else:
                metrics.SCRAPES.labels("ok").inc()
                if not load.num_blocks:
                    load.num_blocks = endpoint.info.num_blocks
                self.pool.update_load(endpoint.engine_id, load)
            await asyncio.sleep(self.config.scrape_interval_s)

    async def _sweep_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            self.pool.sweep()
            ticks += 1
            if ticks % 100 == 0:
                self.index.expire()

    @staticmethod
    async def _guard(subscriber: KVEventSubscriber, endpoint: Endpoint) -> None:
        try:
            await subscriber.run()
        except Exception:  # CancelledError is not one: a stop goes through
            log.exception("KV events of %s stopped", endpoint)
