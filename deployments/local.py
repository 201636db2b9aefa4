"""Run the whole stack on a local Ray: what `disagg serve` does."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass

import ray
from ray import serve

from disagg.config import AppConfig
from deployments.app import build_app

log = logging.getLogger(__name__)
APP_NAME = "disagg"


@dataclass
class LocalStack:
    url: str
    dashboard_url: str
    ray_tmpdir: str
    # Ray's Prometheus export (the disagg_* metrics appear there as ray_disagg_*).
    metrics_url: str

    def shutdown(self) -> None:
        # Not `ray stop`: that would kill every Ray on the machine.
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def start_local(config: AppConfig, *, dashboard_port: int = 0, ray_tmpdir: str | None = None,
                num_cpus: int | None = None) -> LocalStack:
    """Start Ray on 127.0.0.1 with its own temp dir and the dashboard, deploy, wait until ready."""
    tmp = ray_tmpdir or tempfile.mkdtemp(prefix="disagg-ray-")
    os.environ.setdefault("RAY_TMPDIR", tmp)
    ctx = _init_ray(config, tmp, dashboard_port, num_cpus)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{config.host}:{config.port}"
    _wait_ready(url, timeout_s=600)
    node = ray._private.worker.global_worker.node
    metrics_url = f"http://{config.host}:{node.metrics_export_port}/metrics"
    return LocalStack(url=url, dashboard_url=f"http://{ctx.dashboard_url}", ray_tmpdir=tmp, metrics_url=metrics_url)


def _init_ray(config: AppConfig, tmp: str, dashboard_port: int, num_cpus: int | None, attempts: int = 3):
    """ray.init on 127.0.0.1. Ray gives its raylet a fixed 30 s to register, which a loaded
    2-core machine can miss: retry a fresh start before giving up."""
    for attempt in range(1, attempts + 1):
        try:
            # Engines on CPU are pinned to cores by config; Ray's logical CPUs only gate placement.
            return ray.init(
                _node_ip_address=config.host,
                _temp_dir=tmp,
                include_dashboard=True,
                dashboard_host=config.host,
                dashboard_port=dashboard_port or None,
                num_cpus=num_cpus if num_cpus is not None else max(os.cpu_count() or 2, 8),
                runtime_env={"env_vars": {"VLLM_NIXL_SIDE_CHANNEL_HOST": config.host, "UCX_NET_DEVICES": "lo",
                                          "TOKENIZERS_PARALLELISM": "false"}},
                logging_level=logging.WARNING,
            )
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            log.warning("Ray did not start in time (attempt %d of %d); retrying", attempt, attempts)
            ray.shutdown()
            time.sleep(5)  # let the first attempt's processes release their ports


def _wait_ready(url: str, timeout_s: float) -> None:
    import asyncio

    import aiohttp

    async def wait() -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"{url}/health") as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError(f"the stack at {url} was not ready after {timeout_s:.0f} s")

    asyncio.run(wait())


def serve_forever(stack: LocalStack) -> None:
    """Block until Ctrl-C or SIGTERM, then shut everything down."""
    stop = threading.Event()
    # ray.init installs a SIGTERM handler that exits without shutting Serve down; ours wins.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("shutting down...", flush=True)
    stack.shutdown()
