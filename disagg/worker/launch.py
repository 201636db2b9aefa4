"""Start a worker: its engine, its HTTP endpoint on its own port, its KV-event publisher."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

import uvicorn

from disagg.config import AppConfig
from disagg.engine.vllm_engine import VllmEngine
from disagg.heap import freeze_startup_heap
from disagg.openai.http import OpenAIHTTPProtocol
from disagg.openai.serving import Preprocessor
from disagg.routing.load_channel import LoadPublisher
from disagg.messages import Role
from disagg.worker.server import build_worker_app
from disagg.worker.worker import Worker

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listen(host: str, port: int) -> socket.socket:
    """A listening socket for the worker's HTTP endpoint, bound now (port 0: a free one). The
    engine takes half a minute to start: a port only picked before it, and bound after, was
    taken by then now and again (another process's connection), and the worker never came up."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for the worker's HTTP endpoint: {exc}") from exc
    return sock


def advertised_host(bind_host: str) -> str:
    """The address peers reach this worker at: the bind host, unless it is a wildcard; then the
    pod's IP (set by the Helm chart) or this host's primary address."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    return os.environ.get("POD_IP") or socket.gethostbyname(socket.gethostname())


@dataclass
class RunningWorker:
    worker: Worker
    server: uvicorn.Server
    serve_task: asyncio.Task
    publish_task: asyncio.Task

    @property
    def address(self) -> str:
        return self.worker.address

    async def stop(self) -> None:
        self.publish_task.cancel()
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.serve_task, 5)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.serve_task.cancel()
        await self.worker.close()


async def start_worker(config: AppConfig, role: Role, *, port: int = 0, cpu_bind: str | None = None,
                       replica_id: str | None = None, node_id: str = "") -> RunningWorker:
    """Start the engine, then serve the worker endpoint on `port` (0: a free one)."""
    host = config.host
    public = advertised_host(host)
    listener = listen(host, port)
    port = listener.getsockname()[1]
    events = replay = None
    if config.routing.kv_events:
        # The publisher binds on a wildcard host; subscribers connect to host:port.
        ev_port, replay_port = free_port(host), free_port(host)
        events, replay = f"tcp://*:{ev_port}", f"tcp://*:{replay_port}"
    engine = VllmEngine(config, cpu_bind=cpu_bind, kv_events_endpoint=events, kv_events_replay_endpoint=replay,
                        side_channel_host=public, nixl_side_channel_port=free_port(host))
    try:
        await engine.start()
    except BaseException:
        listener.close()
        raise
    # The load channel: bound now, on the worker's own host (port 0, read back).
    loads = LoadPublisher(host if host not in ("", "::") else "0.0.0.0", lambda: worker.load_reports())
    worker = Worker(
        config, role, engine, f"{public}:{port}", node_id=node_id, replica_id=replica_id,
        kv_events_endpoint=events and events.replace("*", public),
        kv_events_replay_endpoint=replay and replay.replace("*", public),
        load_endpoint=loads.endpoint.replace("0.0.0.0", public),
    )
    publish_task = asyncio.create_task(loads.run(), name="disagg-load-channel")
    preprocessor = Preprocessor(config.model, config.model_name, config.max_model_len)
    app = build_worker_app(worker, preprocessor)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                           http=OpenAIHTTPProtocol, ws="none"))
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:
        if task.done():
            publish_task.cancel()
            await task  # raises the bind error
            raise RuntimeError(f"worker HTTP server on {host}:{port} exited")
        await asyncio.sleep(0.02)
    log.info("%s worker %s serving on %s", role, engine.engine_id, worker.address)
    freeze_startup_heap()
    return RunningWorker(worker, server, task, publish_task)
