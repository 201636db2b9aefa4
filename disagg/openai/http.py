"""FastAPI glue the router and the worker endpoint share: error handlers, and turning an engine
output stream into an OpenAI response (JSON or SSE) that stops the work when the client leaves."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from disagg.engine.base import GenerateOutput
from disagg.openai.errors import APIError, error_body
from disagg.openai.serving import Prepared, ResponseBuilder

log = logging.getLogger(__name__)
T = TypeVar("T")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}"), status_code=500)


async def until_disconnect(request: Request, work: Awaitable[T],
                           on_abandon: Callable[[T], Awaitable[Any]] | None = None) -> T:
    """Run `work`; if the client disconnects first, cancel it. A result that finished but whose
    client is gone goes to `on_abandon` (prefill uses it to free the handed-off blocks)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.05)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            try:
                result = await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone
                raise APIError(499, "client disconnected") from None
            if on_abandon is not None:
                await on_abandon(result)
            raise APIError(499, "client disconnected")


async def respond(request: Request, prepared: Prepared, outputs: AsyncIterator[GenerateOutput],
                  model_name: str, headers: dict[str, str] | None = None) -> Response:
    builder = ResponseBuilder(prepared, model_name)
    if prepared.request.stream:
        return StreamingResponse(builder.sse(outputs), media_type="text/event-stream", headers=headers)

    async def collect() -> None:
        async for out in outputs:
            builder.add(out)

    try:
        await until_disconnect(request, collect())
    finally:
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()
    return JSONResponse(builder.response(), headers=headers)
