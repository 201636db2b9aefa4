"""The messages workers and the routers or EPPs that follow them both speak: who a worker is
(`GET /v1/worker`) and its load."""

from __future__ import annotations

from typing import Literal

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
    num_blocks: int = 0


class EngineLoad(BaseModel):
    """Load signals of one engine, as the scheduler sees them."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0  # 0..1
    free_blocks: int = 0
    num_blocks: int = 0
