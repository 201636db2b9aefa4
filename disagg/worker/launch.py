"""Start a worker: its engine, its HTTP endpoint on its own port, its KV-event publisher.

No port is picked free and bound later (another process takes it in between now and again): the
HTTP port and the load channel are bound here with port 0 and read back; vLLM binds its KV-event
sockets itself, as ipc:// sockets in the worker's runtime directory on a loopback host (local
only, no port at all) or on the worker's address with port 0 (read back from the engine). The one
exception is vLLM's NIXL side channel, whose number vLLM advertises as given: it is picked outside
the kernel's ephemeral range, where only a process binding that very number can take it.

A guard process (`disagg.children.Guard`) ends the engine's processes when this process ends,
however it ends, and removes the runtime directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import tempfile
from dataclasses import dataclass

import uvicorn
from pydantic import SecretStr

from disagg.children import Guard
from disagg.config import AppConfig, is_loopback
from disagg.engine.vllm_engine import VllmEngine
from disagg.heap import freeze_startup_heap
from disagg.openai.http import OpenAIHTTPProtocol
from disagg.openai.serving import Preprocessor
from disagg.routing.load_channel import LoadPublisher
from disagg.messages import Role
from disagg.worker.server import build_worker_app
from disagg.worker.worker import Worker

log = logging.getLogger(__name__)

# The token decode sends to prefill's /internal/prefill, when the config has none (a Secret in
# Kubernetes).
INTERNAL_TOKEN_ENV = "DISAGG_INTERNAL_TOKEN"


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


def kv_event_endpoints(host: str, runtime_dir: str) -> tuple[str, str]:
    """The endpoints vLLM binds for its KV-event publisher and replay socket (it binds only
    wildcard, ipc:// and inproc:// endpoints; tcp://*:0 binds VLLM_HOST_IP, the worker's address,
    on a free port it reports back)."""
    if is_loopback(host):
        return f"ipc://{runtime_dir}/kv-events", f"ipc://{runtime_dir}/kv-events-replay"
    return "tcp://*:0", "tcp://*:0"


def side_channel_port(host: str) -> int:
    """A port for vLLM's NIXL side channel, which vLLM binds only after the engine's half-minute
    start and cannot bind as port 0 (it advertises the number it was given). Taken from below
    the kernel's ephemeral range, which connections and port-0 binds never use."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        port = random.randint(min(10000, low - 1000), low - 1)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise OSError(f"no free port for the NIXL side channel on {host} below {low}")


def with_internal_token(config: AppConfig) -> AppConfig:
    """The config, with the internal token from the environment when it sets none."""
    token = os.environ.get(INTERNAL_TOKEN_ENV)
    if config.internal_token is None and token:
        return config.model_copy(update={"internal_token": SecretStr(token)})
    return config


@dataclass
class RunningWorker:
    worker: Worker
    server: uvicorn.Server
    serve_task: asyncio.Task
    publish_task: asyncio.Task
    guard: Guard

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
        try:
            await self.worker.close()
        finally:
            # What the engine left running (its core's own workers, when the core was killed at
            # the end of its grace period), and the runtime directory.
            await asyncio.to_thread(self.guard.finish)


async def start_worker(config: AppConfig, role: Role, *, port: int = 0, cpu_bind: str | None = None,
                       replica_id: str | None = None, node_id: str = "") -> RunningWorker:
    """Start the engine, then serve the worker endpoint on `port` (0: a free one)."""
    config = with_internal_token(config)
    if config.internal_token is None and role == "prefill":
        log.warning("no internal token (AppConfig.internal_token or $%s): /internal/prefill accepts any caller",
                    INTERNAL_TOKEN_ENV)
    host = config.host
    public = advertised_host(host)
    listener = listen(host, port)
    port = listener.getsockname()[1]
    runtime_dir = tempfile.mkdtemp(prefix="disagg-worker-")
    guard = Guard.start(remove=[runtime_dir])
    try:
        events = replay = None
        if config.routing.kv_events:
            events, replay = kv_event_endpoints(public, runtime_dir)
        engine = VllmEngine(config, cpu_bind=cpu_bind, kv_events_endpoint=events, kv_events_replay_endpoint=replay,
                            side_channel_host=public, runtime_dir=runtime_dir,
                            nixl_side_channel_port=side_channel_port(public) if config.kv_connector == "nixl" else None)
        await engine.start()
    except BaseException:
        listener.close()
        await asyncio.to_thread(guard.finish)
        raise
    # The load channel: bound now, on the worker's own address (port 0, read back).
    loads = LoadPublisher(public, lambda: worker.load_reports())
    worker = Worker(
        config, role, engine, f"{public}:{port}", node_id=node_id, replica_id=replica_id,
        kv_events_endpoint=engine.kv_events_endpoint, kv_events_replay_endpoint=engine.kv_events_replay_endpoint,
        load_endpoint=loads.endpoint,
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
            await asyncio.to_thread(guard.finish)
            await task  # raises the bind error
            raise RuntimeError(f"worker HTTP server on {host}:{port} exited")
        await asyncio.sleep(0.02)
    log.info("%s worker %s serving on %s", role, engine.engine_id, worker.address)
    freeze_startup_heap()
    return RunningWorker(worker, server, task, publish_task, guard)
