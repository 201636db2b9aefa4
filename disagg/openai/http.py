"""FastAPI glue the router and the worker endpoint share: error handlers (every error in
OpenAI's body), reading a JSON body within its size limit, and turning an engine output stream
into an OpenAI response (JSON or SSE) that stops the work when the client leaves.

Where the prompt was prefilled is reported as it happened, not as it was planned: `remote` (a
prefill worker computed it and decode pulled its KV), `local` (decode prefilled it: a short or
cached prompt, or no prefill worker), `local_fallback` (a prefill worker was picked but every one
tried failed, so decode prefilled it). The status line waits for the first output, when this is
known, so the header `x-disagg-pd` is exact on JSON answers and streams alike; a stream also
carries it as `"disagg": {"pd": ...}` in its last chunk before `[DONE]` (the usage chunk when
`stream_options.include_usage` is set, else the final finish chunk)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from disagg.engine.base import GenerateOutput, RequestRejected
from disagg.openai.body import check_json_content_type, shorten
from disagg.openai.errors import APIError, error_body
from disagg.openai.serving import Prepared, ResponseBuilder, rejected

log = logging.getLogger(__name__)
T = TypeVar("T")


class ErrorResponse(JSONResponse):
    """An error body, ASCII-escaped: a message quoting what a client sent always encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return ErrorResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        # Starlette's own answers (no such path, wrong method) in OpenAI's words and body.
        where = f"{request.method} {shorten(request.url.path)}"
        message = {404: f"Invalid URL ({where})", 405: f"Method not allowed ({where})"}.get(e.status_code,
                                                                                          str(e.detail))
        return ErrorResponse(error_body(e.status_code, message), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = (e.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        return ErrorResponse(error_body(400, f"{param}: {first.get('msg')}", param=param), status_code=400)

    @app.websocket_route("/{path:path}")
    async def _no_websocket(websocket: WebSocket) -> None:
        # No endpoint of ours speaks WebSocket; uvicorn's own refusal of the handshake is a bare 403.
        refusal = ErrorResponse(error_body(404, f"Invalid URL (WebSocket {shorten(websocket.url.path)})"),
                                status_code=404)
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            await websocket.send_denial_response(refusal)
        else:
            await websocket.close()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ErrorResponse(error_body(500, f"internal error: {type(e).__name__}"), status_code=500)


async def read_json_body(request: Request, max_bytes: int) -> bytes:
    """A POST's JSON body: 415 unless it says it is JSON, 413 past `max_bytes` (from its
    Content-Length before reading a byte, or as the bytes arrive)."""
    check_json_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"request body is larger than {max_bytes} bytes (max_request_bytes)",
                    code="request_too_large")


class OpenAIHTTPProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol (httptools or h11), answering bytes that are not HTTP with
    OpenAI's error body instead of text/plain. Pass it as `uvicorn.Config(http=...)`, with
    `ws="none"` (no endpoint of ours speaks WebSocket)."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error_body(400, msg)).encode()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


async def until_disconnect(request: Request, work: Awaitable[T],
                           on_abandon: Callable[[T], Awaitable[Any]] | None = None) -> T:
    """Run `work`; if the client disconnects first, cancel it. A result that finished but whose
    client is gone goes to `on_abandon` (prefill uses it to free the handed-off blocks)."""
    task = asyncio.ensure_future(work)
    while True:
        try:
            done, _ = await asyncio.wait({task}, timeout=0.05)
        except asyncio.CancelledError:
            # This handler is cancelled (the server's own disconnect handling): so is the work,
            # before anyone closes the stream it is reading.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise
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
    """The answer: JSON, or SSE when asked for. Either way the status line waits for the first
    output, so `x-disagg-pd` says where the prompt was prefilled as it happened, and an engine's
    refusal of the options (RequestRejected) is a 400 rather than an error event."""
    builder = ResponseBuilder(prepared, model_name)
    headers = dict(headers or {})
    streaming = prepared.request.stream
    try:
        if streaming:
            first = await until_disconnect(request, _first(outputs))
            if first is not None:
                builder.pd = first.pd
        else:
            async def collect() -> None:
                async for out in outputs:
                    builder.add(out)

            await until_disconnect(request, collect())
    except RequestRejected as e:
        await _close(outputs)
        raise rejected(prepared, e) from None
    except BaseException:
        await _close(outputs)
        raise
    if builder.pd is not None:
        headers["x-disagg-pd"] = builder.pd
    if streaming:
        return StreamingResponse(builder.sse(_resumed(first, outputs)), media_type="text/event-stream",
                                 headers=headers)
    await _close(outputs)
    return JSONResponse(builder.response(), headers=headers)


async def _first(outputs: AsyncIterator[GenerateOutput]) -> GenerateOutput | None:
    return await anext(outputs, None)


async def _resumed(first: GenerateOutput | None, rest: AsyncIterator[GenerateOutput]) -> AsyncIterator[GenerateOutput]:
    """`rest` with its first output, taken before the status line, put back in front."""
    try:
        if first is not None:
            yield first
            async for out in rest:
                yield out
    finally:
        await _close(rest)


async def _close(outputs: AsyncIterator[GenerateOutput]) -> None:
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        await aclose()
