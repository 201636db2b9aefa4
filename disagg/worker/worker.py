"""A worker: one engine in one role, the prefill side of a hand-off, and the decode side's
orchestration. The HTTP endpoint (server.py) and the Ray deployments both call this class."""

from __future__ import annotations

import logging
from typing import AsyncIterator

from disagg.config import AppConfig
from disagg.engine.base import Engine, GenerateOutput, GenerateRequest, SamplingOptions
from disagg.openai.errors import APIError
from disagg.worker import metrics
from disagg.worker.orchestrator import PrefillClient, PrefillOutcome, generate_disaggregated
from disagg.messages import EngineLoad, LoadReport, Role, WorkerInfo
from disagg.worker.protocol import PrefillRequest, PrefillResult

log = logging.getLogger(__name__)


class Worker:
    """Lifecycle: construct with a started engine → serve prefill()/generate() → close()."""

    def __init__(self, config: AppConfig, role: Role, engine: Engine, address: str, *,
                 node_id: str = "", replica_id: str | None = None,
                 kv_events_endpoint: str | None = None, kv_events_replay_endpoint: str | None = None,
                 load_endpoint: str | None = None):
        self.config = config
        self.role = role
        self.engine = engine
        self.address = address
        # Prefill workers decode may call (never an arbitrary host: SSRF). Filled by discovery.
        self.known_prefill: set[str] = set()
        self.info = WorkerInfo(
            role=role,
            model=config.model_name,
            engine_id=engine.engine_id,
            address=address,
            layout=engine.layout,
            node_id=node_id,
            replica_id=replica_id,
            kv_events_endpoint=kv_events_endpoint,
            kv_events_replay_endpoint=kv_events_replay_endpoint,
            load_endpoint=load_endpoint,
            num_blocks=getattr(engine, "num_blocks", 0),
        )
        self._prefill_client = PrefillClient(config, engine.layout.fingerprint())

    def is_registered_prefill(self, address: str) -> bool:
        return address in self.known_prefill

    def load(self) -> EngineLoad:
        s = self.engine.stats()
        return EngineLoad(waiting=s.waiting, running=s.running, kv_usage=s.kv_usage,
                          free_blocks=s.free_blocks, num_blocks=s.num_blocks)

    def load_reports(self) -> list[LoadReport]:
        """The engine's load, for the worker's load channel (`disagg.routing.load_channel`)."""
        s = self.engine.stats()
        return [LoadReport(self.engine.engine_id, 0, 0.0, s.waiting, s.running, s.kv_usage, s.num_blocks)]

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        """Compute the prompt's KV and keep it for a remote decode (under the connector's lease)."""
        if request.layout_fingerprint and request.layout_fingerprint != self.engine.layout.fingerprint():
            raise APIError(409, f"KV layout mismatch: decode has {request.layout_fingerprint}, this prefill "
                                f"worker has {self.engine.layout.fingerprint()} ({self.engine.layout})",
                           code="kv_layout_mismatch")
        params = dict(request.kv_transfer_params or {})
        params["do_remote_decode"] = True
        params["do_remote_prefill"] = False
        gen = GenerateRequest(request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                              sampling=SamplingOptions(max_tokens=1, temperature=0.0), kv_transfer_params=params)
        last: GenerateOutput | None = None
        with metrics.PREFILL_SECONDS.time():
            async for out in self.engine.generate(gen):
                last = out
        if last is None or not last.finished:
            raise APIError(503, "prefill did not finish")
        return PrefillResult(
            request_id=request.request_id,
            kv_transfer_params=last.kv_transfer_params,
            first_token_id=last.token_ids[0] if last.token_ids else None,
            num_prompt_tokens=last.num_prompt_tokens,
        )

    async def release_prefill(self, request_id: str, kv_transfer_params: dict | None) -> None:
        """Prefill side: the decode that asked for these blocks is gone; free them now."""
        if kv_transfer_params:
            await self.engine.release_remote_kv(request_id, kv_transfer_params)

    def generate(self, request: GenerateRequest, prefill_candidates: list[str]) -> AsyncIterator[GenerateOutput]:
        """Decode: prefill remotely on the first healthy candidate (or locally), then stream."""
        return generate_disaggregated(self.engine, self._prefill_client, request, prefill_candidates,
                                      on_prefill=_count_prefill)

    async def close(self) -> None:
        await self._prefill_client.aclose()
        await self.engine.shutdown()


def _count_prefill(outcome: PrefillOutcome) -> None:
    metrics.PREFILL_ATTEMPTS.inc(outcome.attempts)
    metrics.PREFILL_HANDOFFS.labels(result="remote" if outcome.address else "local_fallback").inc()

