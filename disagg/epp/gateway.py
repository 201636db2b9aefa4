"""The gateway path in one call: a scheduler following discovery, the EPP serving it, and a real
Envoy in front of the workers' own HTTP endpoints, routed by the EPP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from disagg.config import AppConfig
from disagg.epp.envoy import EnvoyProcess, EnvoySettings, free_port, write_endpoints
from disagg.epp.prompt import PromptReader, RawPromptReader, TokenizingReader
from disagg.epp.server import RunningEPP, start_epp
from disagg.routing import Discovery, Scheduler

log = logging.getLogger(__name__)


def make_reader(config: AppConfig) -> PromptReader:
    """Tokenize like the workers when the model directory is here; else read prompts raw."""
    model_dir = Path(config.model)
    if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists():
        return TokenizingReader(str(model_dir), config.model_name, config.max_model_len)
    log.warning("no tokenizer in %s: prefix affinity from routing decisions only", model_dir)
    return RawPromptReader(config.model_name)


async def follow_decode_endpoints(scheduler: Scheduler, eds_dir: Path, interval_s: float = 0.05) -> None:
    """Keep Envoy's `workers` cluster equal to the pool's decode endpoints."""
    last: set[str] | None = None
    while True:
        current = {e.address for e in scheduler.pool.endpoints("decode", include_dead=True)}
        if current != last:
            await asyncio.to_thread(write_endpoints, eds_dir, current)
            log.info("gateway upstreams: %s", sorted(current))
            last = current
        await asyncio.sleep(interval_s)


@dataclass
class RunningGateway:
    scheduler: Scheduler
    epp: RunningEPP
    envoy: EnvoyProcess | None
    url: str | None
    eds_dir: Path
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _owns_eds_dir: bool = False

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.envoy is not None:
            await self.envoy.stop()
        await self.epp.stop()
        if self._owns_eds_dir:
            shutil.rmtree(self.eds_dir, ignore_errors=True)


async def start_gateway(
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
) -> RunningGateway:
    """Start the scheduler (following `discovery`), the EPP and, when `gateway_port` is not None,
    Envoy listening on host:gateway_port (0: a free port; see `.url`). With `eds_dir`, the decode
    endpoints are also written there for an Envoy run by someone else."""
    scheduler = Scheduler(config.routing, model=config.model_name, block_size=config.block_size)
    epp = await start_epp(scheduler, reader or make_reader(config), host=epp_host, grpc_port=grpc_port,
                          health_port=health_port, metrics_port=metrics_port)
    owns = eds_dir is None
    eds = Path(eds_dir) if eds_dir is not None else Path(tempfile.mkdtemp(prefix="disagg-gateway-"))
    eds.mkdir(parents=True, exist_ok=True)
    write_endpoints(eds, [])
    tasks = [
        asyncio.create_task(scheduler.run(discovery), name="disagg-scheduler"),
        asyncio.create_task(follow_decode_endpoints(scheduler, eds), name="disagg-eds"),
    ]
    gateway = RunningGateway(scheduler, epp, None, None, eds, tasks, owns)
    if gateway_port is None:
        return gateway
    listen_host = host or config.host
    port = gateway_port or free_port(listen_host)
    epp_target = "127.0.0.1" if epp_host in ("0.0.0.0", "::") else epp_host
    envoy = EnvoyProcess(
        EnvoySettings(listen_host=listen_host, listen_port=port, epp_host=epp_target, epp_port=epp.grpc_port,
                      admin_port=free_port(), eds_dir=eds, request_timeout_s=config.request_timeout_s),
        log_level=envoy_log_level,
    )
    try:
        await envoy.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await gateway.stop()
        raise
    gateway.envoy = envoy
    gateway.url = f"http://{listen_host}:{port}"
    log.info("gateway listening on %s (EPP %s)", gateway.url, epp.grpc_address)
    return gateway
