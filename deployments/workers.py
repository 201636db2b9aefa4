"""PrefillServer and DecodeServer: Serve replicas that each run one worker (engine + its own
HTTP endpoint) and keep themselves registered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import AsyncIterator

import ray
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from disagg.config import AppConfig
from disagg.engine.base import GenerateOutput, GenerateRequest
from disagg.engine.coalesce import coalesce
from disagg.worker.launch import RunningWorker, start_worker
from deployments.metrics_bridge import MetricsBridge
from disagg.messages import EngineLoad, Role, WorkerInfo

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0


def _replica_identity() -> tuple[str, int]:
    """This replica's Serve id and rank. Serve's local testing mode has no replica context
    during construction: one replica per deployment there, so rank 0 and a fresh id."""
    try:
        ctx = serve.get_replica_context()
    except RayServeException:
        return f"local-{uuid.uuid4().hex[:8]}", 0
    rank = ctx.rank.rank if getattr(ctx, "rank", None) is not None else 0
    return ctx.replica_id.unique_id, rank


class _WorkerReplica:
    role: Role

    async def __init__(self, config: AppConfig, registry: DeploymentHandle):
        replica_id, rank = _replica_identity()
        role_config = config.prefill if self.role == "prefill" else config.decode
        cpu_bind = role_config.cpu_bind[rank % len(role_config.cpu_bind)] if role_config.cpu_bind else None
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self._registry = registry
        self._running: RunningWorker = await start_worker(
            config, self.role, port=role_config.http_port, cpu_bind=cpu_bind, replica_id=replica_id, node_id=node_id,
        )
        await self._heartbeat_once()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        self._metrics = asyncio.create_task(MetricsBridge().run())

    async def _heartbeat_once(self) -> None:
        worker = self._running.worker
        await self._registry.register.remote(worker.info)
        infos: list[WorkerInfo] = await self._registry.list.remote()
        worker.known_prefill = {i.address for i in infos if i.role == "prefill"}

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._heartbeat_once()
            except Exception:  # noqa: BLE001 - the registry restarts; keep trying
                log.warning("registry heartbeat failed", exc_info=True)

    def info(self) -> WorkerInfo:
        return self._running.worker.info

    def load(self) -> EngineLoad:
        return self._running.worker.load()

    def check_health(self) -> None:
        if self._running.serve_task.done():
            raise RuntimeError("the worker's HTTP endpoint stopped")

    async def __del__(self) -> None:
        if not hasattr(self, "_metrics"):
            return  # the worker never started (its guard ends what it had started)
        self._heartbeat.cancel()
        self._metrics.cancel()
        with contextlib.suppress(Exception):
            await self._registry.deregister.remote(self._running.worker.info.engine_id)
        await self._running.stop()


# A stop waits for requests in flight briefly, and a replica's own stop is bounded: `disagg serve`
# ends everything within 30 s.
@serve.deployment(max_ongoing_requests=256, health_check_period_s=5, graceful_shutdown_wait_loop_s=0.5,
                  graceful_shutdown_timeout_s=8)
class PrefillServer(_WorkerReplica):
    role: Role = "prefill"


@serve.deployment(max_ongoing_requests=256, health_check_period_s=5, graceful_shutdown_wait_loop_s=0.5,
                  graceful_shutdown_timeout_s=8)
class DecodeServer(_WorkerReplica):
    role: Role = "decode"

    async def generate(self, request: GenerateRequest, prefill: list[str], pin: str | None = None
                       ) -> AsyncIterator[GenerateOutput]:
        """Stream one request; `pin` is read by the request router, not here. Deltas close
        together leave as one item: each item costs a Ray object and two process hops. (Not
        with several choices or logprobs: `coalesce.merge` joins one choice's text and tokens.)"""
        window_s = self._running.worker.config.stream_batching_ms / 1000
        if request.sampling.n > 1 or request.sampling.logprobs is not None:
            window_s = 0.0
        async for out in coalesce(self._running.worker.generate(request, prefill), window_s):
            yield out
