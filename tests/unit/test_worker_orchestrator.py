"""Decode-side P/D orchestration with test doubles (an HTTP transport and an engine): candidate
fallback, local prefill when every candidate fails, and blocks released when decode never reads.
The same paths run against real workers in tests/integration/test_serve_stack.py."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import httpx
import pytest

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


def client(handler, attempts: int = 2) -> PrefillClient:
    c = PrefillClient(AppConfig(model="m", prefill_attempts=attempts), "fp")
    c._http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return c


def request() -> GenerateRequest:
    return GenerateRequest(request_id="r1", prompt_token_ids=list(range(100)))


def ok(req: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"request_id": "r1-p1", "kv_transfer_params": PARAMS, "num_prompt_tokens": 100})


async def collect(engine, c, candidates) -> list[GenerateOutput]:
    return [o async for o in generate_disaggregated(engine, c, request(), candidates)]


async def test_a_dead_candidate_is_skipped_for_the_next():
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req.url.host)
        if req.url.host == "dead":
            raise httpx.ConnectError("refused")
        return ok(req)

    outcome = await client(handler).prefill(request(), ["dead:1", "live:1"])
    assert outcome.address == "live:1" and outcome.attempts == 2 and outcome.kv_transfer_params == PARAMS
    assert calls == ["dead", "live"]


async def test_every_candidate_failing_ends_in_a_local_prefill_with_the_whole_answer():
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"message": "busy"}})

    engine = FakeEngine()
    outs = await collect(engine, client(handler), ["a:1", "b:1", "c:1"])
    assert [o.token_ids[0] for o in outs] == [0, 1, 2] and outs[-1].finished
    assert engine.seen[0].kv_transfer_params is None  # local prefill, no remote blocks


async def test_attempts_are_bounded_by_the_retry_budget():
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req.url.host)
        raise httpx.ConnectError("refused")

    outcome = await client(handler, attempts=2).prefill(request(), ["a:1", "b:1", "c:1"])
    assert outcome.address is None and outcome.attempts == 2 and calls == ["a", "b"]


async def test_remote_params_reach_the_engine_as_a_remote_prefill():
    engine = FakeEngine()
    await collect(engine, client(ok), ["p:1"])
    params = engine.seen[0].kv_transfer_params
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_block_ids"] == [1, 2] and engine.released == []


async def test_cancelled_before_the_first_token_releases_the_prefill_blocks():
    engine = FakeEngine(delay_s=10)

    async def consume() -> None:
        async for _ in generate_disaggregated(engine, client(ok), request(), ["p:1"]):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(engine.released) == 1 and engine.released[0]["remote_block_ids"] == [1, 2]
