"""The EPP's HTTP side (port 9090): Prometheus `/metrics`, `POST /v1/pick` for gateways without
ext_proc and for debugging, `GET /v1/pool`, and `/health`."""

from __future__ import annotations

import json
from typing import Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from disagg.epp.picker import EndpointPicker, Refused
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
        if "prompt_token_ids" in data:
            try:
                req = msgspec.json.decode(raw, type=PickRequest)
            except msgspec.ValidationError as exc:
                return JSONResponse(error_body(400, str(exc)), status_code=400)
            decision = picker.route_tokens(req)
        else:
            subset = data.pop("subset", None)
            path = "/v1/chat/completions" if "messages" in data else "/v1/completions"
            decision = picker.route(path, json.dumps(data).encode(), subset)
        if isinstance(decision, Refused):
            return JSONResponse(decision.body, status_code=decision.status)
        return JSONResponse(decision.to_json())

    return app
