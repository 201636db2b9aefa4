"""The EPP process's servers, around one scheduler: ext_proc gRPC (9002), gRPC health (9003,
also answered on 9002), HTTP metrics and `/v1/pick` (9090). Port 0 picks a free port; the bound
ports are on the returned `RunningEPP`.

The ext_proc port is served by `disagg.epp.h2grpc` (our HTTP/2 server on the event loop: a
third of grpcio's CPU per stream; its C engine answers ext_proc with one Python call per request)
unless `ext_proc_server="grpcio"`. There it answers the health
service's Check; Watch is on the health port, which grpcio serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Literal

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from disagg.epp.ext_proc import FULL_DUPLEX_STREAMED, BodyMode, ExternalProcessor
from disagg.epp.h2grpc import GrpcError, GrpcServer
from disagg.epp.h2wire import NOT_FOUND
from disagg.epp.http import build_http_app
from disagg.epp.picker import EndpointPicker
from disagg.epp.prompt import PromptReader
from disagg.epp.protocol import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HEALTH_PORT,
    DEFAULT_METRICS_PORT,
    EXT_PROC_SERVICE,
    LIVENESS,
    PROCESS_PATH,
    READINESS,
)
from disagg.routing import Scheduler

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"

# h2: our HTTP/2 server, its C engine where built (else the Python one); h2-python: the Python
# engine; grpcio: grpcio's server.
ExtProcServer = Literal["h2", "h2-python", "grpcio"]


class Health:
    """The EPP's health statuses, for grpcio's Health service and for `check_stream`."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.statuses: dict[str, int] = {}

    async def set(self, service: str, status: int) -> None:
        self.statuses[service] = status
        await self.servicer.set(service, status)

    def check_stream(self) -> _HealthCheck:
        return _HealthCheck(self.statuses)


class _HealthCheck:
    """grpc.health.v1.Health/Check on `disagg.epp.h2grpc`."""

    finished = False  # answers the request message, ends with the client's end of stream

    def __init__(self, statuses: dict[str, int]) -> None:
        self.statuses = statuses

    def message(self, payload: bytes) -> list[bytes]:
        service = health_pb2.HealthCheckRequest.FromString(payload).service
        if service not in self.statuses:
            raise GrpcError(NOT_FOUND, f"unknown service {service!r}")
        return [health_pb2.HealthCheckResponse(status=self.statuses[service]).SerializeToString()]

    def end(self) -> list[bytes]:
        return []


@dataclass
class RunningEPP:
    scheduler: Scheduler
    picker: EndpointPicker
    host: str
    grpc_port: int
    health_port: int
    metrics_port: int
    _grpc: list[grpc.aio.Server] = field(default_factory=list)
    _h2: GrpcServer | None = None
    _http: uvicorn.Server | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _serve: asyncio.Task | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def ready(self) -> bool:
        """Ready once some decode endpoint is live: before that every pick would be a 503."""
        return bool(self.scheduler.pool.endpoints("decode"))

    async def stop(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
        stops = [s.stop(grace=0.1) for s in self._grpc] + ([self._h2.stop()] if self._h2 is not None else [])
        await asyncio.gather(*stops, return_exceptions=True)
        if self._serve is not None:
            await asyncio.wait([self._serve], timeout=2)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def start_epp(
    scheduler: Scheduler,
    reader: PromptReader,
    *,
    host: str = "0.0.0.0",
    grpc_port: int = DEFAULT_GRPC_PORT,
    health_port: int = DEFAULT_HEALTH_PORT,
    metrics_port: int = DEFAULT_METRICS_PORT,
    default_body_mode: BodyMode = FULL_DUPLEX_STREAMED,
    ext_proc_server: ExtProcServer = "h2",
) -> RunningEPP:
    """Start the EPP's servers in the running event loop. The scheduler's state is kept current
    by whoever runs `scheduler.run(discovery)` (see `disagg.epp.cli.run_epp`)."""
    picker = EndpointPicker(scheduler, reader)
    processor = ExternalProcessor(picker, default_body_mode=default_body_mode)
    board = Health()
    servers: list[grpc.aio.Server] = []
    h2: GrpcServer | None = None
    if ext_proc_server != "grpcio":
        h2 = GrpcServer({PROCESS_PATH: processor.stream, HEALTH_CHECK_PATH: board.check_stream},
                        native=processor.native_method(), engine="python" if ext_proc_server == "h2-python" else None)
        try:
            bound_grpc = await h2.start(host, grpc_port)
        except OSError as exc:
            raise OSError(f"cannot bind the EPP's ext_proc port {host}:{grpc_port}: {exc}") from exc
    else:
        main = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        main.add_generic_rpc_handlers((processor.grpc_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(board.servicer, main)
        bound_grpc = main.add_insecure_port(f"{host}:{grpc_port}")
        servers.append(main)
    health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(board.servicer, health_server)
    bound_health = health_server.add_insecure_port(f"{host}:{health_port}")
    servers.append(health_server)
    if not bound_grpc or not bound_health:
        if h2 is not None:
            await h2.stop()
        raise OSError(f"cannot bind the EPP's gRPC ports {host}:{grpc_port} / {health_port}")
    for server in servers:
        await server.start()

    running = RunningEPP(scheduler, picker, host, bound_grpc, bound_health, 0, _grpc=servers, _h2=h2)
    await board.set(LIVENESS, _SERVING)
    await board.set("", _SERVING)

    async def follow_readiness() -> None:
        last = None
        while True:
            status = _SERVING if running.ready() else _NOT_SERVING
            if status != last:
                await board.set(READINESS, status)
                await board.set(EXT_PROC_SERVICE, status)
                last = status
            await asyncio.sleep(0.1)

    running._tasks.append(asyncio.create_task(follow_readiness(), name="epp-readiness"))

    app = build_http_app(picker, running.ready)
    config = uvicorn.Config(app, host=host, port=metrics_port, log_level="warning", lifespan="off")
    http = uvicorn.Server(config)
    serve = asyncio.create_task(http.serve(), name="epp-http")
    while not http.started:
        if serve.done():
            with contextlib.suppress(BaseException):
                await running.stop()
            await serve
            raise OSError(f"EPP HTTP server on {host}:{metrics_port} exited")
        await asyncio.sleep(0.01)
    running._http = http
    running._serve = serve
    running._tasks.append(serve)
    running.metrics_port = http.servers[0].sockets[0].getsockname()[1]
    log.info("EPP serving ext_proc on %s:%d, health on %d, metrics on %d",
             host, running.grpc_port, running.health_port, running.metrics_port)
    return running
