"""Router: the OpenAI-compatible ingress. Validates and tokenizes, asks the scheduler for a
prefill/decode pair, and streams from the picked decode replica (pinned by PinnedReplicaRouter)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator

import prometheus_client
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.metrics_bridge import MetricsBridge
from disagg.config import AppConfig
from disagg.heap import freeze_startup_heap
from disagg.engine.base import GenerateOutput, GenerateRequest, RequestRejected
from disagg.openai.errors import APIError
from disagg.openai.http import install_error_handlers, read_json_body, respond
from disagg.openai.serving import Kind, Prepared, Preprocessor, ResponseBuilder, rejected
from disagg.routing import Endpoint, NoEndpointError, OverloadedError, PickRequest, Scheduler
from disagg.routing import metrics
from disagg.messages import WorkerInfo

log = logging.getLogger(__name__)
app = FastAPI(title="disagg router", docs_url=None, redoc_url=None)
install_error_handlers(app)


class RegistryDiscovery:
    """`Discovery` over the Registry deployment: full snapshots every interval."""

    def __init__(self, registry: DeploymentHandle, interval_s: float = 0.5):
        self.registry = registry
        self.interval_s = interval_s

    async def watch(self) -> AsyncIterator[list[WorkerInfo]]:
        while True:
            try:
                yield await self.registry.list.remote()
            except Exception:  # noqa: BLE001 - registry restarting; keep the last snapshot
                log.warning("registry unavailable", exc_info=True)
            await asyncio.sleep(self.interval_s)


async def _cancel_on_close(stream: Any) -> AsyncIterator[GenerateOutput]:
    """Iterate a handle's streaming response; closing this iterator cancels the replica's call
    (so a client disconnect aborts the request on decode, and decode aborts its prefill). A
    request error raised on decode comes out as itself, not wrapped in Ray's RayTaskError."""
    finished = False
    try:
        async for out in stream:
            finished = out.finished
            yield out
    except Exception as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (RequestRejected, APIError)):
            raise cause from None
        raise
    finally:
        if not finished:
            with contextlib.suppress(Exception):
                stream.cancel()


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Router:
    def __init__(self, config: AppConfig, decode: DeploymentHandle, prefill: DeploymentHandle | None,
                 registry: DeploymentHandle):
        self.config = config
        self.decode = decode
        # Held so the prefill deployment is part of the application (None: no prefill role).
        self.prefill = prefill
        self.preprocessor = Preprocessor(config.model, config.model_name, config.max_model_len)
        self.scheduler = Scheduler(config.routing, model=config.model_name, block_size=config.block_size)
        loop = asyncio.get_event_loop()
        self._discovery = loop.create_task(self.scheduler.run(RegistryDiscovery(registry)))
        self._metrics = loop.create_task(MetricsBridge().run())
        freeze_startup_heap()  # a full GC pass over the start-up heap stalled every stream

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        decodes = self.scheduler.pool.endpoints("decode")
        if not decodes:
            raise APIError(503, "no decode worker is ready")
        return {"status": "ok", "decode": len(decodes), "prefill": len(self.scheduler.pool.endpoints("prefill"))}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return self.preprocessor.models().model_dump()

    @app.get("/metrics")
    async def metrics(self) -> Response:
        return Response(prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/v1/pool")
    async def pool(self) -> list[dict[str, Any]]:
        return self.workers()

    def workers(self) -> list[dict[str, Any]]:
        """The scheduler's pool: every worker, its load and how fresh that knowledge is."""
        return self.scheduler.pool.snapshot()

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._serve("chat", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve("completion", request)

    async def _serve(self, kind: Kind, request: Request) -> Response:
        body = await read_json_body(request, self.config.max_request_bytes)
        prepared, stream, headers = await self._dispatch(kind, body)
        return await respond(request, prepared, stream, self.config.model_name, headers)

    async def openai(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        """The same API for Python callers holding a handle (no HTTP): a non-streaming OpenAI
        response body; errors raise APIError with the status a client would see."""
        prepared, stream, _ = await self._dispatch(kind, json.dumps(body).encode())
        builder = ResponseBuilder(prepared, self.config.model_name)
        try:
            async for out in stream:
                builder.add(out)
        except RequestRejected as e:
            raise rejected(prepared, e) from None
        return builder.response()

    async def _dispatch(self, kind: Kind, raw: bytes
                        ) -> tuple[Prepared, AsyncIterator[GenerateOutput], dict[str, str]]:
        """Validate, tokenize (off the event loop), pick a pair, and start streaming from the
        picked decode replica."""
        prepared = await self.preprocessor.prepare_async(kind, raw)
        try:
            pick = self.scheduler.pick(PickRequest(model=self.config.model_name,
                                                   prompt_token_ids=prepared.generate.prompt_token_ids))
        except OverloadedError as e:
            raise APIError(429, str(e)) from None
        except NoEndpointError as e:
            raise APIError(503, str(e)) from None
        decode = pick.decode[0]
        # x-disagg-pd is the outcome (decode's, on the first output), not pick.decision: decode
        # may fall back to a local prefill.
        headers = {"x-disagg-decode": decode.address}
        return prepared, self._migrating(prepared, decode, pick.prefill_addresses), headers

    def _stream(self, request: GenerateRequest, decode: Endpoint, prefill: list[str]) -> AsyncIterator[GenerateOutput]:
        return _cancel_on_close(self.decode.options(stream=True).generate.remote(
            request, prefill, pin=decode.info.replica_id))

    async def _migrating(self, prepared: Prepared, decode: Endpoint, prefill: list[str]) -> AsyncIterator[GenerateOutput]:
        """Stream from `decode`; if it dies mid-stream, go on from another decode with the prompt
        plus the tokens generated so far (at most `migration_limit` times): the client's stream
        continues with no token missing or repeated, and under greedy decoding the answer equals
        the unbroken one. Errors of the request itself (a 4xx) are not failures of the decode."""
        request, generated, dead = prepared.generate, [], set()
        migrations = 0
        while True:
            try:
                async for out in self._stream(request, decode, prefill):
                    if migrations:  # usage counts the client's prompt, not the re-submitted one
                        out.num_prompt_tokens = len(prepared.generate.prompt_token_ids)
                    generated.extend(out.token_ids)
                    yield out
                return
            except (RequestRejected, APIError):
                raise
            except Exception as exc:  # the replica or its engine died
                sampling = request.sampling
                if migrations >= self.config.migration_limit or sampling.n > 1 or len(generated) >= sampling.max_tokens:
                    raise
                dead.add(decode.address)
                others = [e.address for e in self.scheduler.pool.endpoints("decode") if e.address not in dead]
                if not others:
                    raise
                migrations += 1
                metrics.MIGRATIONS.inc()
                log.warning("decode %s failed mid-stream (%s: %s); migrating request %s with %d tokens generated",
                            decode.address, type(exc).__name__, exc, request.request_id, len(generated))
                request = request.model_copy(update={
                    "request_id": f"{prepared.generate.request_id}-m{migrations}",
                    "prompt_token_ids": prepared.generate.prompt_token_ids + generated,
                    "sampling": sampling.model_copy(update={
                        "max_tokens": prepared.generate.sampling.max_tokens - len(generated),
                        "min_tokens": max(0, prepared.generate.sampling.min_tokens - len(generated))}),
                    "kv_transfer_params": None,
                })
                pick = self.scheduler.pick(PickRequest(model=self.config.model_name,
                                                       prompt_token_ids=request.prompt_token_ids, subset=others))
                decode, prefill = pick.decode[0], pick.prefill_addresses

    def __del__(self) -> None:
        self._discovery.cancel()
        self._metrics.cancel()
