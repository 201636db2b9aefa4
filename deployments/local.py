"""Run the whole stack on a local Ray: what `disagg serve`'s driver does.

Lifecycle: `start_local()` starts Ray, deploys the application and returns once every
deployment is running and the router answers, or raises `StartFailed` at the first replica that
failed to start (with its error: a setting the engine refuses fails the same way every time);
`wait_for_stop()` until SIGINT or SIGTERM; `stop_local()` stops Serve, then Ray, each within a
bound, and ends whatever this process started that is still running.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable

import ray
from ray import serve

from disagg.children import descendants, end_processes, remove_paths
from disagg.config import AppConfig, is_loopback
from deployments.app import build_app

log = logging.getLogger(__name__)
APP_NAME = "disagg"
# Bounds on the steps of a stop: the whole stop must end within 30 s.
SERVE_STOP_S = 12.0
RAY_STOP_S = 8.0


class StopRequested(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, as KeyboardInterrupt: no `except Exception`
    in the way may swallow it)."""


class StartFailed(RuntimeError):
    """A deployment's replica failed to start; the message holds its error."""


@dataclass
class LocalStack:
    url: str
    dashboard_url: str
    ray_tmpdir: str
    # Ray's Prometheus export (the disagg_* metrics appear there as ray_disagg_*).
    metrics_url: str


def _raise_stop(signum: int, frame: object) -> None:
    raise StopRequested(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise StopRequested in the main thread. ray.init installs a SIGTERM
    handler of its own that exits without stopping Serve: call this again after it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)


def with_internal_token(config: AppConfig) -> AppConfig:
    """The config with an internal token for the workers' calls to each other: the configured
    one, or a fresh one for this stack."""
    if config.internal_token is not None:
        return config
    return config.with_overrides(internal_token=secrets.token_urlsafe(32))


def start_local(config: AppConfig, *, dashboard_port: int = 0, ray_tmpdir: str | None = None,
                num_cpus: int | None = None) -> LocalStack:
    """Start Ray on config.host with its own temp dir and the dashboard, deploy, wait until ready."""
    tmp = ray_tmpdir or tempfile.mkdtemp(prefix="ray-")
    os.environ.setdefault("RAY_TMPDIR", tmp)
    config = with_internal_token(config)
    ctx = _init_ray(config, tmp, dashboard_port, num_cpus)
    stop_on_signals()
    serve.start(http_options={"host": config.host, "port": config.port})
    # Not waiting for the application here: _wait_ready watches it, and fails at the first
    # replica that fails to start (serve.run would wait out Serve's retries of it).
    serve.run_many([serve.RunTarget(build_app(config), name=APP_NAME, route_prefix="/")],
                   wait_for_applications_running=False)
    url = f"http://{config.host}:{config.port}"
    _wait_ready(url, timeout_s=600)
    node = ray._private.worker.global_worker.node
    metrics_url = f"http://{config.host}:{node.metrics_export_port}/metrics"
    return LocalStack(url=url, dashboard_url=f"http://{ctx.dashboard_url}", ray_tmpdir=tmp, metrics_url=metrics_url)


def _init_ray(config: AppConfig, tmp: str, dashboard_port: int, num_cpus: int | None, attempts: int = 3):
    """ray.init on config.host. Ray gives its raylet a fixed 30 s to register, which a loaded
    2-core machine can miss: retry a fresh start before giving up."""
    from ray._private import ray_constants

    if is_loopback(config.host) and ray_constants.ENABLE_RAY_CLUSTER:
        log.warning("Ray's servers will listen on this machine's external address: set "
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported to keep them on %s", config.host)
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


def startup_failure() -> str | None:
    """The error of the application's first replica that failed to start, if one did."""
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return None
    if app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
        return app.message
    for name, deployment in app.deployments.items():
        if deployment.status in ("DEPLOY_FAILED", "UNHEALTHY") or "failed to start" in deployment.message:
            return f"{name}: {deployment.message}"
    return None


def _running() -> bool:
    app = serve.status().applications.get(APP_NAME)
    return app is not None and app.status == "RUNNING"


def _wait_ready(url: str, timeout_s: float) -> None:
    """Until every deployment runs and the router sees a decode worker; StartFailed at once when
    a replica failed to start (Serve would retry it, and the stack would stand half up)."""
    import asyncio

    import aiohttp

    async def wait() -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                failure = await asyncio.to_thread(startup_failure)
                if failure:
                    raise StartFailed(failure)
                if await asyncio.to_thread(_running):
                    try:
                        async with session.get(f"{url}/health") as response:
                            if response.status == 200:
                                return
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                await asyncio.sleep(0.5)
        raise TimeoutError(f"the stack at {url} was not ready after {timeout_s:.0f} s")

    asyncio.run(wait())


def wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM (StopRequested)."""
    stop_on_signals()
    threading.Event().wait()


def _bounded(step: Callable[[], object], timeout_s: float, what: str) -> None:
    """Run `step` in a thread and wait at most `timeout_s` for it; a stop must end."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            step()
        except BaseException as e:  # noqa: BLE001 - reported, then the stop goes on
            errors.append(e)

    thread = threading.Thread(target=run, name=f"disagg-stop-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("%s did not stop within %.0f s; its processes are ended instead", what, timeout_s)
    elif errors:
        log.warning("%s stop: %s: %s", what, type(errors[0]).__name__, errors[0])


def stop_local(remove: list[str] = ()) -> list[int]:
    """Stop Serve (replicas stop their workers and engines) and Ray, each within a bound, then
    end what is left below this process and remove `remove`. Returns the pids that would not end."""
    if ray.is_initialized():
        _bounded(serve.shutdown, SERVE_STOP_S, "Serve")
        _bounded(ray.shutdown, RAY_STOP_S, "Ray")
    left = end_processes(descendants(os.getpid()))
    remove_paths(remove)
    return [p.pid for p in left]
