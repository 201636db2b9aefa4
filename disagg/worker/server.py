"""The worker's own HTTP endpoint: the OpenAI subset, `POST /internal/prefill`, `/metrics`,
`GET /v1/worker` and `/health`. The gateway path routes here, and decode calls prefill here."""

from __future__ import annotations

import hmac
import logging
from typing import Any

import msgspec
import prometheus_client
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import SecretStr, ValidationError

from disagg.openai.body import parse_json, shorten
from disagg.openai.errors import APIError, from_validation_error
from disagg.openai.http import install_error_handlers, read_json_body, respond, until_disconnect
from disagg.openai.serving import Kind, Preprocessor
from disagg.worker import metrics
from disagg.worker.protocol import PREFILLER_HEADER, PrefillRequest
from disagg.worker.worker import Worker

log = logging.getLogger(__name__)


def check_internal_token(request: Request, token: SecretStr | None) -> None:
    """Worker-to-worker calls carry the stack's internal token (`Authorization: Bearer ...`):
    a prefill that anyone reaching its port could drive would hold KV for them until the lease
    expires. Compared in constant time. No token configured: every caller is accepted."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(401, "this endpoint needs the stack's internal token (Authorization: Bearer ...)",
                       code="missing_internal_token")
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise APIError(403, "the internal token does not match this stack's", code="invalid_internal_token")


def build_worker_app(worker: Worker, preprocessor: Preprocessor) -> FastAPI:
    app = FastAPI(title=f"disagg {worker.role} worker", docs_url=None, redoc_url=None)
    max_bytes = worker.config.max_request_bytes

    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/worker")
    async def describe() -> dict[str, Any]:
        return {**worker.info.model_dump(), "load": msgspec.structs.asdict(worker.load())}

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        # `name[]=...` restricts the output to those series (prometheus_client's convention, which
        # vLLM's own /metrics honours too): the router scrapes the few load gauges ten times a
        # second, and rendering all of vLLM's histograms each time cost ~10% of a core.
        names = request.query_params.getlist("name[]")
        registry = prometheus_client.REGISTRY
        output = prometheus_client.generate_latest(registry.restricted_registry(names) if names else registry)
        return Response(output, media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return preprocessor.models().model_dump()

    @app.post("/internal/prefill")
    async def prefill(request: Request) -> dict[str, Any]:
        check_internal_token(request, worker.config.internal_token)
        if worker.role != "prefill":
            raise APIError(409, f"this is a {worker.role} worker; send prefills to a prefill worker")
        data = parse_json(await read_json_body(request, max_bytes))
        try:
            body = PrefillRequest.model_validate(data)
        except ValidationError as e:
            raise from_validation_error(e) from None
        preprocessor.check_token_ids(body.prompt_token_ids, "prompt_token_ids")

        async def abandon(result: Any) -> None:
            await worker.release_prefill(f"{body.request_id}-abandoned", result.kv_transfer_params)

        result = await until_disconnect(request, worker.prefill(body), on_abandon=abandon)
        metrics.REQUESTS.labels(role="prefill", status="ok").inc()
        return result.model_dump()

    async def openai(kind: Kind, request: Request) -> Response:
        # Taken off the request whatever happens: the header is for this hop only.
        prefiller = request.headers.get(PREFILLER_HEADER)
        prepared = await preprocessor.prepare_async(kind, await read_json_body(request, max_bytes))
        candidates: list[str] = []
        if prefiller:
            candidates = [a.strip() for a in prefiller.split(",") if a.strip()]
            unknown = [a for a in candidates if not worker.is_registered_prefill(a)]
            if unknown:
                raise APIError(403, f"{PREFILLER_HEADER} names {shorten(', '.join(unknown))}, not a registered "
                                    f"prefill worker", param=PREFILLER_HEADER)
        outputs = worker.generate(prepared.generate, candidates)
        metrics.REQUESTS.labels(role=worker.role, status="ok").inc()
        return await respond(request, prepared, outputs, preprocessor.model_name,
                             headers={"x-disagg-decode": worker.address})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await openai("chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await openai("completion", request)

    return app

