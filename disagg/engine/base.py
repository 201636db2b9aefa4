"""The Engine protocol: what a worker needs from an inference engine.

Lifecycle: construct → `await start()` (loads the model, allocates the KV cache; afterwards
`engine_id`, `layout` and `num_blocks` are set) → any number of concurrent `generate()` calls,
`abort()`s and `stats()` reads → `await shutdown()`.

A restarted engine gets a new `engine_id`: peers key their KV-transfer state by it, so a stale
agent of an old engine is never reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from pydantic import BaseModel, Field

from kv_transfer.layout import KVLayout


class SamplingOptions(BaseModel):
    max_tokens: int = Field(16, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False


class GenerateRequest(BaseModel):
    """One generation: token ids in, because the router tokenizes once and picks on them."""

    request_id: str
    prompt_token_ids: list[int] = Field(..., min_length=1)
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    # vLLM KV connector parameters (do_remote_decode / do_remote_prefill and the remote blocks).
    kv_transfer_params: dict[str, Any] | None = None


@dataclass
class GenerateOutput:
    """A delta: the tokens and text produced since the previous output of the same request."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    # Prompt tokens this engine did not compute: prefix-cache hits and KV pulled from prefill.
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    num_blocks: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def free_blocks(self) -> int:
        # Block 0 is vLLM's null block and never handed out.
        usable = max(self.num_blocks - 1, 0)
        return round((1.0 - self.kv_usage) * usable)


class Engine(Protocol):
    engine_id: str
    layout: KVLayout

    async def start(self) -> None:
        """Load the model and allocate the KV cache. Sets engine_id, layout, num_blocks."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream deltas until an output with finished=True. Cancelling the iterator aborts
        the request and frees its blocks."""

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; a no-op for unknown or finished ids."""

    async def release_remote_kv(self, request_id: str, kv_transfer_params: dict[str, Any]) -> None:
        """Decode side: tell the prefill engine that handed off these blocks that they will not
        be read, so it frees them now."""

    def stats(self) -> EngineStats:
        """The latest scheduler snapshot (updated every engine step); never blocks."""

    async def shutdown(self) -> None:
        """Stop the engine and its processes."""
