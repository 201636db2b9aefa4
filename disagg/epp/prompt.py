"""From an HTTP request (path + body) to what the scheduler picks for (a `PickRequest`).

With the model directory at hand, the EPP tokenizes exactly as the workers do (the shared
`Preprocessor`: chat template, then the model's tokenizer), so prompts meet the token ids of the
workers' KV events. Without it (`RawPromptReader`), token-id prompts are used as they are and
text is read in raw tokens of 16 bytes of its UTF-8 (`raw_tokens`): prefix affinity then rests
on our own routing decisions (approximate mode) only.
"""

from __future__ import annotations

from itertools import repeat
from typing import Protocol

import msgspec
import numpy as np

from disagg.openai.body import parse_json
from disagg.openai.errors import APIError
from disagg.routing import PickRequest

OPENAI_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


def openai_kind(path: str) -> str | None:
    return OPENAI_PATHS.get(path.split("?", 1)[0])


RAW_TOKEN_BYTES = 16
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it is a bijection of 64-bit words


def raw_tokens(text: bytes) -> list[int]:
    """Text as "tokens" without a tokenizer: one 64-bit number per 16 bytes (the run's two
    little-endian words folded; the last run zero-padded), the same in every process. A raw token
    is about four real ones: a block of 32 covers 512 bytes, and `pd_threshold_tokens` reads as
    about four times as much text. A pick's cost follows its blocks (each hashed and looked up):
    read byte by byte, a 220 KB prompt was 6,875 blocks of 32; in 16-byte runs it is 430."""
    whole = len(text) - len(text) % RAW_TOKEN_BYTES
    tokens = _fold(np.frombuffer(text, dtype="<u8", count=whole // 8))
    if whole < len(text):  # the last run, zero-padded
        tokens += _fold(np.frombuffer(text[whole:].ljust(RAW_TOKEN_BYTES, b"\0"), dtype="<u8"))
    return tokens


def _fold(words: np.ndarray) -> list[int]:
    pairs = words.reshape(-1, 2)
    return ((pairs[:, 0] * _MIX) ^ pairs[:, 1]).tolist()


class PromptReader(Protocol):
    """Reads one request; raises `APIError` (400, 404) for a body the workers would refuse."""

    model_name: str

    def read(self, path: str, body: bytes, subset: list[str] | None) -> PickRequest: ...


class TokenizingReader:
    """Tokenizes with the workers' own preprocessing (chat template and tokenizer)."""

    def __init__(self, model_dir: str, model_name: str, max_model_len: int) -> None:
        from disagg.openai.serving import Preprocessor

        self.preprocessor = Preprocessor(model_dir, model_name, max_model_len)
        self.model_name = model_name

    def read(self, path: str, body: bytes, subset: list[str] | None) -> PickRequest:
        kind = openai_kind(path)
        if kind is None or not body:
            return PickRequest(model=self.model_name, prompt_token_ids=[], subset=subset)
        prepared = self.preprocessor.prepare(kind, body)  # type: ignore[arg-type]
        return PickRequest(model=prepared.request.model, prompt_token_ids=prepared.generate.prompt_token_ids,
                           subset=subset)


class RawPromptReader:
    """No tokenizer: checks the body is an OpenAI request and hashes what it can."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def read(self, path: str, body: bytes, subset: list[str] | None) -> PickRequest:
        kind = openai_kind(path)
        if kind is None or not body:
            return PickRequest(model=self.model_name, prompt_token_ids=[], subset=subset)
        data = parse_json(body)  # the edge's rules: UTF-8, bounded nesting, strings that encode
        model = data.get("model")
        if not isinstance(model, str):
            raise APIError(400, "model: field required", param="model")
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        if kind == "chat":
            messages = data.get("messages")
            if not isinstance(messages, list) or not messages:
                raise APIError(400, "messages: field required", param="messages")
            tokens = raw_tokens(msgspec.json.encode(messages, order="sorted"))
        else:
            prompt = data.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, str) and prompt:
                tokens = raw_tokens(prompt.encode())
            elif isinstance(prompt, list) and prompt and all(map(isinstance, prompt, repeat(int))):
                tokens = prompt
            else:
                raise APIError(400, "prompt: a non-empty string or list of token ids is required", param="prompt")
        return PickRequest(model=model, prompt_token_ids=tokens, subset=subset)
