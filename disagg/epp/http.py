"""The EPP's HTTP side (port 9090): Prometheus `/metrics`, `POST /v1/pick` for gateways without
ext_proc and for debugging, `GET /v1/pool`, and `/health`. `/v1/pick` goes through the same flow
control as ext_proc: while every decode is saturated the answer waits, and a client that
disconnects meanwhile leaves the queue."""

from __future__ import annotations

import asyncio
import json
from typing import Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from disagg.epp.flow_control import FLOW_HEADERS, Waiting
from disagg.epp.picker import Decision, EndpointPicker, Refused
from disagg.openai.errors import error_body
from disagg.routing import PickRequest


def build_http_app(picker: EndpointPicker, ready: Callable[[], bool]) -> FastAPI:
    app = FastAPI(title="disagg EPP", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> Response:
        ok = ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v1/pool")
    async def pool() -> list[dict]:
        """The endpoint pool as the picker sees it (what `disagg status --url` prints)."""
        return picker.scheduler.pool.snapshot()

    @app.post("/v1/pick")
    async def pick(request: Request) -> Response:
        """JSON in: either {"model", "prompt_token_ids", "subset"?} or an OpenAI chat/completions
        body (with an optional "subset"). JSON out: the pick and the headers a proxy should set."""
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return JSONResponse(error_body(400, f"request body is not valid JSON: {exc}"), status_code=400)
        if not isinstance(data, dict):
            return JSONResponse(error_body(400, "request body must be a JSON object"), status_code=400)
        flow_headers = {name: request.headers[name] for name in FLOW_HEADERS if name in request.headers}
        if "prompt_token_ids" in data:
            try:
                req = msgspec.json.decode(raw, type=PickRequest)
            except msgspec.ValidationError as exc:
                return JSONResponse(error_body(400, str(exc)), status_code=400)
            decision = picker.route_tokens(req, headers=flow_headers, size=len(raw))
        else:
            subset = data.pop("subset", None)
            path = "/v1/chat/completions" if "messages" in data else "/v1/completions"
            decision = picker.route(path, json.dumps(data).encode(), subset, headers=flow_headers)
        if isinstance(decision, Waiting):
            decided = await _wait(decision, request)
            if decided is None:  # the client left
                return Response(status_code=499)
            decision = decided
        if isinstance(decision, Refused):
            return JSONResponse(decision.body, status_code=decision.status, headers=decision.headers)
        return JSONResponse(decision.to_json())

    return app


async def _wait(waiting: Waiting[Decision], request: Request) -> Decision | None:
    """The decision once the request leaves the queue; None (and out of the queue) if the client
    disconnects first. With the body read, the next ASGI message is the disconnect."""
    decided: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
    waiting.then(lambda decision: decided.done() or decided.set_result(decision))

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([decided, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not decided.done():
            waiting.cancel()
    return decided.result() if decided.done() else None
