"""The gateway path in one object: a scheduler following discovery, the EPP serving it, and a
real Envoy in front of the workers' own HTTP endpoints, routed by the EPP.

    gateway = await start_gateway(config, StaticDiscovery([...]), gateway_port=8080)   # async
    gateway = start_gateway_thread(config, discovery, gateway_port=8080)               # sync callers
    gateway.url; gateway.stop()

The EPP can be restarted under a running Envoy (`restart_epp`): the new one starts with empty
state on the same ports (and the same certificate) and rebuilds it from discovery, scrapes and KV
event replay. Envoy speaks TLS to the EPP unless `secure_serving=False`, trusting the EPP's
certificate (its `ca.crt` when the certificate directory has one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

from disagg.config import AppConfig
from disagg.epp.envoy import EDS_FILE, EnvoyProcess, EnvoySettings, write_endpoints
from disagg.epp.picker import EndpointPicker
from disagg.epp.prompt import PromptReader, RawPromptReader, TokenizingReader
from disagg.epp.server import RunningEPP, start_epp
from disagg.epp.tls import CERT_FILE, write_self_signed
from disagg.routing import Discovery, EndpointPool, Scheduler
from disagg.routing.peers import PeerDiscovery, PeerSync

log = logging.getLogger(__name__)

T = TypeVar("T")


def make_reader(config: AppConfig) -> PromptReader:
    """Tokenize like the workers when the model directory is here; else read prompts raw."""
    model_dir = Path(config.model)
    if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists():
        return TokenizingReader(str(model_dir), config.model_name, config.max_model_len)
    log.warning("no tokenizer in %s: prefix affinity from routing decisions only", model_dir)
    return RawPromptReader(config.model_name)


async def follow_decode_endpoints(pool: EndpointPool, eds_dir: Path, interval_s: float = 0.05) -> None:
    """Keep Envoy's `workers` cluster equal to the pool's decode endpoints. A restarted EPP starts
    with an empty pool: until it has found a decode, Envoy keeps the upstreams it has (emptying
    them would answer every request in that window with Envoy's own 503)."""
    last: set[str] | None = None
    while True:
        current = {e.address for e in pool.endpoints("decode", include_dead=True)}
        if current != last and (current or last is not None):
            await asyncio.to_thread(write_endpoints, eds_dir, current)
            log.info("gateway upstreams: %s", sorted(current))
            last = current
        await asyncio.sleep(interval_s)


# How long each step of a stop may take before it is logged and left behind: a stop must end.
STOP_STEP_S = 10.0


async def _settle(tasks: list[asyncio.Task], timeout_s: float, what: str) -> None:
    """Wait for `tasks` to end, at most `timeout_s`; log those that did not."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        log.warning("%s: %s still running after %.0f s, left behind", what, task.get_name(), timeout_s)


class Gateway:
    def __init__(
        self,
        config: AppConfig,
        discovery: Discovery,
        *,
        gateway_port: int | None,
        host: str | None = None,
        epp_host: str = "127.0.0.1",
        grpc_port: int = 0,
        health_port: int = 0,
        metrics_port: int = 0,
        eds_dir: Path | None = None,
        reader: PromptReader | None = None,
        envoy_log_level: str = "warning",
        secure_serving: bool = True,
        cert_path: Path | None = None,
        peers: PeerDiscovery | None = None,
        peer_port: int = 0,
        replica_id: str = "epp",
        body_mode: str = "BUFFERED",
    ) -> None:
        self.config = config
        self.discovery = discovery
        self.gateway_port = gateway_port
        self.host = host or config.host
        self.epp_host = epp_host
        self._ports = (grpc_port, health_port, metrics_port)
        self._owns_eds_dir = eds_dir is None
        self.eds_dir = Path(eds_dir) if eds_dir is not None else Path(tempfile.mkdtemp(prefix="disagg-gateway-"))
        self.reader = reader
        self.envoy_log_level = envoy_log_level
        self.secure_serving = secure_serving
        self.cert_path = cert_path
        self.peers = peers
        self.peer_port = peer_port
        self.replica_id = replica_id
        self.body_mode = body_mode  # how Envoy sends the body to the EPP (disagg.epp.envoy.BODY_MODES)
        self.peer_sync: PeerSync | None = None
        self.scheduler: Scheduler | None = None
        self.epp: RunningEPP | None = None
        self.envoy: EnvoyProcess | None = None
        self.url: str | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> "Gateway":
        self.eds_dir.mkdir(parents=True, exist_ok=True)
        if not (self.eds_dir / EDS_FILE).exists():  # a restarted replica leaves Envoy's list as it is
            write_endpoints(self.eds_dir, [])
        if self.reader is None:
            self.reader = await asyncio.to_thread(make_reader, self.config)
        epp_target = "127.0.0.1" if self.epp_host in ("0.0.0.0", "::") else self.epp_host
        if self.secure_serving and self.cert_path is None:  # made once: a restarted EPP serves the same
            self.cert_path = self.eds_dir / "epp-tls"
            await asyncio.to_thread(write_self_signed, self.cert_path, [epp_target])
        await self._start_epp()
        if self.gateway_port is None:
            return self
        assert self.epp is not None
        trusted = None
        if self.cert_path is not None and self.secure_serving:
            trusted = next(p for p in (self.cert_path / "ca.crt", self.cert_path / CERT_FILE) if p.exists())
        envoy = EnvoyProcess(
            EnvoySettings(listen_host=self.host, listen_port=self.gateway_port, epp_host=epp_target,
                          epp_port=self.epp.grpc_port, eds_dir=self.eds_dir,
                          request_timeout_s=self.config.request_timeout_s, epp_trusted_ca=trusted,
                          request_body_mode=self.body_mode, max_request_bytes=self.config.max_request_bytes,
                          flow_control_ttl_s=self.config.routing.flow_control.ttl_s),
            log_level=self.envoy_log_level,
        )
        try:
            await envoy.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.stop()
            raise
        self.envoy = envoy
        self.url = envoy.url
        log.info("gateway listening on %s (EPP %s)", self.url, self.epp.grpc_address)
        return self

    async def _start_epp(self) -> None:
        assert self.reader is not None
        scheduler = Scheduler(self.config.routing, model=self.config.model_name, block_size=self.config.block_size)
        grpc_port, health_port, metrics_port = self._ports
        picker = EndpointPicker(scheduler, self.reader, max_request_bytes=self.config.max_request_bytes)
        self.epp = await start_epp(picker, host=self.epp_host, grpc_port=grpc_port,
                                   health_port=health_port, metrics_port=metrics_port,
                                   secure_serving=self.secure_serving, cert_path=self.cert_path)
        # A restarted EPP comes back on the same ports: Envoy's cluster points there.
        self._ports = (self.epp.grpc_port, self.epp.health_port, self.epp.metrics_port)
        self.scheduler = scheduler
        self._tasks = [
            asyncio.create_task(scheduler.run(self.discovery), name="disagg-scheduler"),
            asyncio.create_task(follow_decode_endpoints(scheduler.pool, self.eds_dir), name="disagg-eds"),
        ]
        if self.peers is not None:
            self.peer_sync = PeerSync(scheduler, self.replica_id, host=self.epp_host, port=self.peer_port)
            self.peer_port = int(self.peer_sync.endpoint.rpartition(":")[2])  # a restart binds the same
            self._tasks.append(asyncio.create_task(self.peer_sync.run(self.peers), name="disagg-peers"))

    async def _stop_epp(self) -> None:
        for task in self._tasks:
            task.cancel()
        await _settle(self._tasks, STOP_STEP_S, "scheduler tasks")
        self._tasks = []
        if self.epp is not None:
            await _settle([asyncio.ensure_future(self.epp.stop())], STOP_STEP_S, "EPP servers")
            self.epp = None

    async def restart_epp(self) -> None:
        """Stop the EPP and its scheduler, then start fresh ones (empty state) on the same ports."""
        await self._stop_epp()
        await self._start_epp()

    async def stop(self) -> None:
        await self._stop_epp()
        if self.envoy is not None:
            await self.envoy.stop()
            self.envoy = None
        if self._owns_eds_dir:
            shutil.rmtree(self.eds_dir, ignore_errors=True)


async def start_gateway(config: AppConfig, discovery: Discovery, *, gateway_port: int | None, **kwargs: Any) -> Gateway:
    """Start the scheduler (following `discovery`), the EPP and, when `gateway_port` is not None,
    Envoy on host:gateway_port (0: a free port; see `.url`). Keyword arguments: see `Gateway`."""
    return await Gateway(config, discovery, gateway_port=gateway_port, **kwargs).start()


class GatewayThread:
    """A `Gateway` on its own event loop in a daemon thread, for synchronous callers
    (`disagg serve --gateway`, tests)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="disagg-gateway", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the gateway's loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def call(self, fn: Callable[[], T], timeout: float | None = 10) -> T:
        """Run `fn()` on the gateway's loop (where the scheduler's state lives)."""
        async def _call() -> T:
            return fn()
        return self.run(_call(), timeout)

    @property
    def url(self) -> str | None:
        return self.gateway.url

    @property
    def scheduler(self) -> Scheduler | None:
        return self.gateway.scheduler

    def restart_epp(self) -> None:
        self.run(self.gateway.restart_epp(), 60)

    def stop(self) -> None:
        try:
            self.run(self.gateway.stop(), 60)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("gateway stop: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def start_gateway_thread(config: AppConfig, discovery: Discovery, *, gateway_port: int | None = 0,
                         **kwargs: Any) -> GatewayThread:
    """`start_gateway` for synchronous callers: returns once Envoy and the EPP are up."""
    thread = GatewayThread(Gateway(config, discovery, gateway_port=gateway_port, **kwargs))
    try:
        thread.run(thread.gateway.start(), 120)
    except BaseException:
        thread.loop.call_soon_threadsafe(thread.loop.stop)
        raise
    return thread
