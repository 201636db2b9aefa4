"""The GIE endpoint-picker protocol, driven directly over gRPC with ext_proc messages: every test
over TLS (the default, a grpcio client trusting the self-signed certificate the EPP made) and
over plaintext (`secure_serving=False`)."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest
import pytest_asyncio
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.config import FlowControlConfig, RoutingConfig
from disagg.epp.picker import EndpointPicker
from disagg.epp.prompt import RawPromptReader
from disagg.epp.server import start_epp
from disagg.routing import Scheduler
from disagg.bench.standin import make_info
from disagg.messages import EngineLoad

BS = 32
DEST = "x-gateway-destination-endpoint"
PREFILLER = "x-prefiller-host-port"
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED


@pytest_asyncio.fixture(loop_scope="function", params=["tls", "plaintext"])
async def epp(request):
    # No scraper runs here: keep hand-made endpoints alive however slow the machine is.
    routing = RoutingConfig(pd_threshold_tokens=256, max_waiting_per_worker=8, stale_after_s=60, dead_after_s=120)
    scheduler = Scheduler(routing, model="tiny", block_size=BS)
    running = await start_epp(EndpointPicker(scheduler, RawPromptReader("tiny")), host="127.0.0.1", grpc_port=0,
                              health_port=0, metrics_port=0, secure_serving=request.param == "tls")
    if request.param == "tls":
        credentials = grpc.ssl_channel_credentials(root_certificates=running.cert_file.read_bytes())
        channel = grpc.aio.secure_channel(running.grpc_address, credentials)
    else:
        assert running.cert_file is None
        channel = grpc.aio.insecure_channel(running.grpc_address)
    yield running, scheduler, pb_grpc.ExternalProcessorStub(channel), channel
    await channel.close()
    await running.stop()


def add(scheduler: Scheduler, role: str, address: str, **load) -> None:
    e = scheduler.pool.upsert(make_info(role, address))
    scheduler.pool.update_load(e.engine_id, EngineLoad(**load))


def headers_msg(path: str = "/v1/completions", *, method: str = "POST", mode=FULL_DUPLEX, eos: bool = False,
                subset: list[str] | str | None = None) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=":path", raw_value=path.encode()),
            base_pb2.HeaderValue(key=":method", raw_value=method.encode()),
            base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
        ]),
        end_of_stream=eos,
    ))
    msg.protocol_config.request_body_mode = mode
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.update({"x-gateway-destination-endpoint-subset": subset})
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    return msg


def body_msgs(body: bytes, chunk: int = 50_000) -> list[pb.ProcessingRequest]:
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    return [pb.ProcessingRequest(request_body=pb.HttpBody(body=p, end_of_stream=i == len(parts) - 1))
            for i, p in enumerate(parts)]


async def exchange(stub, messages: list[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    async def gen():
        for m in messages:
            yield m

    return [r async for r in stub.Process(gen())]


def completion(n_tokens: int = 10, model: str = "tiny", start: int = 0) -> bytes:
    return json.dumps({"model": model, "prompt": list(range(start, start + n_tokens)), "max_tokens": 4}).encode()


def set_headers(common: pb.CommonResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def lb_metadata(response: pb.ProcessingResponse) -> str:
    return response.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DEST].string_value


async def test_full_duplex_sets_header_and_metadata_then_echoes_the_body(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    body = json.dumps({"model": "tiny", "prompt": "x" * 150_000, "max_tokens": 1}).encode()
    responses = await exchange(stub, [headers_msg()] + body_msgs(body))
    first = responses[0]
    assert first.WhichOneof("response") == "request_headers"
    headers = set_headers(first.request_headers.response)
    assert headers[DEST] == "10.0.0.1:8000" == lb_metadata(first)
    assert first.request_headers.response.clear_route_cache
    echoed = [r.request_body.response.body_mutation.streamed_response for r in responses[1:]]
    assert b"".join(e.body for e in echoed) == body
    assert [e.end_of_stream for e in echoed] == [False, False, True]
    assert all(len(e.body) <= 62_000 for e in echoed)


async def test_the_stream_ends_ok_once_routed_without_waiting_for_envoy(epp) -> None:
    # Envoy keeps its side open (it would send the response phases if configured to); the EPP
    # has said all it will once it routed, so it ends the stream with OK right after the answer.
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    call = stub.Process()
    for message in [headers_msg(), *body_msgs(completion())]:
        await call.write(message)
    responses = []
    while (response := await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
        responses.append(response)
    assert await call.code() == grpc.StatusCode.OK
    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body"]
    assert set_headers(responses[0].request_headers.response)[DEST] == "10.0.0.1:8000"


async def test_buffered_answers_headers_then_routes_in_the_body_response(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    responses = await exchange(stub, [headers_msg(mode=BUFFERED)] + body_msgs(completion()))
    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body"]
    assert not responses[0].request_headers.response.header_mutation.set_headers
    body_response = responses[1]
    assert set_headers(body_response.request_body.response)[DEST] == "10.0.0.1:8000" == lb_metadata(body_response)


async def test_request_without_body_is_routed_on_its_headers(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    responses = await exchange(stub, [headers_msg("/v1/models", method="GET", eos=True)])
    assert len(responses) == 1
    assert set_headers(responses[0].request_headers.response)[DEST] == "10.0.0.1:8000" == lb_metadata(responses[0])


async def test_fallback_list_is_ordered_best_first_in_header_and_metadata(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000", running=5)
    add(scheduler, "decode", "10.0.0.2:8000", running=0)
    add(scheduler, "decode", "10.0.0.3:8000", running=2)
    responses = await exchange(stub, [headers_msg()] + body_msgs(completion()))
    value = set_headers(responses[0].request_headers.response)[DEST]
    assert value == "10.0.0.2:8000,10.0.0.3:8000,10.0.0.1:8000" == lb_metadata(responses[0])


async def test_long_prompt_sets_the_prefiller_header(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    add(scheduler, "prefill", "10.0.0.9:8000")
    responses = await exchange(stub, [headers_msg()] + body_msgs(completion(1000)))
    assert set_headers(responses[0].request_headers.response)[PREFILLER] == "10.0.0.9:8000"


async def test_short_prompt_removes_a_client_supplied_prefiller_header(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    add(scheduler, "prefill", "10.0.0.9:8000")
    responses = await exchange(stub, [headers_msg()] + body_msgs(completion(10)))
    mutation = responses[0].request_headers.response.header_mutation
    assert PREFILLER not in set_headers(responses[0].request_headers.response)
    assert PREFILLER in mutation.remove_headers


async def test_headers_overwrite_what_the_client_sent(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    responses = await exchange(stub, [headers_msg()] + body_msgs(completion()))
    for option in responses[0].request_headers.response.header_mutation.set_headers:
        assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@pytest.mark.parametrize("subset", [["10.0.0.2:8000"], "10.0.0.2:8000"])
async def test_subset_hint_restricts_the_pick(epp, subset) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    add(scheduler, "decode", "10.0.0.2:8000", running=9)
    responses = await exchange(stub, [headers_msg(subset=subset)] + body_msgs(completion()))
    assert set_headers(responses[0].request_headers.response)[DEST] == "10.0.0.2:8000" == lb_metadata(responses[0])


async def test_subset_without_eligible_endpoint_is_503(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    responses = await exchange(stub, [headers_msg(subset=["10.9.9.9:1"])] + body_msgs(completion()))
    assert responses[0].immediate_response.status.code == 503


async def test_empty_subset_is_503(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    responses = await exchange(stub, [headers_msg(subset=[])] + body_msgs(completion()))
    assert responses[0].immediate_response.status.code == 503


async def test_no_endpoint_is_503_with_a_json_error_body(epp) -> None:
    _, _, stub, _ = epp
    responses = await exchange(stub, [headers_msg()] + body_msgs(completion()))
    assert len(responses) == 1
    immediate = responses[0].immediate_response
    assert immediate.status.code == 503
    assert json.loads(immediate.body)["error"]["type"] == "service_unavailable"


async def test_saturated_pool_is_429_at_once_with_flow_control_off(epp) -> None:
    # With flow control on (the default) the request would wait: tests/unit/test_epp_flow_control.py.
    running, scheduler, stub, _ = epp
    running.picker.flow.config = FlowControlConfig(ttl_s=0)
    add(scheduler, "decode", "10.0.0.1:8000", waiting=8)
    responses = await exchange(stub, [headers_msg()] + body_msgs(completion()))
    immediate = responses[0].immediate_response
    assert immediate.status.code == 429
    headers = {h.header.key: h.header.raw_value for h in immediate.headers.set_headers}
    assert headers["x-disagg-dropped-reason"] == b"shed"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", json.dumps({"model": "tiny"}).encode(),
                                  json.dumps({"prompt": "hi"}).encode()])
async def test_body_that_is_not_an_openai_request_is_400(epp, body) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    responses = await exchange(stub, [headers_msg()] + body_msgs(body))
    assert responses[0].immediate_response.status.code == 400


async def test_unknown_model_is_404(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    responses = await exchange(stub, [headers_msg()] + body_msgs(completion(model="other")))
    assert responses[0].immediate_response.status.code == 404


async def test_body_ending_with_trailers_is_routed_then_trailers_answered(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    body = completion()
    messages = [headers_msg(), pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=False)),
                pb.ProcessingRequest(request_trailers=pb.HttpTrailers())]
    responses = await exchange(stub, messages)
    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body", "request_trailers"]
    assert responses[1].request_body.response.body_mutation.streamed_response.body == body


async def test_health_reports_liveness_and_readiness(epp) -> None:
    running, scheduler, _, _ = epp
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status(service: str) -> int:
            return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

        serving = health_pb2.HealthCheckResponse.SERVING
        assert await status("liveness") == serving
        assert await status("readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
        add(scheduler, "decode", "10.0.0.1:8000")
        for _ in range(50):
            if await status("readiness") == serving:
                break
            await asyncio.sleep(0.05)
        assert await status("readiness") == serving
        assert await status("envoy.service.ext_proc.v3.ExternalProcessor") == serving


async def test_a_plaintext_client_is_refused_by_the_tls_port(epp) -> None:
    running, scheduler, _, _ = epp
    if running.cert_file is None:
        pytest.skip("plaintext EPP")
    add(scheduler, "decode", "10.0.0.1:8000")
    async with grpc.aio.insecure_channel(running.grpc_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await exchange(pb_grpc.ExternalProcessorStub(channel), [headers_msg()] + body_msgs(completion()))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_watch_is_unimplemented_as_on_gies_epp(epp) -> None:
    _, _, _, channel = epp
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in health.Watch(health_pb2.HealthCheckRequest(service="liveness")):
            pass
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_is_also_answered_on_the_ext_proc_port(epp) -> None:
    _, _, _, channel = epp
    health = health_pb2_grpc.HealthStub(channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service="liveness"))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_http_pick_returns_the_same_headers(epp) -> None:
    running, scheduler, _, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    add(scheduler, "prefill", "10.0.0.9:8000")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.metrics_port}") as client:
        r = await client.post("/v1/pick", json={"model": "tiny", "prompt_token_ids": list(range(1000))})
        assert r.status_code == 200, r.text
        assert r.json()["headers"] == {DEST: "10.0.0.1:8000", PREFILLER: "10.0.0.9:8000"}
        assert r.json()["decision"] == "remote"
        r = await client.post("/v1/pick", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["decode"] == ["10.0.0.1:8000"]
        r = await client.post("/v1/pick", content=b"nope")
        assert r.status_code == 400
        r = await client.post("/v1/pick", json={"model": "tiny", "prompt_token_ids": [1], "subset": ["x:1"]})
        assert r.status_code == 503


async def test_http_pool_lists_the_endpoints_for_disagg_status(epp) -> None:
    running, scheduler, _, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    add(scheduler, "prefill", "10.0.0.9:8000")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.metrics_port}") as client:
        pool = (await client.get("/v1/pool")).json()
    assert sorted((w["role"], w["address"]) for w in pool) == [("decode", "10.0.0.1:8000"),
                                                               ("prefill", "10.0.0.9:8000")]
    assert all({"engine_id", "waiting", "running", "kv_usage", "signal_age_s"} <= set(w) for w in pool)
    from disagg.status import render

    table = render(pool, {w["address"]: "ok" for w in pool})
    assert "10.0.0.1:8000" in table and "10.0.0.9:8000" in table


async def test_metrics_endpoint_exports_routing_metrics(epp) -> None:
    running, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    await exchange(stub, [headers_msg()] + body_msgs(completion()))
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
    for name in ("disagg_pick_duration_seconds_bucket", "disagg_pd_decisions_total", "disagg_prefix_hit_tokens_total",
                 "disagg_endpoint_signal_age_seconds", "disagg_epp_requests_total"):
        assert name in text


def test_raw_text_is_read_in_16_byte_tokens_hashed_alike_in_every_process() -> None:
    import subprocess
    import sys

    from disagg.epp.prompt import raw_tokens
    from disagg.routing import block_hashes

    text = ("The quick brown fox é jumps over the lazy dog. " * 40).encode()
    tokens = raw_tokens(text)
    assert len(tokens) == -(-len(text) // 16) and raw_tokens(text[:16]) == tokens[:1]
    code = ("import sys; from disagg.epp.prompt import raw_tokens; from disagg.routing import block_hashes; "
            "print(block_hashes(raw_tokens(sys.stdin.buffer.read()), 32))")
    other = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, check=True).stdout
    assert json.loads(other) == block_hashes(tokens, BS)


async def test_a_text_prompt_sharing_a_long_prefix_goes_where_its_prefix_went(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    add(scheduler, "decode", "10.0.0.2:8000")
    document = "".join(f"line {i}: the same long document every turn.\n" for i in range(200))  # ~9 KB

    async def destination(prompt: str) -> str:
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 1}).encode()
        responses = await exchange(stub, [headers_msg()] + body_msgs(body))
        return set_headers(responses[0].request_headers.response)[DEST]

    first = await destination(document + "first question")
    # The first pick is pending on its decode: a new prompt would go to the other one...
    assert await destination("an unrelated prompt " * 100) != first
    # ...and one that shares the document goes where the document is.
    assert await destination(document + "second question, a longer one") == first


def headers_with(path: str = "/v1/completions", **fields: str) -> pb.ProcessingRequest:
    msg = headers_msg(path)
    for key, value in fields.items():
        header = base_pb2.HeaderValue(key=key.replace("_", "-"), raw_value=value.encode())
        if key == "content_type":
            for h in msg.request_headers.headers.headers:
                if h.key == "content-type":
                    h.raw_value = value.encode()
            continue
        msg.request_headers.headers.headers.append(header)
    return msg


async def test_a_body_that_is_not_json_is_415_before_it_is_read(epp) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"):
        responses = await exchange(stub, [headers_with(content_type=content_type)] + body_msgs(completion()))
        answer = responses[0].immediate_response
        assert answer.status.code == 415 and set(json.loads(answer.body)["error"]) == {"message", "type", "param", "code"}


async def test_a_body_over_the_limit_is_413_on_its_length_or_as_it_grows(epp) -> None:
    running, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    running.picker.max_request_bytes = 100_000
    big = completion(30_000)  # ~170 KB of token ids
    # The client sends no more than the EPP reads before it refuses: after the refusal the EPP
    # ends the stream, and grpcio fails a client still writing with INTERNAL (Envoy stops there).
    growing, size = [], 0
    for message in body_msgs(big):
        growing.append(message)
        size += len(message.request_body.body)
        if size > running.picker.max_request_bytes:
            break
    for messages in ([headers_with(content_length=str(len(big)))], [headers_msg()] + growing):
        responses = await exchange(stub, messages)
        assert responses[0].immediate_response.status.code == 413


@pytest.mark.parametrize("body", [
    ('{"model": "tiny", "prompt": "x", "meta": ' + "[" * 2000 + "]" * 2000 + "}").encode(),
    b'{"model": "tiny", "prompt": "x\\ud800"}',
    b'{"model": "tiny\\udfff", "prompt": "x"}',
])
async def test_hostile_json_is_400_from_the_epp_not_a_500(epp, body) -> None:
    _, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")
    responses = await exchange(stub, [headers_msg()] + body_msgs(body))
    answer = responses[0].immediate_response
    assert answer.status.code == 400, answer
    assert set(json.loads(answer.body)["error"]) == {"message", "type", "param", "code"}


async def test_a_failure_of_the_epp_itself_is_an_openai_500_not_a_broken_stream(epp, monkeypatch) -> None:
    running, scheduler, stub, _ = epp
    add(scheduler, "decode", "10.0.0.1:8000")

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(running.picker, "route", broken)
    responses = await exchange(stub, [headers_msg()] + body_msgs(completion()))
    answer = responses[0].immediate_response
    assert answer.status.code == 500 and json.loads(answer.body)["error"]["type"] == "internal_error"
