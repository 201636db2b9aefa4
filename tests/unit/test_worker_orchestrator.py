"""Decode-side P/D orchestration with test doubles (stand-in prefill servers and an engine): candidate
fallback, local prefill when every candidate fails, and blocks released when decode never reads.
The same paths run against real workers in tests/integration/test_serve_stack.py."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from disagg.config import AppConfig
from disagg.engine.base import GenerateOutput, GenerateRequest
from disagg.worker.orchestrator import PrefillClient, generate_disaggregated

PARAMS = {"remote_engine_id": "p1", "remote_block_ids": [1, 2], "remote_host": "h", "remote_port": 1}


class FakeEngine:
    def __init__(self, tokens: int = 3, delay_s: float = 0.0):
        self.tokens, self.delay_s = tokens, delay_s
        self.seen: list[GenerateRequest] = []
        self.released: list[dict[str, Any]] = []

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        self.seen.append(request)
        await asyncio.sleep(self.delay_s)
        for i in range(self.tokens):
            yield GenerateOutput(request.request_id, [i], str(i), finished=i == self.tokens - 1)

    async def release_remote_kv(self, request_id: str, params: dict[str, Any]) -> None:
        self.released.append(params)


class Prefills:
    """Stand-in prefill workers on real ports: `ok` answers with the KV params, `busy` with a
    503, `dead` is a bound port nobody listens on (connections refused)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._runners: list[web.AppRunner] = []
        self._sockets: list[socket.socket] = []

    async def add(self, name: str, kind: str) -> str:
        if kind == "dead":
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            self._sockets.append(sock)
            port = sock.getsockname()[1]
            return f"127.0.0.1:{port}"

        async def handle(request: web.Request) -> web.Response:
            self.calls.append(name)
            if kind == "busy":
                return web.json_response({"error": {"message": "busy"}}, status=503)
            return web.json_response({"request_id": "r1-p1", "kv_transfer_params": PARAMS, "num_prompt_tokens": 100})

        app = web.Application()
        app.router.add_post("/internal/prefill", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        return f"127.0.0.1:{runner.addresses[0][1]}"

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        for sock in self._sockets:
            sock.close()


@pytest_asyncio.fixture(loop_scope="function")
async def prefills():
    p = Prefills()
    yield p
    await p.close()


def client(attempts: int = 2) -> PrefillClient:
    return PrefillClient(AppConfig(model="m", prefill_attempts=attempts), "fp")


def request() -> GenerateRequest:
    return GenerateRequest(request_id="r1", prompt_token_ids=list(range(100)))


async def collect(engine, c, candidates) -> list[GenerateOutput]:
    try:
        return [o async for o in generate_disaggregated(engine, c, request(), candidates)]
    finally:
        await c.aclose()


async def test_a_dead_candidate_is_skipped_for_the_next(prefills):
    dead, live = await prefills.add("dead", "dead"), await prefills.add("live", "ok")
    c = client()
    outcome = await c.prefill(request(), [dead, live])
    await c.aclose()
    assert outcome.address == live and outcome.attempts == 2 and outcome.kv_transfer_params == PARAMS
    assert prefills.calls == ["live"]


async def test_every_candidate_failing_ends_in_a_local_prefill_with_the_whole_answer(prefills):
    candidates = [await prefills.add(n, "busy") for n in "abc"]
    engine = FakeEngine()
    outs = await collect(engine, client(attempts=3), candidates)
    assert [o.token_ids[0] for o in outs] == [0, 1, 2] and outs[-1].finished
    assert engine.seen[0].kv_transfer_params is None  # local prefill, no remote blocks
    assert prefills.calls == ["a", "b", "c"]


async def test_attempts_are_bounded_by_the_retry_budget(prefills):
    candidates = [await prefills.add(n, "busy") for n in "abc"]
    c = client(attempts=2)
    outcome = await c.prefill(request(), candidates)
    await c.aclose()
    assert outcome.address is None and outcome.attempts == 2 and prefills.calls == ["a", "b"]


async def test_remote_params_reach_the_engine_as_a_remote_prefill(prefills):
    engine = FakeEngine()
    await collect(engine, client(), [await prefills.add("p", "ok")])
    params = engine.seen[0].kv_transfer_params
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_block_ids"] == [1, 2] and engine.released == []


async def test_cancelled_before_the_first_token_releases_the_prefill_blocks(prefills):
    engine = FakeEngine(delay_s=10)
    candidate = await prefills.add("p", "ok")

    async def consume() -> None:
        await collect(engine, client(), [candidate])

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(engine.released) == 1 and engine.released[0]["remote_block_ids"] == [1, 2]
