"""Benchmark workloads are seeded, reproducible, and measured in the model's own tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from disagg.bench import workloads
from disagg.bench.driver import RequestResult, RunResult, percentile


@pytest.fixture(scope="module")
def tokenizer(tiny_model: str):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("name", workloads.WORKLOADS)
def test_the_same_seed_gives_the_same_requests(tiny_model: str, name: str) -> None:
    a = workloads.build(name, tiny_model, seed=7)
    b = workloads.build(name, tiny_model, seed=7)
    assert a.requests == b.requests
    assert len(a) > 0


@pytest.mark.parametrize("name", workloads.WORKLOADS)
def test_another_seed_gives_other_requests(tiny_model: str, name: str) -> None:
    assert workloads.build(name, tiny_model, seed=1).requests != workloads.build(name, tiny_model, seed=2).requests


def test_prompt_lengths_are_counted_in_the_models_tokens(tiny_model: str, tokenizer) -> None:
    for request in workloads.build("uniform", tiny_model, seed=3, requests=8).requests:
        assert request.prompt_tokens == len(tokenizer.encode(request.prompt, add_special_tokens=False))


def test_text_is_cut_to_exactly_the_asked_number_of_tokens(tiny_model: str, tokenizer) -> None:
    import random

    tok = workloads.tokens_for(tiny_model)
    for n in (1, 17, 300, 1200):
        text = tok.text(random.Random(n), n)
        assert len(tokenizer.encode(text, add_special_tokens=False)) == n


def test_chat_prompts_are_counted_with_the_chat_template(tiny_model: str, tokenizer) -> None:
    request = workloads.build("shared_prefix", tiny_model, seed=0, conversations=2, turns=2).requests[-1]
    ids = tokenizer.apply_chat_template(list(request.messages), tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert request.prompt_tokens == len(ids)


def test_mixed_has_long_prompts_with_short_answers_and_short_prompts_with_long_answers(tiny_model: str) -> None:
    w = workloads.build("mixed", tiny_model, seed=0, requests=40)
    longs = [r for r in w.requests if r.group == "long_prompt"]
    shorts = [r for r in w.requests if r.group == "short_prompt"]
    assert longs and shorts
    assert min(r.prompt_tokens for r in longs) >= 1024 > max(r.prompt_tokens for r in shorts)
    assert max(r.max_tokens for r in longs) < min(r.max_tokens for r in shorts)


def test_shared_prefix_turns_extend_the_previous_turn_and_share_the_system_prompt(tiny_model: str) -> None:
    w = workloads.build("shared_prefix", tiny_model, seed=0, conversations=3, turns=3)
    assert len(w) == 9
    by_conv: dict[str, list[workloads.BenchRequest]] = {}
    for r in w.requests:
        by_conv.setdefault(r.group, []).append(r)
    systems = {turns[0].messages[0]["content"] for turns in by_conv.values()}
    assert len(systems) == 1
    for turns in by_conv.values():
        for prev, nxt in zip(turns, turns[1:]):
            assert nxt.messages[: len(prev.messages)] == prev.messages
            assert nxt.prompt_tokens > prev.prompt_tokens
            assert nxt.index > prev.index


def test_a_salt_changes_every_prompt_but_not_its_shape(tiny_model: str) -> None:
    a = workloads.build("mixed", tiny_model, seed=0, requests=6, salt="a")
    b = workloads.build("mixed", tiny_model, seed=0, requests=6, salt="b")
    assert all(x.prompt != y.prompt for x, y in zip(a.requests, b.requests))
    assert [x.max_tokens for x in a.requests] == [y.max_tokens for y in b.requests]


def test_poisson_arrivals_are_seeded_and_average_the_rate() -> None:
    times = workloads.poisson(2000, rate=4.0, seed=1)
    assert times == workloads.poisson(2000, rate=4.0, seed=1)
    assert times != workloads.poisson(2000, rate=4.0, seed=2)
    assert times == sorted(times) and times[0] == 0.0
    assert 3.6 < len(times) / times[-1] < 4.4


def test_request_body_streams_greedy_answers_of_max_tokens(tiny_model: str) -> None:
    r = workloads.build("uniform", tiny_model, seed=0, requests=1).requests[0]
    body = r.body("tiny")
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] and body["temperature"] == 0.0 and body["max_tokens"] == r.max_tokens


def test_failed_requests_are_counted_not_dropped() -> None:
    ok = RequestResult(index=0, group="g", prompt_tokens=10, max_tokens=3, ttft_s=0.1, last_token_s=0.3,
                       latency_s=0.3, output_tokens=3, itl_s=[0.1, 0.1])
    bad = RequestResult(index=1, group="g", prompt_tokens=10, max_tokens=3, error="HTTP 500: boom")
    s = RunResult("w", "closed 1", 1.0, [ok, bad]).summary()
    assert s["requests"] == 2 and s["failed"] == 1
    assert s["ttft_p50_ms"] == 100.0 and s["tpot_p50_ms"] == 100.0
    assert s["output_tok_s"] == 3.0


def test_tpot_runs_to_the_end_of_the_stream_not_to_the_last_text() -> None:
    # The last 6 tokens detokenized to nothing: the last text came at 0.3 s, the stream ended at 0.9.
    r = RequestResult(index=0, group="g", prompt_tokens=10, max_tokens=9, ttft_s=0.1, last_token_s=0.3,
                      latency_s=0.9, output_tokens=9)
    assert r.tpot_s == pytest.approx(0.1)


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile([], 50) is None
