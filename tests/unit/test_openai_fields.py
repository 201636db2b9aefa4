"""OpenAI sampling features (issue 15, items 6 and 17) without an engine: what each field becomes
in SamplingOptions, the 400 that names a field out of range or not served, the response shapes
(logprobs, n choices), and where the prompt was prefilled (`x-disagg-pd`, a stream's `disagg`).
The same behaviours run through real engines in tests/integration/edge/test_openai_features.py."""

from __future__ import annotations

import asyncio
import json
import pickle
from typing import Any, AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, Request

from disagg.engine.base import (GenerateOutput, GenerateRequest, PositionLogprobs, RequestRejected, SamplingOptions,
                                StructuredOutput, TokenLogprob)
from disagg.openai.errors import APIError
from disagg.openai.http import install_error_handlers, respond
from disagg.openai.serving import Preprocessor, ResponseBuilder
from disagg.worker.orchestrator import PrefillOutcome, generate_disaggregated

MAX_LEN = 256


@pytest.fixture(scope="module")
def pre(tiny_model):
    return Preprocessor(tiny_model, "tiny", max_model_len=MAX_LEN)


def chat(**kw: Any) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                       **kw}).encode()


def completion(**kw: Any) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 8, **kw}).encode()


def sampling(pre: Preprocessor, kind: str, raw: bytes) -> SamplingOptions:
    return pre.prepare(kind, raw).generate.sampling


# -- what each field becomes -------------------------------------------------------------------------

def test_chat_logprobs_and_top_logprobs_ask_the_engine_for_that_many_alternatives(pre):
    assert sampling(pre, "chat", chat()).logprobs is None
    assert sampling(pre, "chat", chat(logprobs=True)).logprobs == 0
    assert sampling(pre, "chat", chat(logprobs=True, top_logprobs=20)).logprobs == 20
    assert sampling(pre, "chat", chat(logprobs=False, top_logprobs=0)).logprobs is None


def test_completions_logprobs_is_the_number_of_alternatives(pre):
    assert sampling(pre, "completion", completion(logprobs=0)).logprobs == 0
    assert sampling(pre, "completion", completion(logprobs=5)).logprobs == 5


def test_response_format_becomes_a_structured_output(pre):
    schema = {"type": "string", "enum": ["red", "green"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "color", "schema": schema, "strict": True}}
    assert sampling(pre, "chat", chat(response_format=fmt)).structured == StructuredOutput(json_schema=schema)
    assert sampling(pre, "completion", completion(response_format={"type": "json_object"})).structured == \
        StructuredOutput(json_object=True)
    # OpenAI lets a json_schema's schema out: any JSON object then.
    assert sampling(pre, "chat", chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
                    ).structured == StructuredOutput(json_object=True)
    assert sampling(pre, "chat", chat(response_format={"type": "text"})).structured is None


def test_penalties_logit_bias_min_tokens_stop_token_ids_and_n_pass_through(pre):
    s = sampling(pre, "completion", completion(presence_penalty=-2, frequency_penalty=2, repetition_penalty=1.3,
                                               logit_bias={"5": -100, "7": 100, "9": 0.5}, min_tokens=3,
                                               stop_token_ids=[2, 11], n=3, seed=7))
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (-2.0, 2.0, 1.3)
    assert s.logit_bias == {5: -100.0, 7: 100.0, 9: 0.5}
    assert (s.min_tokens, s.stop_token_ids, s.n, s.seed) == (3, [2, 11], 3, 7)


def test_null_for_every_new_field_means_its_default(pre):
    fields = ("logprobs", "top_logprobs", "response_format", "logit_bias", "presence_penalty", "frequency_penalty",
              "repetition_penalty", "min_tokens", "stop_token_ids", "tools", "tool_choice", "functions",
              "function_call")
    s = sampling(pre, "chat", chat(**{f: None for f in fields}))
    assert s == SamplingOptions(max_tokens=8)


def test_tool_choice_none_and_best_of_equal_to_n_are_served(pre):
    assert sampling(pre, "chat", chat(tool_choice="none", tools=[])).n == 1
    assert sampling(pre, "completion", completion(best_of=2, n=2)).n == 2


# -- a 400 naming the field ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,fields,param", [
    ("completion", {"logprobs": -7}, "logprobs"),
    ("completion", {"logprobs": 6}, "logprobs"),
    ("completion", {"logprobs": True}, "logprobs"),
    ("chat", {"logprobs": -7}, "logprobs"),
    ("chat", {"logprobs": 1}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 999}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat", {"top_logprobs": 3}, "top_logprobs"),
    ("chat", {"presence_penalty": 2.01}, "presence_penalty"),
    ("completion", {"presence_penalty": -3}, "presence_penalty"),
    ("chat", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("completion", {"frequency_penalty": "high"}, "frequency_penalty"),
    ("chat", {"repetition_penalty": 0}, "repetition_penalty"),
    ("completion", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completion", {"logit_bias": {"5": -100.5}}, "logit_bias"),
    ("chat", {"logit_bias": {"dog": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"-1": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"99999": 1}}, "logit_bias"),
    ("chat", {"logit_bias": [1, 2]}, "logit_bias"),
    ("completion", {"n": 0}, "n"),
    ("completion", {"n": 17}, "n"),
    ("completion", {"n": 2, "temperature": 0}, "n"),  # vLLM refuses identical greedy choices
    ("completion", {"seed": 2**63 - 1, "n": 2}, "seed"),
    ("completion", {"min_tokens": -1}, "min_tokens"),
    ("completion", {"min_tokens": 9}, "min_tokens"),  # above max_tokens (8)
    ("completion", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ("completion", {"stop_token_ids": [99999]}, "stop_token_ids"),
    ("completion", {"stop_token_ids": ["</s>"]}, "stop_token_ids"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!"}}},
     "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
     "response_format"),
    ("chat", {"response_format": "json"}, "response_format"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"function_call": "auto"}, "function_call"),
    ("completion", {"best_of": 3}, "best_of"),
    ("completion", {"suffix": "the end"}, "suffix"),
    ("completion", {"echo": True, "logprobs": 1}, "echo"),
])
def test_invalid_or_unserved_values_are_a_400_naming_the_field(pre, kind, fields, param):
    with pytest.raises(APIError) as e:
        pre.prepare(kind, chat(**fields) if kind == "chat" else completion(**fields))
    assert e.value.status == 400
    err = e.value.body()["error"]
    assert err["param"] is not None and err["param"].split(".")[0] == param, err
    assert err["type"] == "invalid_request_error" and err["message"]


def test_an_engine_refusal_is_a_400_naming_the_openai_field():
    """vLLM refuses some options only when the request reaches it (a schema its grammar backend
    cannot compile): RequestRejected, which crosses a Ray handle whole, becomes the client's 400."""
    from disagg.openai.serving import rejected

    e = pickle.loads(pickle.dumps(RequestRejected("Grammar error: Invalid type: frobnicate", "structured")))
    assert (e.message, e.param) == ("Grammar error: Invalid type: frobnicate", "structured")

    class P:
        kind = "chat"

    err = rejected(P(), e)  # type: ignore[arg-type]
    assert err.status == 400 and err.param == "response_format" and "frobnicate" in err.message


# -- response shapes ----------------------------------------------------------------------------------

def lp(token_id: int, token: str, logprob: float) -> TokenLogprob:
    return TokenLogprob(token_id, token, logprob)


def position(token_id: int, token: str, logprob: float, *alternatives: tuple[int, str, float]) -> PositionLogprobs:
    return PositionLogprobs(lp(token_id, token, logprob), [lp(*a) for a in alternatives])


def deltas(rid: str, pd: str = "remote") -> list[GenerateOutput]:
    return [
        GenerateOutput(rid, [5], "He", logprobs=[position(5, "He", -0.5, (5, "He", -0.5), (9, "Ho", -1.5))], pd=pd),
        GenerateOutput(rid, [6], "y", finished=True, finish_reason="length",
                       logprobs=[position(6, "y", -float("inf"), (7, "a", -0.1), (6, "y", -float("inf")))], pd=pd),
    ]


def test_chat_logprobs_have_openais_shape(pre):
    p = pre.prepare("chat", chat(logprobs=True, top_logprobs=2))
    b = ResponseBuilder(p, "tiny")
    for out in deltas(p.response_id):
        b.add(out)
    content = b.response()["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": "He", "logprob": -0.5, "bytes": [72, 101],
                          "top_logprobs": [{"token": "He", "logprob": -0.5, "bytes": [72, 101]},
                                           {"token": "Ho", "logprob": -1.5, "bytes": [72, 111]}]}
    assert content[1]["logprob"] == -9999.0  # -inf is not JSON


def test_completion_logprobs_have_openais_legacy_shape(pre):
    p = pre.prepare("completion", completion(logprobs=2))
    b = ResponseBuilder(p, "tiny")
    for out in deltas(p.response_id):
        b.add(out)
    logprobs = b.response()["choices"][0]["logprobs"]
    assert logprobs == {"tokens": ["He", "y"], "token_logprobs": [-0.5, -9999.0],
                        "top_logprobs": [{"He": -0.5, "Ho": -1.5}, {"a": -0.1, "y": -9999.0}],
                        "text_offset": [0, 2]}


def test_no_logprobs_asked_is_null(pre):
    p = pre.prepare("chat", chat())
    b = ResponseBuilder(p, "tiny")
    for out in deltas(p.response_id):
        b.add(out)
    assert b.response()["choices"][0]["logprobs"] is None


def interleaved(rid: str) -> list[GenerateOutput]:
    return [GenerateOutput(rid, [1], "a", index=0, pd="local"), GenerateOutput(rid, [2], "b", index=1, pd="local"),
            GenerateOutput(rid, [3], "c", index=1, finish_reason="stop", pd="local"),
            GenerateOutput(rid, [4], "d", index=0, finished=True, finish_reason="length", pd="local")]


def test_n_choices_are_answered_each_with_its_own_text_and_finish(pre):
    p = pre.prepare("completion", completion(n=2))
    b = ResponseBuilder(p, "tiny")
    for out in interleaved(p.response_id):
        b.add(out)
    r = b.response()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in r["choices"]] == [(0, "ad", "length"),
                                                                                    (1, "bc", "stop")]
    assert r["usage"]["completion_tokens"] == 4


async def aiter_of(items: list[GenerateOutput]) -> AsyncIterator[GenerateOutput]:
    for x in items:
        yield x


async def test_a_stream_of_n_choices_has_a_role_and_a_finish_chunk_per_choice(pre):
    p = pre.prepare("chat", chat(n=2, stream=True))
    events = [e async for e in ResponseBuilder(p, "tiny").sse(aiter_of(interleaved(p.response_id)))]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role")]
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"][0]["finish_reason"]}
    assert roles == [0, 1] and finishes == {0: "length", 1: "stop"}
    text = {i: "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"][0]["index"] == i)
            for i in (0, 1)}
    assert text == {0: "ad", 1: "bc"}


async def test_the_last_chunk_of_a_stream_says_where_the_prompt_was_prefilled(pre):
    p = pre.prepare("chat", chat(stream=True, stream_options={"include_usage": True}))
    events = [e async for e in ResponseBuilder(p, "tiny").sse(aiter_of(deltas(p.response_id, "local_fallback")))]
    last = json.loads(events[-2][6:])
    assert last["usage"]["completion_tokens"] == 2 and last["disagg"] == {"pd": "local_fallback"}

    p = pre.prepare("completion", completion(stream=True))
    events = [e async for e in ResponseBuilder(p, "tiny").sse(aiter_of(deltas(p.response_id, "remote")))]
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["disagg"] == {"pd": "remote"}
    assert all("disagg" not in json.loads(e[6:]) for e in events[:-2])


async def test_stream_chunks_carry_their_tokens_logprobs(pre):
    p = pre.prepare("chat", chat(stream=True, logprobs=True, top_logprobs=1))
    events = [e async for e in ResponseBuilder(p, "tiny").sse(aiter_of(deltas(p.response_id)))]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    content = [c["choices"][0]["logprobs"]["content"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [[t["token"] for t in part] for part in content] == [["He"], ["y"]]


# -- x-disagg-pd through the HTTP layer ----------------------------------------------------------------

def app_answering(pre: Preprocessor, outputs: list[GenerateOutput] | Exception) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/{kind}")
    async def serve(kind: str, request: Request):
        prepared = pre.prepare("chat" if kind == "chat" else "completion", await request.body())

        async def stream() -> AsyncIterator[GenerateOutput]:
            if isinstance(outputs, Exception):
                raise outputs
            for out in outputs:
                out.request_id = prepared.response_id
                yield out

        return await respond(request, prepared, stream(), "tiny", headers={"x-disagg-decode": "d:1"})

    return app


async def post(app: FastAPI, path: str, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.post(path, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("stream", [False, True])
async def test_x_disagg_pd_is_the_outcome_on_json_answers_and_streams(pre, stream):
    for pd in ("remote", "local", "local_fallback"):
        r = await post(app_answering(pre, deltas("r", pd)), "/v1/completions", completion(stream=stream))
        assert r.status_code == 200 and r.headers["x-disagg-pd"] == pd and r.headers["x-disagg-decode"] == "d:1"


@pytest.mark.parametrize("stream", [False, True])
async def test_an_engine_refusal_before_the_first_token_is_a_400_even_when_streaming(pre, stream):
    app = app_answering(pre, RequestRejected("Grammar error: Invalid type: frobnicate", "structured"))
    r = await post(app, "/v1/chat", chat(stream=stream, response_format={"type": "json_object"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


# -- the decode side's orchestration ---------------------------------------------------------------------

PARAMS = {"remote_engine_id": "p1", "remote_block_ids": [1, 2], "remote_host": "h", "remote_port": 1}


class FakePrefills:
    """PrefillClient's interface: every candidate answers (`ok`) or every one fails."""

    def __init__(self, ok: bool):
        self.ok = ok
        self.calls = 0

    async def prefill(self, request: GenerateRequest, candidates: list[str]) -> PrefillOutcome:
        self.calls += 1
        if self.ok:
            return PrefillOutcome(candidates[0], dict(PARAMS), 1, 0.01)
        return PrefillOutcome(None, None, len(candidates), 0.01)


class FakeEngine:
    def __init__(self, delay_s: float = 0.0):
        self.seen: list[GenerateRequest] = []
        self.released: list[dict[str, Any]] = []
        self.delay_s = delay_s

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        self.seen.append(request)
        await asyncio.sleep(self.delay_s)
        n = request.sampling.n
        for i in range(n):
            yield GenerateOutput(request.request_id, [i], str(i), index=i, finish_reason="length",
                                 finished=i == n - 1)

    async def release_remote_kv(self, request_id: str, params: dict[str, Any]) -> None:
        self.released.append(params)


def request(n: int = 1) -> GenerateRequest:
    return GenerateRequest(request_id="r1", prompt_token_ids=list(range(100)), sampling=SamplingOptions(n=n))


async def outcomes(engine: FakeEngine, prefills: FakePrefills, candidates: list[str], n: int = 1) -> list[str]:
    return [o.pd async for o in generate_disaggregated(engine, prefills, request(n), candidates)]  # type: ignore


async def test_every_output_says_remote_when_a_prefill_handed_off_its_kv():
    engine = FakeEngine()
    assert await outcomes(engine, FakePrefills(ok=True), ["p:1"]) == ["remote"]
    assert engine.seen[0].kv_transfer_params["do_remote_prefill"] is True


async def test_local_when_no_prefill_worker_was_named():
    prefills = FakePrefills(ok=True)
    assert await outcomes(FakeEngine(), prefills, []) == ["local"]
    assert prefills.calls == 0


async def test_local_fallback_when_every_prefill_tried_failed():
    engine = FakeEngine()
    assert await outcomes(engine, FakePrefills(ok=False), ["p:1", "p:2"]) == ["local_fallback"]
    assert engine.seen[0].kv_transfer_params is None


async def test_n_choices_pull_the_kv_once_then_decode_from_the_prefix_cache():
    engine = FakeEngine()
    assert await outcomes(engine, FakePrefills(ok=True), ["p:1"], n=3) == ["remote"] * 3
    pull, answer = engine.seen
    assert pull.request_id == "r1-pull" and pull.sampling.n == 1 and pull.sampling.max_tokens == 1
    assert pull.kv_transfer_params["remote_block_ids"] == [1, 2]
    assert answer.sampling.n == 3 and answer.kv_transfer_params is None
    assert engine.released == []


async def test_n_choices_cancelled_during_the_pull_release_the_prefill_blocks():
    engine = FakeEngine(delay_s=10)

    async def consume() -> None:
        await outcomes(engine, FakePrefills(ok=True), ["p:1"], n=2)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [r.request_id for r in engine.seen] == ["r1-pull"] and engine.released[0]["remote_block_ids"] == [1, 2]


def test_return_tokens_as_token_ids_names_each_logprob_token_by_its_id(pre):
    p = pre.prepare("chat", chat(logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True))
    b = ResponseBuilder(p, "tiny")
    for out in deltas(p.response_id):
        b.add(out)
    content = b.response()["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in content] == ["token_id:5", "token_id:6"]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["token_id:5", "token_id:9"]
