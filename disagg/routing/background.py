"""What keeps a scheduler's state current while it serves picks: discovery snapshots, one
scrape loop and one KV event subscriber per endpoint, and the sweep of dead endpoints and
expired approximate prefix entries. Runs in the scheduler's event loop; `pick()` never waits
on any of it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Awaitable, Callable

from disagg.routing import metrics
from disagg.routing.discovery import Discovery
from disagg.routing.endpoint import Endpoint
from disagg.routing.http1 import Http1Connection, HttpError
from disagg.routing.kv_events import KVEventSubscriber, apply_batch, subscriber_endpoint
from disagg.routing.scraper import ScrapeError, scrape

if TYPE_CHECKING:
    from disagg.routing.scheduler import Scheduler

log = logging.getLogger(__name__)


class Background:
    def __init__(self, scheduler: "Scheduler") -> None:
        self.scheduler = scheduler
        cfg = scheduler.config
        self.scrape_interval_s = cfg.scrape_interval_s
        # An answer that takes up to dead_after_s still proves the worker alive (a starved
        # machine answers slowly); a hung worker is dead at dead_after_s whatever the timeout.
        self.scrape_timeout_s = cfg.dead_after_s
        self.sweep_interval_s = min(0.1, cfg.dead_after_s / 10)
        self._tasks: dict[str, list[asyncio.Task]] = {}

    async def run(self, discovery: Discovery) -> None:
        sweep = asyncio.create_task(self._sweep_loop(), name="disagg-sweep")
        try:
            # Endpoints registered before run() (by upsert) are followed too.
            self._follow_pool()
            async for snapshot in discovery.watch():
                errors = self.scheduler.pool.replace_all(snapshot)
                if errors:
                    metrics.REGISTRATION_ERRORS.inc(len(errors))
                self._follow_pool()
            await asyncio.Event().wait()  # discovery ended: keep scraping what we have
        finally:
            sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweep

    async def close(self) -> None:
        tasks = [t for ts in self._tasks.values() for t in ts]
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop_endpoint(self, engine_id: str) -> None:
        for task in self._tasks.pop(engine_id, []):
            task.cancel()

    def _follow_pool(self) -> None:
        for endpoint in self.scheduler.pool.endpoints(include_dead=True):
            if endpoint.engine_id not in self._tasks:
                self._tasks[endpoint.engine_id] = self._start_endpoint(endpoint)

    def _start_endpoint(self, endpoint: Endpoint) -> list[asyncio.Task]:
        tasks = [asyncio.create_task(self._scrape_loop(endpoint), name=f"disagg-scrape-{endpoint.address}")]
        info = endpoint.info
        if self.scheduler.config.kv_events and info.kv_events_endpoint:
            host = endpoint.address.rpartition(":")[0]
            replay = subscriber_endpoint(info.kv_events_replay_endpoint, host) if info.kv_events_replay_endpoint else None
            index, engine_id, pool = self.scheduler.index, endpoint.engine_id, self.scheduler.pool

            def on_batch(batch) -> None:
                apply_batch(index, engine_id, batch)
                pool.touch(engine_id)

            subscriber = KVEventSubscriber(
                subscriber_endpoint(info.kv_events_endpoint, host), on_batch, replay_endpoint=replay
            )
            tasks.append(asyncio.create_task(self._guard(subscriber.run, f"KV events of {endpoint}"),
                                             name=f"disagg-kv-events-{endpoint.address}"))
        return tasks

    async def _scrape_loop(self, endpoint: Endpoint) -> None:
        pool = self.scheduler.pool
        connection = Http1Connection(endpoint.address, timeout_s=self.scrape_timeout_s)
        try:
            while endpoint.engine_id in pool:
                try:
                    load = await scrape(connection)
                except (HttpError, ScrapeError) as exc:
                    metrics.SCRAPES.labels("error").inc()
                    log.debug("scrape %s failed: %s", endpoint.address, exc)
                else:
                    metrics.SCRAPES.labels("ok").inc()
                    if not load.num_blocks:
                        load.num_blocks = endpoint.info.num_blocks
                    pool.update_load(endpoint.engine_id, load)
                await asyncio.sleep(self.scrape_interval_s)
        finally:
            connection.close()

    async def _sweep_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            self.scheduler.pool.sweep()
            ticks += 1
            if ticks % 100 == 0:
                self.scheduler.index.expire()

    @staticmethod
    async def _guard(run: Callable[[], Awaitable[None]], what: str) -> None:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s stopped", what)
