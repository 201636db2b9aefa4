"""Real Envoy + EPP in front of stand-in workers (no engine): routing follows the EPP, the
fallback list survives a dead first choice, prefixes stick, the EPP's state rebuilds."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import pytest_asyncio

from disagg.config import AppConfig
from disagg.epp.gateway import start_gateway
from disagg.messages import EngineLoad
from disagg.epp.prompt import RawPromptReader
from disagg.routing import StaticDiscovery
from disagg.bench.standin import StandInWorker

pytestmark = pytest.mark.integration

DEST = "x-gateway-destination-endpoint"


def config(**routing) -> AppConfig:
    return AppConfig(model="tiny", block_size=32, routing={"scrape_interval_s": 0.05, **routing})


async def wait_for(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(loop_scope="function")
async def stack():
    decodes = [StandInWorker("decode").start() for _ in range(2)]
    prefill = StandInWorker("prefill").start()
    workers = decodes + [prefill]
    gateway = await start_gateway(
        config(pd_threshold_tokens=256), StaticDiscovery([w.address for w in workers], interval_s=0.2),
        gateway_port=0, host="127.0.0.1", reader=RawPromptReader("tiny"),
    )
    await wait_for(lambda: len(gateway.scheduler.pool) == 3)
    await asyncio.sleep(0.3)  # Envoy loads the EDS file
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        yield gateway, decodes, prefill, client
    await gateway.stop()
    for w in workers:
        w.stop()


def completion(tokens: list[int]) -> dict:
    return {"model": "tiny", "prompt": tokens, "max_tokens": 2}


async def test_every_request_lands_on_the_decode_the_epp_chose(stack) -> None:
    gateway, decodes, prefill, client = stack
    for i in range(30):
        r = await client.post("/v1/completions", json=completion(list(range(i * 100, i * 100 + 20))))
        assert r.status_code == 200, r.text
        served = r.json()["served_by"]
        _, _, headers, _ = next(req for w in decodes for req in w.requests if req[3] and json.loads(req[3])["prompt"][0] == i * 100)
        assert headers[DEST].split(",")[0] == served
        assert r.headers[DEST] == headers[DEST] and r.headers["x-disagg-upstream"] == served
    assert {len(w.requests) > 0 for w in decodes} == {True}  # unrelated prompts spread


async def test_long_prompt_carries_the_prefill_endpoint(stack) -> None:
    gateway, decodes, prefill, client = stack
    r = await client.post("/v1/completions", json=completion(list(range(1000))))
    assert r.json()["prefiller"] == prefill.address
    r = await client.post("/v1/completions", json=completion(list(range(5000, 5010))))
    assert r.json()["prefiller"] is None


async def test_large_body_reaches_the_worker_byte_for_byte(stack) -> None:
    # ~600 KB: many HTTP/2 frames each way between Envoy and the EPP's h2 server, and the body
    # echoed back to Envoy in several streamed chunks.
    gateway, decodes, prefill, client = stack
    body = json.dumps(completion(list(range(100_000, 200_000)))).encode()
    r = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    received = next(req[3] for w in decodes for req in w.requests if req[3] and req[3][:200] == body[:200])
    assert received == body


async def test_a_gateway_configured_to_send_response_phases_skips_them(monkeypatch) -> None:
    # GIE's reference gateway configuration also sends the response's headers, body and trailers
    # to the EPP. Ours ends each ext_proc stream once it has routed, so Envoy closes it there:
    # the response streams to the client without a detour through the EPP.
    from disagg.epp import envoy

    generated = envoy.envoy_config

    def with_response_phases(settings):
        bootstrap = generated(settings)
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ext_proc = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
        ext_proc["typed_config"]["processing_mode"].update(
            response_header_mode="SEND", response_body_mode="FULL_DUPLEX_STREAMED", response_trailer_mode="SEND")
        return bootstrap

    monkeypatch.setattr(envoy, "envoy_config", with_response_phases)
    worker = StandInWorker("decode").start()
    gateway = await start_gateway(config(), StaticDiscovery([worker.address], interval_s=0.2), gateway_port=0,
                                  host="127.0.0.1", reader=RawPromptReader("tiny"))
    try:
        await wait_for(lambda: len(gateway.scheduler.pool) == 1)
        await asyncio.sleep(0.3)  # Envoy loads the EDS file
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            for i in range(5):
                r = await client.post("/v1/completions", json=completion([i, 1, 2]))
                assert r.status_code == 200 and r.json()["served_by"] == worker.address, r.text
            stats = (await client.get(f"{gateway.envoy.admin_url}/stats")).text
        counters = dict(line.split(": ", 1) for line in stats.splitlines() if ".ext_proc." in line)
        assert int(counters["http.gateway.ext_proc.server_half_closed"]) == 5
        # Per request, the EPP answered the headers and the body, and nothing of the response.
        assert int(counters["http.gateway.ext_proc.stream_msgs_received"]) == 10
        assert int(counters["http.gateway.ext_proc.streams_failed"]) == 0
    finally:
        await gateway.stop()
        worker.stop()


async def test_client_cannot_choose_the_prefill_worker(stack) -> None:
    gateway, decodes, prefill, client = stack
    r = await client.post("/v1/completions", json=completion([1, 2, 3]), headers={"x-prefiller-host-port": "evil:1"})
    assert r.json()["prefiller"] is None


async def test_shared_prefix_sticks_to_one_decode(stack) -> None:
    gateway, decodes, prefill, client = stack
    prefix = list(range(10_000, 10_000 + 600))
    served = []
    for i in range(20):
        r = await client.post("/v1/completions", json=completion(prefix + [i] * 20))
        served.append(r.json()["served_by"])
    top = max(set(served), key=served.count)
    assert served.count(top) / len(served) >= 0.9


async def test_dead_first_choice_falls_back_down_the_list(stack) -> None:
    gateway, decodes, prefill, client = stack
    decodes[0].stop()  # connection refused from now on; the EPP may still list it first for ~2 s
    for i in range(10):
        r = await client.post("/v1/completions", json=completion(list(range(i * 7, i * 7 + 10))))
        assert r.status_code == 200, r.text
        assert r.json()["served_by"] == decodes[1].address


async def test_no_decode_is_503(stack) -> None:
    gateway, decodes, prefill, client = stack
    gateway.scheduler.pool.forget_after_s = 2.5  # the default (5 x dead_after_s) would take 10 s
    for w in decodes:
        w.hang()
    await wait_for(lambda: not gateway.scheduler.pool.endpoints("decode", include_dead=True), timeout=8)
    r = await client.post("/v1/completions", json=completion([1, 2, 3]))
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable"


async def test_bad_body_is_400_from_the_gateway(stack) -> None:
    gateway, decodes, prefill, client = stack
    r = await client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400


@pytest.mark.parametrize("secure", [True, False])
async def test_envoy_speaks_tls_to_the_epp_by_default_and_plaintext_when_told(secure: bool) -> None:
    worker = StandInWorker("decode").start()
    gateway = await start_gateway(config(), StaticDiscovery([worker.address], interval_s=0.2), gateway_port=0,
                                  host="127.0.0.1", reader=RawPromptReader("tiny"), secure_serving=secure)
    try:
        assert (gateway.epp.cert_file is not None) is secure
        await wait_for(lambda: len(gateway.scheduler.pool) == 1)
        await asyncio.sleep(0.3)  # Envoy loads the EDS file
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            for i in range(3):
                r = await client.post("/v1/completions", json=completion([i, 1, 2]))
                assert r.status_code == 200 and r.json()["served_by"] == worker.address, r.text
            stats = (await client.get(f"{gateway.envoy.admin_url}/stats")).text
        counters = dict(line.split(": ", 1) for line in stats.splitlines() if line.startswith("cluster.epp."))
        # The EPP cluster's connections were TLS handshakes (or none were, in plaintext).
        assert (int(counters.get("cluster.epp.ssl.handshake", "0")) > 0) is secure
    finally:
        await gateway.stop()
        worker.stop()


@pytest.mark.parametrize("body_mode", ["BUFFERED", "FULL_DUPLEX_STREAMED"])
async def test_a_request_waits_in_flow_control_past_the_ext_proc_timeout_then_is_served(body_mode) -> None:
    # While the only decode is saturated the request waits in the EPP, longer than Envoy's 5 s
    # ext_proc timeout, and is served once the decode reports room: Envoy's wait for the EPP's
    # answer covers the flow-control TTL in both body modes.
    worker = StandInWorker("decode").start()
    worker.load = EngineLoad(num_blocks=1000, waiting=100)  # past max_waiting_per_worker (64)
    gateway = await start_gateway(config(flow_control={"ttl_s": 20.0}),
                                  StaticDiscovery([worker.address], interval_s=0.2), gateway_port=0,
                                  host="127.0.0.1", reader=RawPromptReader("tiny"), body_mode=body_mode)
    try:
        await wait_for(lambda: len(gateway.scheduler.pool) == 1)
        await asyncio.sleep(0.3)  # Envoy loads the EDS file
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            body = json.dumps(completion(list(range(500)))).encode()
            waiting = asyncio.ensure_future(client.post("/v1/completions", content=body,
                                                        headers={"content-type": "application/json"}))
            await asyncio.sleep(6.5)
            assert not waiting.done(), waiting.result().text
            worker.load = EngineLoad(num_blocks=1000)
            r = await waiting
            assert r.status_code == 200, r.text
            assert r.json()["served_by"] == worker.address
            assert loop.time() - started > 6.5
            assert worker.requests[-1][3] == body
    finally:
        await gateway.stop()
        worker.stop()
