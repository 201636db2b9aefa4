"""OpenAI requests to engine requests (chat template, tokenization, limits) and engine outputs
back to OpenAI responses and SSE chunks. The router and the worker endpoint share it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from pydantic import ValidationError

from disagg.engine.base import GenerateOutput, GenerateRequest, SamplingOptions
from disagg.openai.errors import APIError, from_validation_error
from disagg.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
)

Kind = Literal["chat", "completion"]


def parse_request(kind: Kind, body: bytes) -> ChatCompletionRequest | CompletionRequest:
    """Malformed JSON or wrong types → 400 with OpenAI's error body."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    model = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


@dataclass
class Prepared:
    """A validated request, tokenized, ready for pick() and the engine."""

    kind: Kind
    request: ChatCompletionRequest | CompletionRequest
    generate: GenerateRequest
    response_id: str
    created: int = field(default_factory=now)


class Preprocessor:
    """Turns OpenAI requests into token ids with the model's own tokenizer and chat template."""

    def __init__(self, model_dir: str, model_name: str, max_model_len: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model_name = model_name
        self.max_model_len = max_model_len

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.max_model_len)])

    def prepare(self, kind: Kind, body: bytes) -> Prepared:
        req = parse_request(kind, body)
        if req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
        token_ids = self._tokens(req)
        room = self.max_model_len - len(token_ids)
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"prompt has {len(token_ids)} tokens. Please reduce the length of the prompt.",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = req.max_completion_tokens or req.max_tokens or room
        if max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {len(token_ids) + max_tokens} tokens ({len(token_ids)} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        rid = new_id(prefix)
        sampling = SamplingOptions(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=req.stop or [],
            ignore_eos=req.ignore_eos,
        )
        return Prepared(kind, req, GenerateRequest(request_id=rid, prompt_token_ids=token_ids, sampling=sampling), rid)

    def _tokens(self, req: ChatCompletionRequest | CompletionRequest) -> list[int]:
        vocab = len(self.tokenizer)
        if isinstance(req, ChatCompletionRequest):
            try:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        if isinstance(req.prompt, str):
            return list(self.tokenizer.encode(req.prompt, add_special_tokens=False))
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in req.prompt):
            raise APIError(400, f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        return list(req.prompt)


class ResponseBuilder:
    """Accumulates engine deltas into one OpenAI response, or renders them as SSE chunks."""

    def __init__(self, prepared: Prepared, model_name: str):
        self.p = prepared
        self.model = model_name
        self.text: list[str] = []
        self.completion_tokens = 0
        self.prompt_tokens = len(prepared.generate.prompt_token_ids)
        self.finish_reason: str | None = None
        self.cached_tokens = 0

    def add(self, out: GenerateOutput) -> None:
        self.text.append(out.text)
        self.completion_tokens += len(out.token_ids)
        if out.finished:
            self.finish_reason = _finish_reason(out.finish_reason)
            self.cached_tokens = out.num_cached_tokens

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )

    def response(self) -> dict[str, Any]:
        text = "".join(self.text)
        if self.p.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": self.finish_reason, "logprobs": None}
            obj = "chat.completion"
        else:
            req = self.p.request
            if isinstance(req, CompletionRequest) and req.echo and isinstance(req.prompt, str):
                text = req.prompt + text
            choice = {"index": 0, "text": text, "finish_reason": self.finish_reason, "logprobs": None}
            obj = "text_completion"
        return {"id": self.p.response_id, "object": obj, "created": self.p.created, "model": self.model,
                "choices": [choice], "usage": self.usage().model_dump()}

    def _chunk(self, delta_text: str | None, finish_reason: str | None, *, role: bool = False) -> dict[str, Any]:
        if self.p.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if delta_text is not None:
                delta["content"] = delta_text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta_text or "", "finish_reason": finish_reason, "logprobs": None}
            obj = "text_completion"
        return {"id": self.p.response_id, "object": obj, "created": self.p.created, "model": self.model,
                "choices": [choice]}

    async def sse(self, outputs: AsyncIterator[GenerateOutput]) -> AsyncIterator[bytes]:
        """OpenAI's stream: a role chunk (chat), content deltas, a finish chunk, an optional usage
        chunk, then [DONE]. An error mid-stream becomes an error event, then [DONE]."""
        if self.p.kind == "chat":
            yield sse_event(self._chunk("", None, role=True))
        try:
            async for out in outputs:
                self.add(out)
                if out.text or out.finished:
                    finish = self.finish_reason if out.finished else None
                    if out.text:
                        yield sse_event(self._chunk(out.text, None))
                    if finish is not None:
                        yield sse_event(self._chunk(None if self.p.kind == "chat" else "", finish))
        except APIError as e:
            yield sse_event(e.body())
            yield b"data: [DONE]\n\n"
            return
        opts = self.p.request.stream_options
        if opts is not None and opts.include_usage:
            usage_chunk = self._chunk(None, None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = self.usage().model_dump()
            yield sse_event(usage_chunk)
        yield b"data: [DONE]\n\n"


def _finish_reason(reason: str | None) -> str | None:
    # vLLM reports "abort" for cancelled requests; OpenAI clients know stop/length.
    return reason if reason in ("stop", "length") else (reason or "stop")


def sse_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
