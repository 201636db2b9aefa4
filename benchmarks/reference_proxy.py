"""The reference P/D proxy: what vLLM's disaggregated-serving example proxy does, and no more.

For each request: pick the next prefill server and the next decode server (round robin each), send
the request to prefill with `max_tokens=1`, no streaming and `kv_transfer_params.do_remote_decode`,
then send the original request to decode with the `kv_transfer_params` prefill returned, and
stream decode's answer back. No retries, no health checks, no load or prefix awareness: the
baseline an orchestrator must beat. From the repository root:

    python -m benchmarks.reference_proxy --port 8000 \
        --prefill 127.0.0.1:8100 --decode 127.0.0.1:8200
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import uuid
from typing import Any, AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}


class RoundRobin:
    """Servers of one role, taken in turn."""

    def __init__(self, addresses: list[str]):
        if not addresses:
            raise ValueError("at least one server per role")
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.clients = [httpx.AsyncClient(base_url=f"http://{a}/v1", timeout=None, limits=limits) for a in addresses]
        self._turn = itertools.cycle(range(len(self.clients)))

    def next(self) -> httpx.AsyncClient:
        return self.clients[next(self._turn)]

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg: one token, no stream, and ask the server to keep the KV for a remote decode."""
    out = dict(body, kv_transfer_params=dict(PREFILL_PARAMS), stream=False, max_tokens=1)
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    for key in ("stream_options", "min_tokens", "min_completion_tokens"):
        out.pop(key, None)
    return out


def build_app(prefill: list[str], decode: list[str]) -> FastAPI:
    prefills, decodes = RoundRobin(prefill), RoundRobin(decode)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await prefills.aclose()
        await decodes.aclose()

    app = FastAPI(title="reference P/D proxy", docs_url=None, redoc_url=None, lifespan=lifespan)

    async def handle(path: str, request: Request) -> Any:
        body = await request.json()
        headers = {"X-Request-Id": str(uuid.uuid4())}
        p = await prefills.next().post(path, json=prefill_body(body), headers=headers)
        if p.status_code != 200:
            return JSONResponse(p.json(), status_code=p.status_code)
        params = p.json().get("kv_transfer_params")
        if params:
            body["kv_transfer_params"] = params
        client = decodes.next()
        if not body.get("stream"):
            d = await client.post(path, json=body, headers=headers)
            return JSONResponse(d.json(), status_code=d.status_code)

        async def stream() -> AsyncIterator[bytes]:
            async with client.stream("POST", path, json=body, headers=headers) as resp:
                async for chunk in resp.aiter_bytes():
                    yield chunk

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle("/completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await handle("/chat/completions", request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "prefill": len(prefills.clients), "decode": len(decodes.clients)}

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="reference_proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prefill", required=True, help="host:port,... of prefill vLLM servers")
    p.add_argument("--decode", required=True, help="host:port,... of decode vLLM servers")
    args = p.parse_args(argv)
    app = build_app(args.prefill.split(","), args.decode.split(","))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
