"""The Engine protocol: what a worker needs from an inference engine.

Lifecycle: construct → `await start()` (loads the model, allocates the KV cache; afterwards
`engine_id`, `layout` and `num_blocks` are set) → any number of concurrent `generate()` calls,
`abort()`s and `stats()` reads → `await shutdown()`.

A restarted engine gets a new `engine_id`: peers key their KV-transfer state by it, so a stale
agent of an old engine is never reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Protocol

from pydantic import BaseModel, Field

from kv_transfer.layout import KVLayout


class StructuredOutput(BaseModel):
    """A constraint on the generated text (vLLM's structured outputs): exactly one is set."""

    json_schema: dict[str, Any] | None = None
    json_object: bool = False


class SamplingOptions(BaseModel):
    """What the engine samples with; the same meaning as vLLM's SamplingParams fields."""

    max_tokens: int = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    # Independent answers to one prompt (choice index in GenerateOutput.index).
    n: int = Field(1, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    # Top alternatives to report per generated token (0: only the sampled token); None: no logprobs.
    logprobs: int | None = Field(None, ge=0)
    structured: StructuredOutput | None = None


class GenerateRequest(BaseModel):
    """One generation: token ids in, because the router tokenizes once and picks on them."""

    request_id: str
    prompt_token_ids: list[int] = Field(..., min_length=1)
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    # vLLM KV connector parameters (do_remote_decode / do_remote_prefill and the remote blocks).
    kv_transfer_params: dict[str, Any] | None = None


# Where a decode's prompt was prefilled, as it happened: on a prefill worker, on the decode itself
# because none was asked, or on the decode after every prefill asked failed.
PDOutcome = Literal["remote", "local", "local_fallback"]


@dataclass
class TokenLogprob:
    """One token's log probability (`token`: its text as the tokenizer decodes it alone)."""

    token_id: int
    token: str
    logprob: float


@dataclass
class PositionLogprobs:
    """A generated token's logprob and the most likely alternatives at its position, best first."""

    sampled: TokenLogprob
    top: list[TokenLogprob]


@dataclass
class GenerateOutput:
    """A delta of one choice: the tokens and text produced since the previous output of the same
    choice. `finished` is the request's end (every choice done); `finish_reason` is set on the
    last delta of its choice."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    # Prompt tokens this engine did not compute: prefix-cache hits and KV pulled from prefill.
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None
    index: int = 0  # the choice (0 ≤ index < SamplingOptions.n)
    logprobs: list[PositionLogprobs] | None = None  # one per token_ids entry, when asked for
    pd: PDOutcome | None = None  # where the prompt was prefilled; set by the decode side (orchestrator)


class RequestRejected(ValueError):
    """The engine refused the request's parameters before generating: the client's error (400).
    `param` names the request field at fault, when known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray handles whole
        return (RequestRejected, (self.message, self.param))


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
        """Stream deltas (of `sampling.n` choices, interleaved) until an output with
        finished=True. Cancelling the iterator aborts the request and frees its blocks. Raises
        RequestRejected before the first output if the engine refuses the sampling options."""

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; a no-op for unknown or finished ids."""

    async def release_remote_kv(self, request_id: str, kv_transfer_params: dict[str, Any]) -> None:
        """Decode side: tell the prefill engine that handed off these blocks that they will not
        be read, so it frees them now."""

    def stats(self) -> EngineStats:
        """The latest scheduler snapshot (updated every engine step); never blocks."""

    async def shutdown(self) -> None:
        """Stop the engine and its processes."""
