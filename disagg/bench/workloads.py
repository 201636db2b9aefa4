"""Benchmark workloads: seeded, reproducible request lists with lengths in the model's own tokens.

Every stack gets byte-identical requests: prompts are built from seeded random words, measured
and cut with the model's tokenizer (chat prompts with its chat template), and the assistant turns
of a conversation's history are generated text too, never the model's answers, so a request does
not depend on what a previous one returned. Answers run to `max_tokens` (`ignore_eos`).

    shared_prefix   multi-turn chat: one long system prompt, several conversations, each turn's
                    prompt is the previous one plus an answer and a new question (the prefix
                    cache case)
    mixed           long prompt / short answer mixed with short prompt / long answer (the
                    interference case P/D exists for)
    uniform         prompt and answer lengths uniform at random

Arrivals: `poisson(n, rate, seed)` gives open-loop send times; a closed loop needs none (the
driver keeps `concurrency` requests in flight). A `salt` changes every prompt's first tokens, so
runs on the same engines do not hit each other's prefix cache.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Literal

WorkloadName = Literal["shared_prefix", "mixed", "uniform"]
WORKLOADS: tuple[WorkloadName, ...] = ("shared_prefix", "mixed", "uniform")

# Words the tiny models' tokenizer was trained on (and common English): prompts tokenize to a
# realistic ~1-3 tokens per word rather than one token per byte.
_WORDS = (
    "the quick brown fox jumps over lazy dog prefill computes prompt decode streams answer key "
    "value blocks move between workers you are a helpful assistant please question about document "
    "below beautiful is better than ugly explicit implicit simple complex flat nested sparse dense "
    "readability counts special cases break rules although practicality beats purity errors should "
    "never pass silently unless explicitly silenced in face of ambiguity refuse temptation to guess "
    "there one and preferably only obvious way do it now often right namespaces are honking great "
    "idea let more those false none true class def return yield import from with while for if else "
    "try except finally raise lambda global pass break continue not or in as assert async await"
).split()


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload. Exactly one of `prompt` (completions) and `messages` (chat)."""

    index: int
    max_tokens: int
    prompt_tokens: int  # measured with the model's tokenizer (and chat template)
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    group: str = ""  # e.g. "long_prompt", "conv3"

    @property
    def kind(self) -> Literal["chat", "completion"]:
        return "chat" if self.messages is not None else "completion"

    def body(self, model: str) -> dict[str, Any]:
        """The OpenAI request body: greedy, streamed with usage, answers run to max_tokens."""
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if self.messages is not None:
            body["messages"] = [dict(m) for m in self.messages]
        else:
            body["prompt"] = self.prompt
        return body


@dataclass(frozen=True)
class Workload:
    name: str
    seed: int
    requests: tuple[BenchRequest, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def summary(self) -> dict[str, Any]:
        prompts = [r.prompt_tokens for r in self.requests]
        outputs = [r.max_tokens for r in self.requests]
        return {
            "name": self.name, "seed": self.seed, "requests": len(self.requests), **self.params,
            "prompt_tokens_total": sum(prompts), "output_tokens_total": sum(outputs),
            "prompt_tokens_min": min(prompts, default=0), "prompt_tokens_max": max(prompts, default=0),
        }


class Tokens:
    """The model's tokenizer: counts and cuts text in its tokens."""

    def __init__(self, model_dir: str):
        from disagg.openai.serving import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)  # as the router and the EPP load it

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def count_chat(self, messages: list[dict[str, str]]) -> int:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)

    def text(self, rng: random.Random, n: int) -> str:
        """Seeded random words cut to exactly `n` tokens (a decoded token prefix re-encodes to
        itself with a byte-level BPE; `count` is the authority where it would not)."""
        if n <= 0:
            return ""
        words: list[str] = []
        ids: list[int] = []
        while len(ids) < n:
            words.extend(rng.choice(_WORDS) for _ in range(max(8, n - len(ids))))
            ids = self.tokenizer.encode(" ".join(words), add_special_tokens=False)
        return self.tokenizer.decode(ids[:n])


@lru_cache(maxsize=4)
def tokens_for(model_dir: str) -> Tokens:
    return Tokens(model_dir)


def _salted(salt: int | str | None, text: str) -> str:
    return f"[{salt}] {text}" if salt not in (None, "") else text


def shared_prefix(model_dir: str, *, seed: int = 0, conversations: int = 8, turns: int = 4,
                  system_tokens: int = 512, user_tokens: int = 64, answer_tokens: int = 48,
                  salt: int | str | None = None) -> Workload:
    """Multi-turn chat: all conversations share one system prompt; turn k's prompt is turn k-1's
    plus a (generated) answer and a new question. Requests are ordered turn by turn, round robin
    over conversations, so a conversation's next turn comes after its previous one."""
    tok = tokens_for(model_dir)
    rng = random.Random(seed)
    system = _salted(salt, tok.text(rng, system_tokens))
    histories: list[list[dict[str, str]]] = [[{"role": "system", "content": system}] for _ in range(conversations)]
    requests: list[BenchRequest] = []
    for turn in range(turns):
        for c in range(conversations):
            history = histories[c]
            history.append({"role": "user", "content": tok.text(rng, user_tokens)})
            messages = tuple(dict(m) for m in history)
            requests.append(BenchRequest(index=len(requests), max_tokens=answer_tokens,
                                         prompt_tokens=tok.count_chat(list(messages)), messages=messages,
                                         group=f"conv{c}"))
            history.append({"role": "assistant", "content": tok.text(rng, answer_tokens)})
    params = dict(conversations=conversations, turns=turns, system_tokens=system_tokens,
                  user_tokens=user_tokens, answer_tokens=answer_tokens)
    return Workload("shared_prefix", seed, tuple(requests), params)


def mixed(model_dir: str, *, seed: int = 0, requests: int = 32, long_fraction: float = 0.5,
          long_prompt: tuple[int, int] = (1024, 1536), long_answer: tuple[int, int] = (4, 8),
          short_prompt: tuple[int, int] = (32, 64), short_answer: tuple[int, int] = (96, 128),
          salt: int | str | None = None) -> Workload:
    """Long prompts with short answers mixed with short prompts with long answers."""
    tok = tokens_for(model_dir)
    rng = random.Random(seed)
    out: list[BenchRequest] = []
    for i in range(requests):
        is_long = rng.random() < long_fraction
        p_lo, p_hi = long_prompt if is_long else short_prompt
        a_lo, a_hi = long_answer if is_long else short_answer
        prompt = _salted(salt, tok.text(rng, rng.randint(p_lo, p_hi)))
        out.append(BenchRequest(index=i, max_tokens=rng.randint(a_lo, a_hi), prompt_tokens=tok.count(prompt),
                                prompt=prompt, group="long_prompt" if is_long else "short_prompt"))
    params = dict(long_fraction=long_fraction, long_prompt=list(long_prompt), long_answer=list(long_answer),
                  short_prompt=list(short_prompt), short_answer=list(short_answer))
    return Workload("mixed", seed, tuple(out), params)


def uniform(model_dir: str, *, seed: int = 0, requests: int = 32, prompt: tuple[int, int] = (64, 1024),
            answer: tuple[int, int] = (16, 128), salt: int | str | None = None) -> Workload:
    """Prompt and answer lengths uniform at random."""
    tok = tokens_for(model_dir)
    rng = random.Random(seed)
    out = []
    for i in range(requests):
        text = _salted(salt, tok.text(rng, rng.randint(*prompt)))
        out.append(BenchRequest(index=i, max_tokens=rng.randint(*answer), prompt_tokens=tok.count(text),
                                prompt=text, group="uniform"))
    return Workload("uniform", seed, tuple(out), dict(prompt=list(prompt), answer=list(answer)))


BUILDERS: dict[str, Callable[..., Workload]] = {"shared_prefix": shared_prefix, "mixed": mixed, "uniform": uniform}


def build(name: str, model_dir: str, **kwargs: Any) -> Workload:
    if name not in BUILDERS:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[name](model_dir, **kwargs)


def poisson(n: int, rate: float, seed: int = 0) -> list[float]:
    """Open-loop send times (seconds from the start) of `n` requests arriving at `rate` per second."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    rng = random.Random(f"poisson-{seed}-{rate}")
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times
