"""The worker's own HTTP endpoint: the OpenAI subset, `POST /internal/prefill`, `/metrics`,
`GET /v1/worker` and `/health`. The gateway path routes here, and decode calls prefill here."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, TypeVar

import prometheus_client
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from disagg.openai.errors import APIError, error_body, from_validation_error
from disagg.openai.serving import Kind, Preprocessor, ResponseBuilder
from disagg.worker import metrics
from disagg.worker.protocol import PREFILLER_HEADER, PrefillRequest
from disagg.worker.worker import Worker

log = logging.getLogger(__name__)
T = TypeVar("T")


async def until_disconnect(request: Request, work: Awaitable[T], on_abandon: Callable[[T], Awaitable[Any]] | None = None) -> T:
    """Run `work`; if the client disconnects first, cancel it. A result that finished but whose
    client is gone goes to `on_abandon` (prefill uses it to free the handed-off blocks)."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.05)
        if done:
            break
        if await request.is_disconnected():
            task.cancel()
            try:
                result = await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone
                raise APIError(499, "client disconnected") from None
            if on_abandon is not None:
                await on_abandon(result)
            raise APIError(499, "client disconnected")
    return task.result()


def build_worker_app(worker: Worker, preprocessor: Preprocessor) -> FastAPI:
    app = FastAPI(title=f"disagg {worker.role} worker", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}"), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/worker")
    async def describe() -> dict[str, Any]:
        return {**worker.info.model_dump(), "load": worker.load().model_dump()}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return preprocessor.models().model_dump()

    @app.post("/internal/prefill")
    async def prefill(request: Request) -> dict[str, Any]:
        if worker.role != "prefill":
            raise APIError(409, f"this is a {worker.role} worker; send prefills to a prefill worker")
        try:
            body = PrefillRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise from_validation_error(e) from None

        async def abandon(result: Any) -> None:
            await worker.release_prefill(f"{body.request_id}-abandoned", result.kv_transfer_params)

        result = await until_disconnect(request, worker.prefill(body), on_abandon=abandon)
        metrics.REQUESTS.labels(role="prefill", status="ok").inc()
        return result.model_dump()

    async def openai(kind: Kind, request: Request) -> Response:
        # Taken off the request whatever happens: the header is for this hop only.
        prefiller = request.headers.get(PREFILLER_HEADER)
        prepared = preprocessor.prepare(kind, await request.body())
        candidates: list[str] = []
        if prefiller:
            candidates = [a.strip() for a in prefiller.split(",") if a.strip()]
            unknown = [a for a in candidates if not worker.is_registered_prefill(a)]
            if unknown:
                raise APIError(403, f"{PREFILLER_HEADER} names {', '.join(unknown)}, not a registered prefill worker",
                               param=PREFILLER_HEADER)
        outputs = worker.generate(prepared.generate, candidates)
        builder = ResponseBuilder(prepared, preprocessor.model_name)
        if prepared.request.stream:
            return StreamingResponse(builder.sse(outputs), media_type="text/event-stream",
                                     headers={"x-disagg-decode": worker.address})

        async def collect() -> None:
            async for out in outputs:
                builder.add(out)

        await until_disconnect(request, collect())
        metrics.REQUESTS.labels(role=worker.role, status="ok").inc()
        return JSONResponse(builder.response(), headers={"x-disagg-decode": worker.address})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await openai("chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await openai("completion", request)

    return app

