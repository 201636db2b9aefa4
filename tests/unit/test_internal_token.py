"""Worker-to-worker calls carry the stack's internal token: prefill's /internal/prefill refuses a
call without it (401) or with another (403) in OpenAI's error body, before it reads the body or
prefills anything; decode's prefill client sends it. Without a configured token every caller is
accepted (a worker started on its own, as before)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from aiohttp import web
from pydantic import SecretStr

from disagg.config import AppConfig
from disagg.engine.base import GenerateRequest, SamplingOptions
from disagg.worker.launch import INTERNAL_TOKEN_ENV, with_internal_token
from disagg.worker.orchestrator import PrefillClient
from disagg.worker.protocol import PrefillResult
from disagg.worker.server import build_worker_app

TOKEN = "s3cret-token-of-this-stack"


class Preprocessor:
    def check_token_ids(self, ids: list[int], param: str) -> None:
        pass


def prefill_app(token: str | None) -> tuple[Any, list[str]]:
    prefilled: list[str] = []

    async def prefill(body: Any) -> PrefillResult:
        prefilled.append(body.request_id)
        return PrefillResult(request_id=body.request_id, kv_transfer_params={"remote_block_ids": [1]},
                             num_prompt_tokens=len(body.prompt_token_ids))

    config = AppConfig(model="m", internal_token=token)
    worker = SimpleNamespace(role="prefill", config=config, prefill=prefill, info=None)
    return build_worker_app(worker, Preprocessor()), prefilled


async def post(app: Any, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as client:
        return await client.post("/internal/prefill", headers=headers,
                                 json={"request_id": "r1", "prompt_token_ids": [1, 2, 3], "layout_fingerprint": "fp"})


@pytest.mark.parametrize("headers, status, code", [
    ({}, 401, "missing_internal_token"),
    ({"authorization": "Basic " + TOKEN}, 401, "missing_internal_token"),
    ({"authorization": "Bearer"}, 401, "missing_internal_token"),
    ({"authorization": "Bearer not-the-token"}, 403, "invalid_internal_token"),
    ({"authorization": "Bearer " + TOKEN[:-1]}, 403, "invalid_internal_token"),
])
async def test_a_prefill_without_the_token_is_refused_before_anything_is_prefilled(headers, status, code) -> None:
    app, prefilled = prefill_app(TOKEN)
    r = await post(app, headers)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert TOKEN not in r.text
    assert prefilled == []


async def test_forty_unread_prefills_without_the_token_hold_nothing() -> None:
    app, prefilled = prefill_app(TOKEN)
    answers = await asyncio.gather(*(post(app, {}) for _ in range(40)))
    assert {r.status_code for r in answers} == {401} and prefilled == []


async def test_the_token_is_accepted() -> None:
    app, prefilled = prefill_app(TOKEN)
    r = await post(app, {"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and prefilled == ["r1"]


async def test_without_a_configured_token_every_caller_is_accepted() -> None:
    app, prefilled = prefill_app(None)
    assert (await post(app, {})).status_code == 200 and prefilled == ["r1"]


async def test_decodes_prefill_client_sends_the_token() -> None:
    seen: list[str | None] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"request_id": "r-p1", "kv_transfer_params": {"remote_block_ids": [1]},
                                  "num_prompt_tokens": 3})

    app = web.Application()
    app.router.add_post("/internal/prefill", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    client = PrefillClient(AppConfig(model="m", internal_token=TOKEN), "fp")
    try:
        request = GenerateRequest(request_id="r", prompt_token_ids=[1, 2, 3], sampling=SamplingOptions(max_tokens=1))
        outcome = await client.prefill(request, [f"127.0.0.1:{runner.addresses[0][1]}"])
        assert outcome.address is not None
        assert seen == [f"Bearer {TOKEN}"]
    finally:
        await client.aclose()
        await runner.cleanup()


def test_the_token_comes_from_the_environment_when_the_config_has_none(monkeypatch) -> None:
    monkeypatch.setenv(INTERNAL_TOKEN_ENV, "from-the-secret")
    assert with_internal_token(AppConfig(model="m")).internal_token.get_secret_value() == "from-the-secret"
    assert with_internal_token(AppConfig(model="m", internal_token="set")).internal_token.get_secret_value() == "set"
    monkeypatch.delenv(INTERNAL_TOKEN_ENV)
    assert with_internal_token(AppConfig(model="m")).internal_token is None


def test_the_token_never_shows_in_a_dump_or_a_repr() -> None:
    config = AppConfig(model="m", internal_token=TOKEN)
    assert isinstance(config.internal_token, SecretStr)
    assert TOKEN not in repr(config) and TOKEN not in config.model_dump_json()
    # A copy keeps it (Serve's args, `with_overrides`).
    assert config.with_overrides(port=1).internal_token.get_secret_value() == TOKEN
