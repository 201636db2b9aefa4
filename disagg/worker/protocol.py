"""Messages a worker's own HTTP endpoint speaks to routers, EPPs and other workers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from kv_transfer.layout import KVLayout

Role = Literal["prefill", "decode"]

# The llm-d header naming the prefill endpoint that decode should pull the KV from.
PREFILLER_HEADER = "x-prefiller-host-port"


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


class PrefillRequest(BaseModel):
    """`POST /internal/prefill`: prefill these tokens and keep the KV for a remote decode."""

    request_id: str
    prompt_token_ids: list[int] = Field(..., min_length=1)
    # The decode side's view of the layout: prefill refuses a mismatch before computing.
    layout_fingerprint: str | None = None
    kv_transfer_params: dict[str, Any] = Field(default_factory=dict)


class PrefillResult(BaseModel):
    request_id: str
    kv_transfer_params: dict[str, Any] | None
    # The first token, sampled on prefill; decode resamples it so the output is its own.
    first_token_id: int | None = None
    num_prompt_tokens: int = 0
