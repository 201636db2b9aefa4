"""Hostile input at the edge (issue 15): every bad request is a 4xx with OpenAI's error body,
never a 500, on the shared parsing (Preprocessor), the shared HTTP layer (error handlers, body
reading, SSE) and a worker's own endpoint (with a stand-in engine); and bad command lines are
one line and exit status 2. The same requests against the real stack: tests/integration/."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any, AsyncIterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from disagg.config import AppConfig
from disagg.engine.base import EngineStats, GenerateOutput, GenerateRequest
from disagg.openai.body import MAX_DEPTH, check_json_content_type, nesting_depth, parse_json
from disagg.openai.errors import APIError
from disagg.openai.http import OpenAIHTTPProtocol, install_error_handlers, read_json_body
from disagg.openai.serving import Preprocessor, ResponseBuilder
from disagg.worker.server import build_worker_app
from disagg.worker.worker import Worker
from kv_transfer.layout import KVLayout

MAX_LEN = 256
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def pre(tiny_model):
    return Preprocessor(tiny_model, "tiny", max_model_len=MAX_LEN)


def raw(**kw: Any) -> bytes:
    return json.dumps({"model": "tiny", **kw}).encode()


def refused(pre: Preprocessor, body: bytes, kind: str = "completion") -> APIError:
    with pytest.raises(APIError) as e:
        pre.prepare(kind, body)  # type: ignore[arg-type]
    assert 400 <= e.value.status < 500
    assert set(e.value.body()["error"]) == ERROR_KEYS
    return e.value


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and isinstance(err["message"], str) and err["message"]
    assert err["type"] and err["code"]
    if param is not None:
        assert err["param"] == param
    return err


# -- 1. nesting -----------------------------------------------------------------------------------

def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_nested_2000_levels_in_an_unknown_field_is_a_400(pre):
    body = ('{"model":"tiny","prompt":"x","max_tokens":2,"meta":' + nested(2000) + "}").encode()
    e = refused(pre, body)
    assert e.status == 400 and "nested deeper than 64" in e.message


def test_nesting_is_capped_at_64_levels_and_brackets_in_strings_do_not_count(pre):
    assert nesting_depth(b'{"a":' + nested(MAX_DEPTH - 1).encode() + b"}") == MAX_DEPTH
    parse_json(b'{"a":' + nested(MAX_DEPTH - 1).encode() + b"}")
    with pytest.raises(APIError):
        parse_json(b'{"a":' + nested(MAX_DEPTH).encode() + b"}")
    deep_text = json.dumps({"model": "tiny", "prompt": "[{" * 5000 + '\\"]'})
    assert nesting_depth(deep_text.encode()) == 1
    pre.prepare("completion", raw(prompt="[[[[" * 40, max_tokens=1))


def test_unclosed_nesting_is_a_400_not_a_recursion_error():
    with pytest.raises(APIError, match="nested deeper"):
        parse_json(b"[" * 100_000)


# -- 2. lone surrogates ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,body,param", [
    ("completion", b'{"model":"tiny","prompt":"x\\ud800"}', "prompt"),
    ("completion", b'{"model":"tiny\\udfff","prompt":"x"}', "model"),
    ("completion", b'{"model":"tiny","prompt":"x","stop":["a","\\ud800b"]}', "stop.1"),
    ("completion", b'{"model":"tiny","prompt":"x","user":{"tags":["\\uDBFF"]}}', "user.tags.0"),
    ("completion", b'{"model":"tiny","prompt":["ok\\ude00"]}', "prompt.0"),
    ("chat", b'{"model":"tiny","messages":[{"role":"user","content":"hi \\ud83d"}]}', "messages.0.content"),
    ("chat", b'{"model":"tiny","messages":[{"role":"user","content":[{"type":"text","text":"\\udc00"}]}]}',
     "messages.0.content.0.text"),
])
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(pre, kind, body, param):
    e = refused(pre, body, kind)
    assert e.status == 400 and e.param == param
    assert "surrogate" in e.message
    e.message.encode("utf-8")  # the message itself encodes (it is logged and sent)


def test_a_surrogate_in_a_key_is_named_too(pre):
    e = refused(pre, b'{"model":"tiny","prompt":"x","\\ud800":1}')
    assert "surrogate" in e.message and e.param is not None
    e.message.encode("utf-8")
    e.param.encode("utf-8")


def test_a_surrogate_pair_is_a_character_and_is_served(pre):
    p = pre.prepare("completion", b'{"model":"tiny","prompt":"smile \\ud83d\\ude00","max_tokens":2}')
    assert p.generate.prompt_token_ids


def test_utf8_encoded_surrogates_and_other_bad_bytes_are_a_400(pre):
    assert "UTF-8" in refused(pre, b'{"model":"tiny","prompt":"\xed\xa0\x80"}').message
    assert "UTF-8" in refused(pre, b'{"model":"tiny","prompt":"\xff"}').message


# -- 3. numbers at the edge -----------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("seed", 2**63), ("seed", 10**30), ("seed", -(2**63) - 1), ("seed", 1.5), ("seed", "x"),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 10**30), ("max_completion_tokens", 0),
    ("temperature", -0.1), ("temperature", 2.01), ("temperature", 1e308), ("top_p", 0), ("top_p", 1.0001),
    ("n", 0), ("n", 17), ("n", 2**64), ("stream", "maybe"), ("echo", [1]), ("stop", ["a"] * 5), ("stop", [""]),
    ("stop", 7), ("stream_options", {"include_usage": "sometimes"}), ("ignore_eos", {}),
])
def test_numeric_and_typed_fields_out_of_range_are_a_400_naming_the_field(pre, field, value):
    e = refused(pre, raw(prompt="x", **{field: value}))
    assert e.status == 400
    assert e.param is not None and e.param.split(".")[0] == field


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1" + "0" * 5000])
def test_non_finite_and_endless_numbers_are_a_400(pre, text):
    e = refused(pre, b'{"model":"tiny","prompt":"x","temperature":' + text.encode() + b"}")
    assert "not valid JSON" in e.message


def test_int64_seed_limits_are_served(pre):
    for seed in (2**63 - 1, -(2**63), 0):
        assert pre.prepare("completion", raw(prompt="x", max_tokens=1, seed=seed)).generate.sampling.seed == seed


# -- 4. null means default ------------------------------------------------------------------------

def test_null_for_every_optional_field_means_its_default(pre):
    nulls = {f: None for f in ("n", "stream", "stream_options", "temperature", "top_p", "max_tokens",
                               "max_completion_tokens", "seed", "stop", "echo", "ignore_eos", "user")}
    p = pre.prepare("completion", raw(prompt="hello", **nulls))
    s = p.generate.sampling
    assert (s.temperature, s.top_p, s.seed, s.stop, s.ignore_eos) == (1.0, 1.0, None, [], False)
    assert s.max_tokens == MAX_LEN - len(p.generate.prompt_token_ids)
    assert p.request.stream is False and p.request.n == 1 and p.request.echo is False


def test_null_inside_stream_options_and_messages_means_default(pre):
    p = pre.prepare("chat", raw(messages=[{"role": "user", "content": None, "name": None}], stream=True,
                                stream_options={"include_usage": None}, max_tokens=2))
    assert p.request.stream_options is not None and p.request.stream_options.include_usage is False


@pytest.mark.parametrize("body,param", [
    (b'{"model":null,"prompt":"x"}', "model"),
    (b'{"model":"tiny","prompt":null}', "prompt"),
    (b'{"model":"tiny","messages":null}', "messages"),
    (b'{"model":"tiny","messages":[{"role":null,"content":"x"}]}', "messages.0.role"),
])
def test_null_for_a_required_field_is_a_400_naming_it(pre, body, param):
    kind = "chat" if b"messages" in body else "completion"
    assert refused(pre, body, kind).param == param


# -- 7. token ids and the context -----------------------------------------------------------------

@pytest.mark.parametrize("ids", [[-1], [512], [10**12], [1, 2, 2**70], [True, -5]])
def test_token_ids_outside_the_vocabulary_are_a_400(pre, ids):
    e = refused(pre, raw(prompt=ids, max_tokens=1))
    assert e.param == "prompt" and "[0, 512)" in e.message


def test_more_token_ids_than_the_context_is_a_400(pre):
    e = refused(pre, raw(prompt=[1] * MAX_LEN))
    assert e.code == "context_length_exceeded"
    with pytest.raises(APIError) as e2:
        pre.check_token_ids([1] * MAX_LEN, "prompt_token_ids")
    assert e2.value.param == "prompt_token_ids"
    pre.check_token_ids([1] * (MAX_LEN - 1), "prompt_token_ids")


def test_a_chat_template_that_refuses_the_messages_is_a_400(pre, monkeypatch):
    def refuse(*a: Any, **kw: Any) -> str:
        raise ValueError("Conversation roles must alternate user/assistant")

    monkeypatch.setattr(pre.tokenizer, "apply_chat_template", refuse)
    e = refused(pre, raw(messages=[{"role": "assistant", "content": "x"}]), "chat")
    assert e.param == "messages" and "alternate" in e.message


# -- 10. size and time ----------------------------------------------------------------------------

def test_a_megabyte_prompt_is_refused_from_its_length_without_tokenizing(pre, monkeypatch):
    calls = []
    monkeypatch.setattr(pre.tokenizer, "encode", lambda *a, **kw: calls.append(1) or [1])
    e = refused(pre, raw(prompt="dog " * 250_000))
    assert e.code == "context_length_exceeded" and "at least" in e.message and calls == []
    e = refused(pre, raw(messages=[{"role": "user", "content": "dog " * 250_000}]), "chat")
    assert e.code == "context_length_exceeded" and calls == []


def test_max_tokens_beyond_the_context_is_refused_before_tokenizing(pre, monkeypatch):
    monkeypatch.setattr(pre.tokenizer, "encode", lambda *a, **kw: pytest.fail("tokenized"))
    assert refused(pre, raw(prompt="x", max_tokens=MAX_LEN)).param == "max_tokens"


def test_a_prompt_just_over_the_limit_is_counted_exactly(pre):
    e = refused(pre, raw(prompt="word " * 300))
    n = len(pre.tokenizer.encode("word " * 300, add_special_tokens=False))
    assert f"However, your prompt has {n} tokens" in e.message


async def test_tokenizing_a_megabyte_leaves_the_event_loop_free(tiny_model):
    big = Preprocessor(tiny_model, "tiny", max_model_len=10**7)
    body = raw(prompt="hello world dog item42 " * 45_000, max_tokens=1)
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    start = time.perf_counter()
    prepared = await big.prepare_async("completion", body)
    took = time.perf_counter() - start
    tick.cancel()
    assert len(prepared.generate.prompt_token_ids) > 400_000
    # The loop kept ticking while the tokenizer worked (on the loop it would stall for `took`).
    assert took > 0.2 and max(gaps) < took / 2, (took, max(gaps))


# -- 3. errors after the stream started -----------------------------------------------------------

async def _events(pre: Preprocessor, failure: BaseException) -> list[bytes]:
    p = pre.prepare("chat", raw(messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True))

    async def outputs() -> AsyncIterator[GenerateOutput]:
        yield GenerateOutput(p.response_id, [1], "a")
        raise failure

    return [e async for e in ResponseBuilder(p, "tiny").sse(outputs())]


async def test_an_unexpected_error_mid_stream_ends_it_with_an_error_event_and_done(pre):
    events = await _events(pre, RuntimeError("engine core died"))
    assert events[-1] == b"data: [DONE]\n\n"
    err = json.loads(events[-2][6:])["error"]
    assert set(err) == ERROR_KEYS and err["code"] == "500" and "RuntimeError" in err["message"]


async def test_an_api_error_mid_stream_keeps_its_status_in_the_event(pre):
    events = await _events(pre, APIError(503, "decode worker died"))
    assert json.loads(events[-2][6:])["error"]["code"] == "503"
    assert events[-1] == b"data: [DONE]\n\n"


# -- 5 and 8. the HTTP layer both servers share ---------------------------------------------------

@pytest.fixture(scope="module")
def shared_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/v1/models")
    async def models() -> dict[str, str]:
        return {"object": "list"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, int]:
        body = await read_json_body(request, max_bytes=2048)
        return {"bytes": len(body)}

    @app.post("/echo-model")
    async def echo(request: Request) -> dict[str, int]:
        raise APIError(404, "The model `x\ud800` does not exist.", param="model")

    return app


@pytest.fixture
async def client(shared_app) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(shared_app), base_url="http://t") as c:
        yield c


async def test_unknown_path_and_wrong_method_use_openai_bodies(client):
    err = assert_openai_error(await client.get("/v2/nothing"), 404)
    assert err["message"] == "Invalid URL (GET /v2/nothing)"
    r = await client.post("/v1/models", content=b"{}", headers={"content-type": "application/json"})
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "GET"
    assert_openai_error(await client.delete("/v1/completions"), 405)
    assert_openai_error(await client.options("/v1/completions"), 405)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx",
                                          "application/json; charset=latin-1", "text/json"])
async def test_a_post_that_is_not_json_is_a_415(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = await client.post("/v1/completions", content=b'{"model":"tiny"}', headers=headers)
    assert_openai_error(r, 415)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON;charset=\"UTF-8\"", "application/json ; foo=bar"])
async def test_json_media_types_are_served(client, content_type):
    r = await client.post("/v1/completions", content=b"{}", headers={"content-type": content_type})
    assert r.status_code == 200, r.text


async def test_a_body_over_the_limit_is_a_413_by_length_or_as_it_streams(client):
    headers = {"content-type": "application/json"}
    assert_openai_error(await client.post("/v1/completions", content=b"x" * 2049, headers=headers), 413)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 512

    r = await client.post("/v1/completions", content=chunks(), headers=headers)  # chunked: no length
    assert_openai_error(r, 413)
    assert (await client.post("/v1/completions", content=b"x" * 2048, headers=headers)).status_code == 200


async def test_an_error_quoting_a_surrogate_still_encodes(client):
    r = await client.post("/echo-model")
    assert_openai_error(r, 404, "model")


def test_content_type_check_is_case_and_parameter_tolerant():
    check_json_content_type("application/json;charset=utf8")
    with pytest.raises(APIError) as e:
        check_json_content_type("text/plain")
    assert e.value.status == 415 and e.value.code == "unsupported_media_type"


@pytest.fixture(scope="module")
def uvicorn_port() -> AsyncIterator[int]:
    """A real uvicorn serving the shared handlers with `http=OpenAIHTTPProtocol` (its default ws)."""
    app = FastAPI()
    install_error_handlers(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=OpenAIHTTPProtocol, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def raw_exchange(port: int, data: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := c.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("garbage", [b"\x00\x01\x02 NOT HTTP\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                                     b"GET /\x7f HTTP/1.1\r\n\r\n"])
def test_malformed_http_gets_an_openai_body_from_the_protocol_class(uvicorn_port, garbage):
    head, body = raw_exchange(uvicorn_port, garbage)
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head, head
    assert set(json.loads(body)["error"]) == ERROR_KEYS


def test_a_websocket_handshake_is_refused_in_an_openai_body(uvicorn_port):
    head, body = raw_exchange(uvicorn_port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                            b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404"), head
    assert json.loads(body)["error"]["message"] == "Invalid URL (WebSocket /v1/models)"


# -- a worker's own endpoint, with a stand-in engine ----------------------------------------------

class StandInEngine:
    """Just enough of `Engine` for the worker's HTTP endpoint; `fail_after` raises mid-stream."""

    engine_id = "engine-standin"
    layout = KVLayout(model="tiny", dtype="float32", block_size=32, num_layers=2, num_kv_heads=2, head_dim=16)
    num_blocks = 10

    def __init__(self) -> None:
        self.fail_after: int | None = None
        self.seen: list[GenerateRequest] = []

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        self.seen.append(request)
        n = request.sampling.max_tokens
        for i in range(n):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("EngineDeadError")
            done = i == n - 1
            yield GenerateOutput(request.request_id, [i % 7], "t", finished=done,
                                 finish_reason="length" if done else None,
                                 num_prompt_tokens=len(request.prompt_token_ids),
                                 kv_transfer_params={"remote_block_ids": [1]} if done else None)

    async def release_remote_kv(self, request_id: str, params: dict[str, Any]) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(num_blocks=self.num_blocks)

    async def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def workers(tiny_model, pre) -> dict[str, tuple[FastAPI, StandInEngine]]:
    config = AppConfig(model=tiny_model, block_size=32, max_model_len=MAX_LEN, max_request_bytes=64 * 1024)
    out = {}
    for role in ("prefill", "decode"):
        engine = StandInEngine()
        worker = Worker(config, role, engine, "127.0.0.1:1")  # type: ignore[arg-type]
        out[role] = (build_worker_app(worker, pre), engine)
    return out


@pytest.fixture
async def prefill(workers) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(workers["prefill"][0], raise_app_exceptions=False), base_url="http://w") as c:
        yield c


@pytest.fixture
async def decode(workers) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(workers["decode"][0], raise_app_exceptions=False), base_url="http://w") as c:
        yield c


@pytest.mark.parametrize("ids", [[-1], [512], [10**12], [0] * MAX_LEN, []])
async def test_internal_prefill_with_invalid_token_ids_is_a_400(prefill, workers, ids):
    engine = workers["prefill"][1]
    before = len(engine.seen)
    r = await prefill.post("/internal/prefill", json={"request_id": "r", "prompt_token_ids": ids})
    assert_openai_error(r, 400)
    assert len(engine.seen) == before  # refused before the engine saw it


async def test_internal_prefill_refuses_hostile_json_and_other_media_types(prefill):
    body = b'{"request_id":"r","prompt_token_ids":[1],"kv_transfer_params":' + nested(500).encode() + b"}"
    headers = {"content-type": "application/json"}
    assert_openai_error(await prefill.post("/internal/prefill", content=body, headers=headers), 400)
    body = b'{"request_id":"r\\ud800","prompt_token_ids":[1]}'
    assert_openai_error(await prefill.post("/internal/prefill", content=body, headers=headers), 400, "request_id")
    r = await prefill.post("/internal/prefill", content=b'{"request_id":"r","prompt_token_ids":[1]}',
                           headers={"content-type": "text/plain"})
    assert_openai_error(r, 415)
    r = await prefill.post("/internal/prefill", json={"request_id": "r", "prompt_token_ids": [1, 2]})
    assert r.status_code == 200, r.text


async def test_worker_endpoint_answers_bad_input_with_openai_bodies(decode):
    assert_openai_error(await decode.get("/nope"), 404)
    assert_openai_error(await decode.put("/v1/completions"), 405)
    assert_openai_error(await decode.post("/v1/completions", content=b'{"model":"tiny","prompt":"x"}'), 415)
    assert_openai_error(await decode.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 70_000}), 413)
    assert_openai_error(await decode.post("/v1/completions", json={"model": "tiny", "prompt": "x", "seed": 2**64}),
                        400, "seed")
    body = b'{"model":"tiny","prompt":"x","meta":' + nested(2000).encode() + b"}"
    r = await decode.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    r = await decode.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, "n": None,
                                                   "stream": None, "temperature": None})
    assert r.status_code == 200, r.text


async def test_worker_stream_that_fails_mid_way_ends_with_an_error_event_and_done(decode, workers):
    workers["decode"][1].fail_after = 2
    try:
        r = await decode.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 5,
                                                       "stream": True})
    finally:
        workers["decode"][1].fail_after = None
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert set(json.loads(events[-2])["error"]) == ERROR_KEYS
    assert len(events) == 4  # two deltas, the error, [DONE]


async def test_worker_non_stream_failure_is_an_openai_500(decode, workers):
    workers["decode"][1].fail_after = 1
    try:
        r = await decode.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
    finally:
        workers["decode"][1].fail_after = None
    assert_openai_error(r, 500)


# -- 9. command lines -----------------------------------------------------------------------------

def one_line_exit_2(capsys, main, argv: list[str]) -> str:
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv,says", [
    ([], "--model: is required"),
    (["--model", "/nonexistent"], "model directory"),
    (["--model", "M", "--port", "99999"], "--port"),
    (["--model", "M", "--port", "x"], "--port"),
    (["--model", "M", "--prefill-replicas", "-1"], "--prefill-replicas"),
    (["--model", "M", "--decode-replicas", "0"], "decode replica"),
    (["--model", "M", "--kv-connector", "magic"], "--kv-connector"),
    (["--model", "M", "--pd-threshold", "-3"], "--pd-threshold"),
    (["--model", "M", "--set", "block_size=40"], "block_size"),
    (["--model", "M", "--set", "blok_size=32"], "blok_size: is not a setting"),
    (["--model", "M", "--set", "block_size"], "KEY=VALUE"),
    (["--model", "M", "--set", "port=["], "--set port"),
    (["--model", "M", "--set", "decode.cpu_bind=[x1]"], "decode.cpu_bind"),
    (["--model", "M", "--set", "host=not a host"], "host"),
    (["--model", "M", "--config", "/nonexistent.yaml"], "--config /nonexistent.yaml"),
    (["--model", "M", "--bogus"], "--bogus"),
])
def test_disagg_serve_bad_flags_and_config_are_one_line_and_exit_2(capsys, tiny_model, argv, says):
    from disagg.serve import main

    err = one_line_exit_2(capsys, main, [tiny_model if a == "M" else a for a in argv])
    assert err.startswith("disagg serve: error: ") and says in err


@pytest.mark.parametrize("argv,says", [
    ([], "--role"),
    (["--role", "both"], "--role"),
    (["--role", "decode"], "--model: is required"),
    (["--role", "decode", "--model", "M", "--port", "65536"], "--port"),
    (["--role", "decode", "--model", "M", "--cpu-bind", "0-x"], "--cpu-bind"),
    (["--role", "decode", "--model", "M", "--cpu-bind", "3-1"], "--cpu-bind"),
    (["--role", "decode", "--model", "M", "--prefill-endpoints", "nohost"], "--prefill-endpoints"),
    (["--role", "decode", "--model", "M", "--set", "max_model_len=8"], "max_model_len"),
    (["--role", "decode", "--model", "M", "--host", "-bad-"], "--host"),
])
def test_disagg_worker_bad_flags_and_config_are_one_line_and_exit_2(capsys, tiny_model, argv, says):
    from disagg.worker.__main__ import main

    err = one_line_exit_2(capsys, main, [tiny_model if a == "M" else a for a in argv])
    assert err.startswith("disagg worker: error: ") and says in err


@pytest.mark.parametrize("argv,says", [
    ([], "--endpoints"),
    (["--endpoints", "a"], "--endpoints"),
    (["--endpoints", "a:1", "--grpc-port", "-1"], "--grpc-port"),
    (["--endpoints", "a:1", "--discovery-interval", "0"], "--discovery-interval"),
    (["--endpoints", "a:1", "--log-level", "chatty"], "--log-level"),
    (["--endpoints", "a:1", "--model", "m", "--set", "routing.pd_threshold_tokens=-1"], "routing.pd_threshold_tokens"),
    (["--endpoints", "a:1", "--config", "/nonexistent.yaml"], "--config"),
])
def test_disagg_epp_bad_flags_and_config_are_one_line_and_exit_2(capsys, argv, says):
    from disagg.epp.cli import main

    err = one_line_exit_2(capsys, main, argv)
    assert err.startswith("disagg epp: error: ") and says in err
