"""Messages between workers: decode asks a prefill worker for a prompt's KV (`/internal/prefill`).
What routers and EPPs read of a worker is in `disagg.messages`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# The llm-d header naming the prefill endpoint that decode should pull the KV from.
PREFILLER_HEADER = "x-prefiller-host-port"


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
