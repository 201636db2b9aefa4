"""Internal ports stay internal, through the real stack (`disagg serve --gateway` on 127.0.0.1):
every socket the stack listens on is on loopback (vLLM's KV events as ipc:// sockets in the
worker's own directory; Ray's servers; Envoy; the EPP), but for the one Ray Serve hard-codes on
every replica; the gateway routes the public OpenAI paths only; and a prefill posted straight to
a prefill worker without the stack's internal token is refused and pins no KV."""

from __future__ import annotations

import asyncio
import os
import stat

import httpx
import psutil
import pytest

from disagg.routing.kv_events import BlockStored, KVEventSubscriber

pytestmark = pytest.mark.integration

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}



def describe(address: str) -> dict:
    return httpx.get(f"http://{address}/v1/worker", timeout=10).json()


def listeners(root: int) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening inet socket below `root`."""
    found = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            name = p.name()
            found += [(p.pid, name, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return found


def test_every_server_of_the_stack_listens_on_loopback_but_ray_serves_replica_grpc(stack) -> None:
    found = listeners(stack.proc.pid)
    names = {name for _, name, _, _ in found}
    # Ray's own (GCS, raylet, dashboard and its agent, runtime-env agent, core workers), Envoy,
    # the workers' endpoints and load channels, the EPP in the driver.
    assert {"gcs_server", "raylet", "envoy"} <= names, names
    elsewhere = [(pid, name, ip, port) for pid, name, ip, port in found if ip not in LOOPBACK]
    # Ray Serve binds each replica's inter-deployment gRPC server on [::]:0 whatever the node's
    # address (serve/_private/replica.py): one per replica, and nothing else.
    replicas = {pid for pid, name, _, _ in found if name.startswith("ray::ServeReplica")}
    assert sorted(pid for pid, _, _, _ in elsewhere) == sorted(replicas), elsewhere
    assert {ip for _, _, ip, _ in elsewhere} <= {"::", "0.0.0.0"}, elsewhere


def test_kv_events_are_ipc_sockets_in_the_workers_own_directory_and_reach_a_subscriber(stack) -> None:
    (prefill,) = stack.workers("prefill")
    infos = [describe(a) for a in stack.workers("prefill") + stack.workers("decode")]
    for info in infos:
        for endpoint in (info["kv_events_endpoint"], info["kv_events_replay_endpoint"]):
            assert endpoint.startswith("ipc://"), endpoint
            path = endpoint.removeprefix("ipc://")
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700  # this user's alone
        assert info["load_endpoint"].startswith("tcp://127.0.0.1:")
    decode = next(i for i in infos if i["role"] == "decode")

    async def follow() -> list[BlockStored]:
        stored: list[BlockStored] = []
        subscriber = KVEventSubscriber(decode["kv_events_endpoint"],
                                       lambda batch: stored.extend(e for e in batch.events if isinstance(e, BlockStored)),
                                       replay_endpoint=decode["kv_events_replay_endpoint"])
        task = asyncio.create_task(subscriber.run())
        async with httpx.AsyncClient(timeout=120) as client:
            r = await client.post(f"http://{decode['address']}/v1/completions",
                                  json={"model": "tiny", "prompt": list(range(300, 400)), "max_tokens": 2})
            assert r.status_code == 200
        for _ in range(100):
            if any(300 in e.token_ids for e in stored):
                break
            await asyncio.sleep(0.1)
        task.cancel()
        return stored

    assert any(300 in e.token_ids for e in asyncio.run(follow()))


@pytest.mark.parametrize("method, path", [
    ("POST", "/internal/prefill"), ("GET", "/metrics"), ("GET", "/v1/worker"), ("GET", "/v1/pool"),
    ("GET", "/"), ("POST", "/v1/completions/"), ("POST", "/V1/completions"), ("GET", "/metrics?name[]=x"),
])
def test_the_gateway_answers_any_other_path_than_the_public_api_with_an_openai_404(stack, method, path) -> None:
    r = httpx.request(method, stack.gateway_url + path, json={} if method == "POST" else None, timeout=30)
    assert r.status_code == 404, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": {
        "message": "Invalid URL: this gateway serves /v1/completions, /v1/chat/completions, /v1/models, /health",
        "type": "not_found_error", "param": None, "code": "404"}}
    assert "x-disagg-upstream" not in r.headers  # no worker saw it


def test_the_gateway_serves_the_public_api_disaggregated(stack) -> None:
    assert httpx.get(stack.gateway_url + "/v1/models", timeout=30).json()["data"][0]["id"] == "tiny"
    assert httpx.get(stack.gateway_url + "/health", timeout=30).status_code == 200
    # A prompt over the P/D threshold: decode's call to prefill carries the internal token.
    r = httpx.post(stack.gateway_url + "/v1/completions", timeout=120,
                   json={"model": "tiny", "prompt": list(range(10, 300)), "max_tokens": 4})
    assert r.status_code == 200 and r.headers["x-disagg-pd"] == "remote", (r.headers, r.text)
    r = httpx.post(stack.gateway_url + "/v1/chat/completions", timeout=120,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_prefills_posted_to_a_prefill_worker_without_the_token_are_refused_and_pin_no_kv(stack) -> None:
    (prefill,) = stack.workers("prefill")
    before = describe(prefill)["load"]
    body = {"request_id": "intruder", "prompt_token_ids": list(range(1, 500)),
            "kv_transfer_params": {"do_remote_decode": True}}

    async def flood(headers: dict[str, str]) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"http://{prefill}/internal/prefill", headers=headers,
                                                      json={**body, "request_id": f"intruder-{i}"})
                                          for i in range(40)))

    for headers, status in (({}, 401), ({"Authorization": "Bearer guessed"}, 403)):
        answers = asyncio.run(flood(headers))
        assert {r.status_code for r in answers} == {status}
        assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in answers)
    after = describe(prefill)["load"]
    # (a lease of an earlier test may have been released meanwhile: never fewer free blocks)
    assert after["free_blocks"] >= before["free_blocks"] and after["running"] == 0 and after["waiting"] == 0
