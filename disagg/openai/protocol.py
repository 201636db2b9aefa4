"""The OpenAI API subset disagg serves: request and response bodies.

Every OpenAI sampling field vLLM implements is served, with OpenAI's documented ranges: `n`,
`logprobs` / `top_logprobs`, `response_format` (json_object, json_schema), `presence_penalty`,
`frequency_penalty`, `logit_bias`, `seed`, `stop`; and vLLM's extensions `min_tokens`,
`stop_token_ids`, `repetition_penalty`, `ignore_eos`, `return_tokens_as_token_ids`. What is not
served is refused with a 400 naming the field (function calling: `tools`, `tool_choice`,
`functions`, `function_call`; `best_of` other than n, `suffix`, `echo` with `logprobs`, and n > 1
with temperature 0, which vLLM refuses) rather than ignored. Fields OpenAI defines that do not
change the answer (`user`, `metadata`, `store`, ...) are accepted and ignored, as vLLM does."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

# vLLM's sampler seeds a torch generator: the seed is an int64.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Choices per request: each is a sequence of its own in the decode engine's batch (max_num_seqs).
MAX_N = 16
# OpenAI's bounds: top_logprobs (chat) 0..20, which is also vLLM's default max_logprobs; logprobs
# (completions) 0..5.
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
LOGIT_BIAS_LIMIT = 100.0


class _Request(BaseModel):
    # Unknown OpenAI fields (user, n=1, logit_bias...) are accepted and ignored, as vLLM does.
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # OpenAI's API reads `null` for an optional field as "not given".
        if isinstance(data, dict) and None in data.values():
            fields = cls.model_fields
            return {k: v for k, v in data.items()
                    if v is not None or k not in fields or fields[k].is_required()}
        return data


class StreamOptions(_Request):
    include_usage: bool = False


class JSONSchemaFormat(_Request):
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    # OpenAI lets the schema out; then the answer is any JSON object (as json_object).
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self


class SamplingFields(_Request):
    """The sampling fields chat and completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # Token id (a decimal string, as JSON keys are) → bias added to its logit.
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # Refused when set (the Preprocessor says so, naming the field): no function calling here.
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    # vLLM's extensions. ignore_eos is useful for benchmarks with random-weight models.
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    repetition_penalty: float = Field(1.0, gt=0.0)
    # Logprobs name each token "token_id:<id>" instead of its text (vLLM's extension).
    return_tokens_as_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        # Keys are checked against the vocabulary by the Preprocessor, which knows it.
        for key, bias in (v or {}).items():
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"bias values must be in [-100, 100], got {bias} for token {key[:20]!r}")
        return v


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS, strict=True)
    # Refused when above 1 or set (the Preprocessor says so): vLLM's engine has neither.
    best_of: int | None = Field(None, ge=1, strict=True)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, v: Any) -> str | list[int]:
        # One prompt per request: batches of prompts are split by the client.
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            v = v[0]
        if isinstance(v, str) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "disagg"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
