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

from disagg.engine.base import (GenerateOutput, GenerateRequest, PDOutcome, PositionLogprobs, RequestRejected,
                                SamplingOptions, StructuredOutput, TokenLogprob)
from disagg.openai.body import parse_json, shorten
from disagg.openai.errors import APIError, error_body, from_validation_error
from disagg.openai.protocol import (
    INT64_MAX,
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


# The tokenizer classes AutoTokenizer resolves to transformers' generic fast tokenizer.
_GENERIC_FAST = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(model_dir: str) -> Any:
    """The model's tokenizer, as AutoTokenizer makes it. A model whose tokenizer is the generic
    fast one (`tokenizer_class` in its tokenizer_config.json) gets that class loaded directly:
    AutoTokenizer's module imports torch, 1.8 s of the 4.6 s a picker took to load its tokenizer
    here, for nothing a tokenizer uses."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    tokenizer_class = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            tokenizer_class = json.load(f).get("tokenizer_class")
    if tokenizer_class in _GENERIC_FAST:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        return TokenizersBackend.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


class Preprocessor:
    """Turns OpenAI requests into token ids with the model's own tokenizer and chat template.

    `prepare` is synchronous (the EPP calls it so); servers call `prepare_async`, which runs it
    on a few threads of its own: a 1 MB prompt takes a second to tokenize, and on the event loop
    it held every other request (the tokenizers library releases the GIL while it works)."""

    def __init__(self, model_dir: str, model_name: str, max_model_len: int):
        self.tokenizer = load_tokenizer(model_dir)
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
        sampling = self._sampling(req, max_tokens)
        return Prepared(kind, req, GenerateRequest(request_id=rid, prompt_token_ids=token_ids, sampling=sampling), rid)

    def _sampling(self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> SamplingOptions:
        """The engine's options for a request; a field the engine cannot honour is a 400 naming it."""
        refuse_unsupported(req)
        if req.seed is not None and req.seed + req.n - 1 > INT64_MAX:
            # Choice i samples with seed + i (vLLM's rule): every one must stay an int64.
            raise APIError(400, f"seed: seed + n - 1 must be at most {INT64_MAX} (choice i samples with seed + i)",
                           param="seed")
        if req.n > 1 and req.temperature == 0:
            raise APIError(400, "n: more than one choice needs temperature > 0 (greedy choices would all be the "
                                "same; the engine refuses them)", param="n")
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
                           param="min_tokens")
        logit_bias = {self._token_id(key, "logit_bias"): bias for key, bias in (req.logit_bias or {}).items()}
        for token_id in req.stop_token_ids or []:
            self._token_id(token_id, "stop_token_ids")
        return SamplingOptions(
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=req.stop or [],
            stop_token_ids=req.stop_token_ids or [],
            ignore_eos=req.ignore_eos,
            n=req.n,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            logit_bias=logit_bias or None,
            logprobs=requested_logprobs(req),
            structured=structured_output(req),
        )

    def _token_id(self, token: str | int, param: str) -> int:
        try:
            token_id = int(token)  # logit_bias keys are decimal strings
        except ValueError:
            token_id = -1
        if not 0 <= token_id < self.vocab_size:
            raise APIError(400, f"{param}: token ids must be integers in [0, {self.vocab_size}), got "
                                f"{shorten(str(token))}", param=param)
        return token_id

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


def rejected(prepared: Prepared, error: RequestRejected) -> APIError:
    """The engine's refusal of a request's options as the client's 400, naming the OpenAI field."""
    openai_names = {"structured": "response_format", "logprobs": "top_logprobs" if prepared.kind == "chat" else "logprobs"}
    field_name = openai_names.get(error.param or "", error.param)
    return APIError(400, f"{field_name + ': ' if field_name else ''}{shorten(error.message, 300)}", param=field_name)


def refuse_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """A 400 naming the first field that asks for what this server does not do: it is never
    silently ignored."""
    if req.tools:
        raise APIError(400, "tools: function calling is not supported by this server", param="tools")
    if req.functions:
        raise APIError(400, "functions: function calling is not supported by this server", param="functions")
    for name in ("tool_choice", "function_call"):
        value = getattr(req, name)
        if value is not None and value != "none":
            raise APIError(400, f"{name}: function calling is not supported by this server (only \"none\")",
                           param=name)
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs: logprobs must be true when top_logprobs is set", param="top_logprobs")
        return
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of: only best_of equal to n is supported (the engine returns every choice)",
                       param="best_of")
    if req.suffix:
        raise APIError(400, "suffix: insertion (suffix) is not supported by this model server", param="suffix")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo: echo with logprobs (the prompt's logprobs) is not supported", param="echo")


def requested_logprobs(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """How many alternatives per token the engine reports (0: the sampled token's only); None: no logprobs."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def structured_output(req: ChatCompletionRequest | CompletionRequest) -> StructuredOutput | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and fmt.json_schema is not None and fmt.json_schema.json_schema is not None:
        return StructuredOutput(json_schema=fmt.json_schema.json_schema)
    return StructuredOutput(json_object=True)


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


@dataclass
class _Choice:
    """One choice's answer so far."""

    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    text_offset: int = 0  # completions' logprobs.text_offset of the next token


class ResponseBuilder:
    """Accumulates engine deltas into one OpenAI response, or renders them as SSE chunks.

    `pd` is where the prompt was prefilled (GenerateOutput.pd), known from the first output on:
    the JSON answer's `x-disagg-pd` header, and in a stream the `disagg: {"pd": ...}` field of
    the last chunk before [DONE] (the usage chunk when asked for, else the final finish chunk)."""

    def __init__(self, prepared: Prepared, model_name: str):
        self.p = prepared
        self.model = model_name
        req = prepared.request
        self.logprobs = prepared.generate.sampling.logprobs
        self.token_ids_as_text = req.return_tokens_as_token_ids
        echo = isinstance(req, CompletionRequest) and req.echo and isinstance(req.prompt, str)
        self.echo_text = req.prompt if echo else ""  # type: ignore[union-attr]
        self.choices = [_Choice(text_offset=len(self.echo_text)) for _ in range(prepared.generate.sampling.n)]
        self.prompt_tokens = len(prepared.generate.prompt_token_ids)
        self.cached_tokens = 0
        self.pd: PDOutcome | None = None

    def add(self, out: GenerateOutput) -> _Choice:
        choice = self.choices[out.index]
        choice.text.append(out.text)
        choice.tokens += len(out.token_ids)
        if out.logprobs:
            choice.logprobs.extend(out.logprobs)
        if out.finish_reason is not None or (out.finished and choice.finish_reason is None):
            choice.finish_reason = _finish_reason(out.finish_reason)
        if out.finished:
            self.cached_tokens = out.num_cached_tokens
        if self.pd is None:
            self.pd = out.pd
        return choice

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )

    def response(self) -> dict[str, Any]:
        choices = []
        for index, c in enumerate(self.choices):
            text = "".join(c.text)
            if self.p.kind == "chat":
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "finish_reason": c.finish_reason, "logprobs": self._chat_logprobs(c.logprobs)})
            else:
                offsets = _Choice(text_offset=len(self.echo_text))
                choices.append({"index": index, "text": self.echo_text + text, "finish_reason": c.finish_reason,
                                "logprobs": self._completion_logprobs(c.logprobs, offsets)})
        obj = "chat.completion" if self.p.kind == "chat" else "text_completion"
        return {"id": self.p.response_id, "object": obj, "created": self.p.created, "model": self.model,
                "choices": choices, "usage": self.usage().model_dump()}

    def _token(self, t: TokenLogprob) -> str:
        return f"token_id:{t.token_id}" if self.token_ids_as_text else t.token

    def _chat_logprobs(self, positions: list[PositionLogprobs]) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        return {"content": [{**_chat_token(self._token(p.sampled), p.sampled.logprob),
                             "top_logprobs": [_chat_token(self._token(t), t.logprob) for t in p.top]}
                            for p in positions]}

    def _completion_logprobs(self, positions: list[PositionLogprobs], choice: _Choice) -> dict[str, Any] | None:
        """OpenAI's legacy shape; `choice.text_offset` advances past these tokens."""
        if self.logprobs is None:
            return None
        tokens, token_logprobs, top, offsets = [], [], [], []
        for p in positions:
            token = self._token(p.sampled)
            tokens.append(token)
            token_logprobs.append(_finite(p.sampled.logprob))
            alternatives = {self._token(t): _finite(t.logprob) for t in p.top}
            alternatives.setdefault(token, _finite(p.sampled.logprob))
            top.append(alternatives)
            offsets.append(choice.text_offset)
            choice.text_offset += len(p.sampled.token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _chunk(self, index: int, delta_text: str | None, finish_reason: str | None, *, role: bool = False,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.p.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if delta_text is not None:
                delta["content"] = delta_text
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": delta_text or "", "finish_reason": finish_reason, "logprobs": logprobs}
            obj = "text_completion"
        return {"id": self.p.response_id, "object": obj, "created": self.p.created, "model": self.model,
                "choices": [choice]}

    def _delta_logprobs(self, out: GenerateOutput, choice: _Choice) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        positions = out.logprobs or []
        if self.p.kind == "chat":
            return self._chat_logprobs(positions)
        return self._completion_logprobs(positions, choice)

    async def sse(self, outputs: AsyncIterator[GenerateOutput]) -> AsyncIterator[bytes]:
        """OpenAI's stream: a role chunk per choice (chat), content deltas, a finish chunk per
        choice, an optional usage chunk, then [DONE]. An error mid-stream becomes an error event,
        then [DONE]."""
        if self.p.kind == "chat":
            for index in range(len(self.choices)):
                yield sse_event(self._chunk(index, "", None, role=True))
        opts = self.p.request.stream_options
        with_usage = opts is not None and opts.include_usage
        try:
            async for out in outputs:
                choice = self.add(out)
                if out.text or (self.logprobs is not None and out.logprobs):
                    yield sse_event(self._chunk(out.index, out.text, None, logprobs=self._delta_logprobs(out, choice)))
                if out.finish_reason is not None or out.finished:
                    finish = self._chunk(out.index, None if self.p.kind == "chat" else "", choice.finish_reason)
                    if out.finished and not with_usage:
                        finish["disagg"] = self._disagg()
                    yield sse_event(finish)
        except Exception as e:  # noqa: BLE001 - the status line is sent: the stream must end well
            if isinstance(e, APIError):
                body = e.body()
            else:
                log.exception("stream %s failed", self.p.response_id)
                body = error_body(500, f"internal error: {type(e).__name__}")
            yield sse_event(body)
            yield b"data: [DONE]\n\n"
            return
        if with_usage:
            usage_chunk = self._chunk(0, None, None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = self.usage().model_dump()
            usage_chunk["disagg"] = self._disagg()
            yield sse_event(usage_chunk)
        yield b"data: [DONE]\n\n"

    def _disagg(self) -> dict[str, Any]:
        return {"pd": self.pd}


def _chat_token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8", "surrogatepass"))}


def _finite(logprob: float) -> float:
    # -inf is not JSON; vLLM's server writes the same floor.
    return max(logprob, -9999.0)


def _finish_reason(reason: str | None) -> str | None:
    # vLLM reports "abort" for cancelled requests; OpenAI clients know stop/length.
    return reason if reason in ("stop", "length") else (reason or "stop")


def sse_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
