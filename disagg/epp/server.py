"""The EPP process's servers, around one scheduler, as GIE's EPP lays them out: ext_proc gRPC
(9002, TLS unless `secure_serving=False`), gRPC health (9003, plaintext, for kubelet probes; also
answered on 9002), HTTP metrics and `/v1/pick` (9090). Both gRPC ports are one
`disagg.epp.h2grpc` server. Port 0 picks a free port; the bound ports are on the returned
`RunningEPP`.

Health answers Check for "", `liveness`, `readiness` and the ext_proc service; readiness follows
whether any decode endpoint is live. Watch is UNIMPLEMENTED, as on GIE's EPP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from grpc_health.v1 import health_pb2

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
from disagg.epp.tls import CERT_FILE, server_context, write_self_signed
from disagg.routing import EndpointPool

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"


class HealthCheck:
    """grpc.health.v1.Health/Check: one request, one answer."""

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
    picker: EndpointPicker
    host: str
    grpc_port: int
    health_port: int
    metrics_port: int
    # The certificate the ext_proc port serves (None: plaintext), for clients to trust.
    cert_file: Path | None = None
    _grpc: GrpcServer | None = None
    _http: uvicorn.Server | None = None
    _serve: asyncio.Task | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _temp_dir: Path | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def pool(self) -> EndpointPool:
        return self.picker.scheduler.pool

    def ready(self) -> bool:
        """Ready once some decode endpoint is live: before that every pick would be a 503."""
        return bool(self.pool.endpoints("decode"))

    async def stop(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
        if self._grpc is not None:
            await self._grpc.stop()
        if self._serve is not None:
            await asyncio.wait([self._serve], timeout=2)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)


async def start_epp(
    picker: EndpointPicker,
    *,
    host: str = "0.0.0.0",
    grpc_port: int = DEFAULT_GRPC_PORT,
    health_port: int = DEFAULT_HEALTH_PORT,
    metrics_port: int = DEFAULT_METRICS_PORT,
    default_body_mode: BodyMode = FULL_DUPLEX_STREAMED,
    secure_serving: bool = True,
    cert_path: Path | None = None,
) -> RunningEPP:
    """Start the EPP's servers in the running event loop. The scheduler's state is kept current
    by whoever runs `scheduler.run(discovery)` (see `disagg.epp.gateway`). `cert_path`: a
    directory with `tls.crt` and `tls.key`; without it a self-signed certificate is made."""
    running = RunningEPP(picker, host, 0, 0, 0)
    tls = None
    if secure_serving:
        if cert_path is None:
            running._temp_dir = cert_path = Path(tempfile.mkdtemp(prefix="disagg-epp-tls-"))
            write_self_signed(cert_path, [host])
        tls = server_context(cert_path)
        running.cert_file = cert_path / CERT_FILE
    statuses: dict[str, int] = {"": _SERVING, LIVENESS: _SERVING, READINESS: _NOT_SERVING,
                                EXT_PROC_SERVICE: _NOT_SERVING}
    processor = ExternalProcessor(picker, default_body_mode=default_body_mode)
    running._grpc = grpc = GrpcServer({PROCESS_PATH: processor.stream, HEALTH_CHECK_PATH: lambda: HealthCheck(statuses)})
    try:
        running.grpc_port = await grpc.listen(host, grpc_port, tls=tls)
        running.health_port = await grpc.listen(host, health_port)
    except OSError as exc:
        await running.stop()
        raise OSError(f"cannot bind the EPP's gRPC ports {host}:{grpc_port} / {health_port}: {exc}") from exc

    async def follow_readiness() -> None:
        while True:
            statuses[READINESS] = statuses[EXT_PROC_SERVICE] = _SERVING if running.ready() else _NOT_SERVING
            await asyncio.sleep(0.1)

    running._tasks.append(asyncio.create_task(follow_readiness(), name="epp-readiness"))

    app = build_http_app(picker, running.ready)
    http = uvicorn.Server(uvicorn.Config(app, host=host, port=metrics_port, log_level="warning", lifespan="off"))
    serve = asyncio.create_task(http.serve(), name="epp-http")
    while not http.started:
        if serve.done():
            with contextlib.suppress(BaseException):
                await running.stop()
            await serve
            raise OSError(f"EPP HTTP server on {host}:{metrics_port} exited")
        await asyncio.sleep(0.01)
    running._http, running._serve = http, serve
    running._tasks.append(serve)
    running.metrics_port = http.servers[0].sockets[0].getsockname()[1]
    log.info("EPP serving ext_proc on %s:%d (%s), health on %d, metrics on %d", host, running.grpc_port,
             "TLS" if tls else "plaintext", running.health_port, running.metrics_port)
    return running
