"""OpenAI requests to engine requests (chat template, tokenization, limits) and engine outputs
back to OpenAI responses and SSE chunks. The router and the worker endpoint share it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from pydantic import ValidationError

from disagg.engine.base import GenerateOutput, GenerateRequest, SamplingOptions
from disagg.openai.body import parse_json, shorten
from disagg.openai.errors import APIError, error_body, from_validation_error
from disagg.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
)

log = logging.getLogger(__name__)
Kind = Literal["chat", "completion"]
# Text that shows whether the tokenizer gives its input back unchanged (see _longest_token_bytes).
_ROUND_TRIP_PROBE = "Prüfung ①ﬁ Ａ\u00a0\x00\t\n  x\u0301 😀 漢字 \ue000 ﷺ end"


def parse_request(kind: Kind, body: bytes) -> ChatCompletionRequest | CompletionRequest:
    """Malformed JSON, hostile JSON (see disagg.openai.body) or wrong types → 400 with OpenAI's
    error body."""
    data = parse_json(body)
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
    """Turns OpenAI requests into token ids with the model's own tokenizer and chat template.

    `prepare` is synchronous (the EPP calls it so); servers call `prepare_async`, which runs it
    on a few threads of its own: a 1 MB prompt takes a second to tokenize, and on the event loop
    it held every other request (the tokenizers library releases the GIL while it works)."""

    def __init__(self, model_dir: str, model_name: str, max_model_len: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = len(self.tokenizer)
        self._longest_token_bytes = _longest_token_bytes(self.tokenizer)
        self._threads = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="tokenize")

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.max_model_len)])

    async def prepare_async(self, kind: Kind, body: bytes) -> Prepared:
        """`prepare`, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, self.prepare, kind, body)

    def prepare(self, kind: Kind, body: bytes) -> Prepared:
        req = parse_request(kind, body)
        if req.model != self.model_name:
            raise APIError(404, f"The model `{shorten(req.model)}` does not exist.", param="model",
                           code="model_not_found")
        requested = req.max_completion_tokens or req.max_tokens
        if requested is not None and requested >= self.max_model_len:
            # No prompt leaves room for this: refuse before tokenizing anything.
            raise self._too_long(requested=requested)
        token_ids = self._tokens(req)
        room = self.max_model_len - len(token_ids)
        if room < 1:
            raise self._too_long(prompt_tokens=len(token_ids), param="messages" if kind == "chat" else "prompt")
        max_tokens = requested or room
        if max_tokens > room:
            raise self._too_long(prompt_tokens=len(token_ids), requested=max_tokens)
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

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        """Token ids a client sent: each in the vocabulary, and the prompt leaves room for at
        least one generated token (the engine refuses anything else, as a 500)."""
        vocab = self.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token ids must be integers in [0, {vocab}), got {shorten(str(bad))}",
                           param=param)
        if len(token_ids) >= self.max_model_len:
            raise self._too_long(prompt_tokens=len(token_ids), param=param)

    def _tokens(self, req: ChatCompletionRequest | CompletionRequest) -> list[int]:
        if isinstance(req, ChatCompletionRequest):
            try:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 - a template's raise_exception(): the messages' fault
                raise APIError(400, f"messages: the chat template refused them: {shorten(str(e), 200)}",
                               param="messages") from None
            return self._encode(text, "messages")
        if isinstance(req.prompt, str):
            return self._encode(req.prompt, "prompt")
        self.check_token_ids(req.prompt, "prompt")
        return list(req.prompt)

    def _encode(self, text: str, param: str) -> list[int]:
        if self._longest_token_bytes is not None:
            # No token stands for more bytes than the longest one: a text this long cannot fit,
            # and a megabyte of it need not be tokenized to say so.
            at_least = -(-len(text.encode("utf-8")) // self._longest_token_bytes)
            if at_least >= self.max_model_len:
                raise self._too_long(prompt_tokens=at_least, param=param, at_least=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _too_long(self, *, prompt_tokens: int | None = None, requested: int | None = None,
                  param: str = "max_tokens", at_least: bool = False) -> APIError:
        limit = f"This model's maximum context length is {self.max_model_len} tokens."
        if requested is None:
            n = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
            message = f"{limit} However, your prompt has {n} tokens. Please reduce the length of the prompt."
        elif prompt_tokens is None:
            message = (f"{limit} However, you requested {requested} tokens for the completion alone. "
                       f"Please reduce max_tokens.")
        else:
            message = (f"{limit} However, you requested {prompt_tokens + requested} tokens ({prompt_tokens} in "
                       f"the prompt, {requested} for the completion). Please reduce the prompt or max_tokens.")
        return APIError(400, message, param=param, code="context_length_exceeded")


def _longest_token_bytes(tokenizer: Any) -> int | None:
    """The most UTF-8 bytes of text one token stands for (+1 for a word-start space a lone
    token's decode drops), or None when the tokenizer does not give text back as it came
    (it normalizes or maps unknown runs to one token): then no byte count bounds the tokens."""
    ids = tokenizer.encode(_ROUND_TRIP_PROBE, add_special_tokens=False)
    back = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if back.removeprefix(" ") != _ROUND_TRIP_PROBE:
        return None
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    return max(len(t.encode("utf-8", "surrogatepass")) for t in texts) + 1


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
        except Exception as e:  # noqa: BLE001 - the status line is sent: the stream must end well
            if isinstance(e, APIError):
                body = e.body()
            else:
                log.exception("stream %s failed", self.p.response_id)
                body = error_body(500, f"internal error: {type(e).__name__}")
            yield sse_event(body)
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
