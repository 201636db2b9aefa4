"""What a simulation replays: requests with arrival times, prompt token ids and answer lengths.

    workload(name, ...)  our benchmark workloads (`disagg.bench.workloads`). With the model
                         directory, the very prompts `disagg bench serve` sends, tokenized as our
                         router tokenizes them (`disagg.openai.serving.Preprocessor`); without
                         it, prompts with the workload's lengths and prefix structure and token
                         ids derived from their position (no tokenizer; chat templates counted
                         as 4 tokens a message), generated lazily, so a long run stays small.
    mooncake(path)       a Mooncake-format JSONL trace: `timestamp` (ms), `input_length`,
                         `output_length`, `hash_ids` (one id per 512-token block; equal ids are
                         equal blocks, so a block's tokens derive from its id).

Arrivals: Poisson at `rate` with `disagg.bench.workloads.poisson`, so a seed gives the same send
times as `disagg bench serve --rate`; a trace keeps its own timestamps (scaled to `rate` if given).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from disagg.bench.workloads import poisson
from disagg.routing.prefix_index import block_hashes

MOONCAKE_BLOCK = 512
TEMPLATE_TOKENS = 4  # per chat message, in synthetic prompts


@dataclass(eq=False, slots=True)
class SimRequest:
    index: int
    arrival_s: float
    tokens: list[int]
    output_tokens: int
    group: str = ""
    _hashes: list[int] | None = field(default=None, repr=False)

    def hashes(self, block_size: int) -> list[int]:
        """The prompt's full-block hashes (the prefix index's own chained hash), computed once."""
        if self._hashes is None:
            self._hashes = block_hashes(self.tokens, block_size)
        return self._hashes


class _Ids:
    """Token ids no other prompt part uses: a prompt part is a run of fresh ids."""

    def __init__(self, start: int = 1 << 20) -> None:
        self._next = itertools.count(start, 1 << 16)

    def fresh(self, n: int) -> list[int]:
        start = next(self._next)
        assert n < 1 << 16
        return list(range(start, start + n))


def workload(name: str, *, requests: int, rate: float, seed: int = 0, model_dir: str | None = None,
             **params: Any) -> Iterator[SimRequest]:
    """`requests` requests of workload `name` arriving at `rate` per second. `params` are the
    workload builder's (e.g. long_fraction=0.8, prompt=(64, 512)); shared_prefix takes
    `conversations` and `turns` (default: 8 conversations, turns to make up `requests`)."""
    if name == "shared_prefix":
        params.setdefault("turns", 4)
        params.setdefault("conversations", -(-requests // params["turns"]))
    else:
        params["requests"] = requests
    times = poisson(requests, rate, seed)
    source = _tokenized(name, model_dir, seed, params) if model_dir else _synthetic(name, seed, params)
    for i, (arrival, (tokens, answer, group)) in enumerate(zip(times, source)):
        yield SimRequest(i, arrival, tokens, answer, group)


def _tokenized(name: str, model_dir: str, seed: int, params: dict[str, Any]) -> Iterator[tuple[list[int], int, str]]:
    from disagg.bench.workloads import build
    from disagg.openai.serving import Preprocessor

    built = build(name, model_dir, seed=seed, **params)
    model = Path(model_dir).name
    router = Preprocessor(model_dir, model, max_model_len=1 << 20)
    for r in built.requests:
        prepared = router.prepare(r.kind, json.dumps(r.body(model)).encode())
        yield prepared.generate.prompt_token_ids, r.max_tokens, r.group


def _synthetic(name: str, seed: int, params: dict[str, Any]) -> Iterator[tuple[list[int], int, str]]:
    rng = random.Random(seed)
    ids = _Ids()
    if name == "mixed":
        p = {"long_fraction": 0.5, "long_prompt": (1024, 1536), "long_answer": (4, 8), "short_prompt": (32, 64),
             "short_answer": (96, 128), **params}
        for _ in range(p["requests"]):
            long = rng.random() < p["long_fraction"]
            prompt, answer = (p["long_prompt"], p["long_answer"]) if long else (p["short_prompt"], p["short_answer"])
            yield ids.fresh(rng.randint(*prompt)), rng.randint(*answer), "long_prompt" if long else "short_prompt"
    elif name == "uniform":
        p = {"prompt": (64, 1024), "answer": (16, 128), **params}
        for _ in range(p["requests"]):
            yield ids.fresh(rng.randint(*p["prompt"])), rng.randint(*p["answer"]), "uniform"
    elif name == "shared_prefix":
        p = {"system_tokens": 512, "user_tokens": 64, "answer_tokens": 48, **params}
        system = ids.fresh(p["system_tokens"] + TEMPLATE_TOKENS)
        histories = [list(system) for _ in range(p["conversations"])]
        for _ in range(p["turns"]):
            for c, history in enumerate(histories):
                history += ids.fresh(p["user_tokens"] + TEMPLATE_TOKENS)
                yield history + ids.fresh(TEMPLATE_TOKENS // 2), p["answer_tokens"], f"conv{c}"
                history += ids.fresh(p["answer_tokens"] + TEMPLATE_TOKENS)
    else:
        raise ValueError(f"unknown workload {name!r}; choose mixed, uniform or shared_prefix")


def mooncake(path: str | Path, *, rate: float | None = None, limit: int | None = None) -> Iterator[SimRequest]:
    """A Mooncake-format trace. Block `h`'s tokens are the same wherever `h` appears; tokens past
    the last hash id (and the unused part of a partial last block) are the request's own."""
    records = []
    with open(path) as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
                if limit is not None and len(records) >= limit:
                    break
    if not records:
        return
    start = records[0]["timestamp"] / 1000
    span = records[-1]["timestamp"] / 1000 - start
    scale = (len(records) - 1) / (rate * span) if rate and span > 0 else 1.0
    own = _Ids(start=1 << 40)
    for i, r in enumerate(records):
        n = int(r["input_length"])
        tokens: list[int] = []
        for h in r.get("hash_ids", []):
            if len(tokens) >= n:
                break
            base = (int(h) + 1) * MOONCAKE_BLOCK
            tokens += range(base, base + min(MOONCAKE_BLOCK, n - len(tokens)))
        while len(tokens) < n:
            tokens += own.fresh(min(n - len(tokens), MOONCAKE_BLOCK))
        yield SimRequest(i, (r["timestamp"] / 1000 - start) * scale, tokens, max(int(r["output_length"]), 1), "trace")
