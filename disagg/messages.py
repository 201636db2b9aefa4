"""The messages workers and the routers or EPPs that follow them both speak: who a worker is
(`GET /v1/worker`) and its load (scraped, or pushed as `LoadReport`s)."""

from __future__ import annotations

from typing import Literal

import msgspec
from pydantic import BaseModel, Field

from kv_transfer.layout import KVLayout

Role = Literal["prefill", "decode"]


class WorkerInfo(BaseModel):
    """`GET /v1/worker`: who this worker is. A new engine_id means a restarted engine."""

    role: Role
    model: str
    engine_id: str
    address: str = Field(..., description="host:port of the worker's own HTTP endpoint")
    layout: KVLayout
    node_id: str = ""
    # Ray Serve replica id, when the worker runs as a Serve replica (to pin handle calls).
    replica_id: str | None = None
    # ZMQ endpoint this worker's vLLM publishes KV events to, and its replay socket.
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    # ZMQ PUB endpoint of its `LoadReport`s; None: read its load from /metrics (plain vLLM).
    load_endpoint: str | None = None
    num_blocks: int = 0


class EngineLoad(msgspec.Struct, kw_only=True):
    """Load signals of one engine, as the scheduler sees them (a plain struct: a scheduler
    following 1,000 workers builds 1,000 a second, and pydantic took 18 us each here)."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0  # 0..1
    free_blocks: int = 0
    num_blocks: int = 0


class LoadReport(msgspec.Struct, array_like=True, frozen=True):
    """What a worker pushes on its load channel (ZMQ PUB, `WorkerInfo.load_endpoint`): when its
    load changes, at most every 50 ms, and every second as a heartbeat. Several engines may
    share one channel (the report names its engine)."""

    engine_id: str
    seq: int  # per engine, from 0: a gap is reports lost
    sent_at: float  # the publisher's wall clock (time.time())
    waiting: int
    running: int
    kv_usage: float
    num_blocks: int = 0

    def load(self) -> EngineLoad:
        usable = max(self.num_blocks - 1, 0)  # block 0 is vLLM's null block
        return EngineLoad(waiting=self.waiting, running=self.running, kv_usage=self.kv_usage,
                          num_blocks=self.num_blocks, free_blocks=round((1.0 - self.kv_usage) * usable))
