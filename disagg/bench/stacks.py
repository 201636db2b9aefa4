"""Our serving stacks, as a benchmark brings them up, one after another, each in its own processes:

    OursRay          `disagg serve` (our router, prefill and decode on a local Ray)
    OursGateway      standalone `disagg worker`s behind `disagg epp` + Envoy (the gateway path);
                     the router restarts in seconds with another routing config while the
                     engines keep running, which is what the P/D study sweeps

The peers' stacks (Ray Serve LLM, vLLM's reference proxy) are built on the same `Stack` in the
research harness beside the results (`benchmarks/peers.py`).

Every stack pins its prefill engine to core 0 and its decode engine to core 1 (one OpenMP
thread each), gives each engine 1 GiB of KV cache, and keeps all traffic on 127.0.0.1. A stack
is started with `start()` (blocks until it answers), measured through `url`, and stopped with
`stop()`, which ends every process it started. `memory_mib()` gives each component's peak RSS.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from disagg.bench.processes import Launched, MemorySampler, free_port, terminate
from disagg.bench.processes import launch as _launch_process

log = logging.getLogger("disagg.bench.stacks")
REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
# On a shared, overloaded machine one engine step can take minutes; vLLM's defaults would then
# declare the engine dead (300 s per step) or never ready (600 s). Same for every stack.
PATIENT_ENV = {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600", "VLLM_ENGINE_READY_TIMEOUT_S": "3600"}


def ensure_model(path: str, size: str) -> str:
    """The model directory a stack serves, as an absolute path; a seeded random-weight model of
    `size` (tiny, bench) is built there first if it holds none."""
    from disagg.engine.tiny_model import build_tiny_model

    if not (Path(path) / "config.json").exists():
        log.info("building the %s model in %s", size, path)
        build_tiny_model(path, size=size)
    return str(Path(path).resolve())


def native_dtype() -> str:
    """The engines' dtype: `auto` (the model's own) where the hardware computes it natively,
    `float32` on CPUs without AVX512-BF16 or AMX, where bfloat16 is emulated and far slower."""
    try:
        import torch

        if torch.cuda.is_available():
            return "auto"
    except ImportError:
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "auto"
    return "auto" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


@dataclass
class EngineSettings:
    """What every stack's engines share, so that only the orchestration differs."""

    dtype: str = "auto"
    block_size: int = 128
    max_model_len: int = 2048
    max_num_seqs: int = 16
    kv_cache_gib: int = 1
    prefill_core: str = "0"
    decode_core: str = "1"


def launch(label: str, cmd: list[str], *, env: dict[str, str] | None = None, **kwargs: Any) -> Launched:
    return _launch_process(label, cmd, env={**PATIENT_ENV, **(env or {})}, **kwargs)


def ray_component(cmdline: str) -> str | None:
    """Components of a Ray Serve stack, from Ray's process titles."""
    if "Prefill" in cmdline:
        return "prefill"
    if "Decode" in cmdline:
        return "decode"
    if "ServeReplica" in cmdline and ("Router" in cmdline or "Ingress" in cmdline):
        return "router"
    if "ServeController" in cmdline or "ProxyActor" in cmdline or "Registry" in cmdline:
        return "serve"
    if any(k in cmdline for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "ray::IDLE",
                                  "runtime_env", "default_worker.py")):
        return "ray"
    return None


def wait_ready(check: Any, launched: list[Launched], timeout_s: float, what: str) -> None:
    """Poll `check()` every second until it holds; fail at once if a launched process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for item in launched:
            if not item.alive():
                raise RuntimeError(f"{what}: {item.label} exited ({item.proc.returncode}):\n{item.log_tail()}")
        try:
            if check():
                return
        except (httpx.HTTPError, ValueError, OSError):
            pass
        time.sleep(1.0)
    tails = "\n".join(f"--- {i.label}\n{i.log_tail(1500)}" for i in launched)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s\n{tails}")


_READY_LINE = re.compile(r"^READY .*$", re.MULTILINE)


def ready_line(log: str) -> str | None:
    """The `READY ...` line a process printed, on a line of its own (the engines' config dumps
    name VLLM_ENGINE_READY_TIMEOUT_S long before anything is ready), or None."""
    found = _READY_LINE.search(log)
    return found.group(0) if found else None


def said_ready(log: str) -> bool:
    return ready_line(log) is not None


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=5).status_code == 200


@dataclass
class Stack:
    """Base: subclasses fill `launched` in `_start` and set `url`."""

    name: str
    model: str
    settings: EngineSettings = field(default_factory=EngineSettings)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dgb-")))
    url: str = ""
    launched: list[Launched] = field(default_factory=list)
    startup_s: float | None = None
    shutdown_s: float | None = None
    sampler: MemorySampler | None = None
    start_errors: list[str] = field(default_factory=list)

    description = ""

    @property
    def model_name(self) -> str:
        return Path(self.model).name

    def start(self, timeout_s: float = 900, attempts: int = 2) -> "Stack":
        """Start and wait until it answers. A start that fails is retried from scratch (on an
        overloaded machine Ray gives its raylet only 30 s to register)."""
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            self.launched = []
            self.sampler = MemorySampler(self.launched)
            self.sampler.start()
            try:
                self._start(timeout_s)
                break
            except Exception as e:  # noqa: BLE001 - retried, then raised
                self.stop()
                if attempt == attempts:
                    raise
                self.start_errors.append(f"{type(e).__name__}: {str(e)[:500]}")
            except BaseException:
                self.stop()
                raise
        self.startup_s = round(time.monotonic() - started, 1)
        return self

    def _start(self, timeout_s: float) -> None:
        raise NotImplementedError

    def stop(self) -> float:
        if self.sampler is not None:
            self.sampler.stop()
        self.shutdown_s = round(terminate(self.launched, self.sampler), 1)
        return self.shutdown_s

    def memory_mib(self) -> dict[str, float]:
        if self.sampler is None:
            return {}
        self.sampler.sample()
        return self.sampler.peaks_mib()

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "model": self.model_name,
                "startup_s": self.startup_s, "shutdown_s": self.shutdown_s, "log_dir": str(self.log_dir),
                "start_errors": self.start_errors}

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@dataclass
class OursRay(Stack):
    """`disagg serve`: Router → DecodeServer → PrefillServer on a local Ray, in its own process."""

    settings_overrides: list[str] = field(default_factory=list)  # extra `--set KEY=VALUE`
    prefill_replicas: int = 1
    decode_replicas: int = 1
    description = "disagg (Ray Serve: router + prefill + decode, our KV connector)"

    def _start(self, timeout_s: float) -> None:
        s = self.settings
        port, dashboard = free_port(), free_port()
        tmp = tempfile.mkdtemp(prefix="dgr-", dir="/tmp")
        decode_cores = [s.decode_core] if self.decode_replicas == 1 else [s.prefill_core, s.decode_core]
        sets = [f"dtype={s.dtype}", f"block_size={s.block_size}", f"max_model_len={s.max_model_len}",
                f"max_num_seqs={s.max_num_seqs}",
                f"kv_cache_gib={s.kv_cache_gib}", f"prefill.cpu_bind=[\"{s.prefill_core}\"]",
                f"decode.cpu_bind={json.dumps(decode_cores)}", *self.settings_overrides]
        cmd = [PY, "-m", "disagg.cli", "serve", "--model", self.model, "--port", str(port),
               "--dashboard-port", str(dashboard), "--prefill-replicas", str(self.prefill_replicas),
               "--decode-replicas", str(self.decode_replicas)]
        for item in sets:
            cmd += ["--set", item]
        self.launched.append(launch("driver", cmd, log_dir=self.log_dir, cwd=REPO, classify=ray_component,
                                    env={"TMPDIR": tmp, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled"}))
        self.url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            r = httpx.get(f"{self.url}/health", timeout=5)
            if r.status_code != 200:
                return False
            body = r.json()
            return body.get("decode", 0) >= self.decode_replicas and body.get("prefill", 0) >= self.prefill_replicas

        wait_ready(ready, self.launched, timeout_s, self.name)


@dataclass
class GatewayWorker:
    label: str  # component name, e.g. "prefill0"
    role: str  # prefill | decode
    core: str
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class OursGateway(Stack):
    """Standalone workers (`python -m disagg.worker`) behind `disagg epp` with Envoy. The
    workers start once; `route(endpoints, settings)` (re)starts only the EPP and Envoy, over a
    subset of the workers and with other routing settings, in seconds."""

    workers: list[GatewayWorker] = field(default_factory=list)
    worker_settings: list[str] = field(default_factory=list)
    # Route over these workers as soon as they are up (empty: wait for `route`).
    initial_route: list[str] = field(default_factory=list)
    router_settings: list[str] = field(default_factory=list)
    router_label: str = ""
    description = "disagg gateway path (standalone workers, EPP + Envoy)"

    def _start(self, timeout_s: float) -> None:
        s = self.settings
        for w in self.workers:
            w.port = w.port or free_port()
        prefills = [w.address for w in self.workers if w.role == "prefill"]
        base = [f"dtype={s.dtype}", f"block_size={s.block_size}", f"max_model_len={s.max_model_len}",
                f"max_num_seqs={s.max_num_seqs}", f"kv_cache_gib={s.kv_cache_gib}", *self.worker_settings]
        for w in self.workers:
            cmd = [PY, "-m", "disagg.worker", "--role", w.role, "--model", self.model, "--port", str(w.port),
                   "--cpu-bind", w.core, "--prefill-endpoints", ",".join(prefills)]
            for item in base:
                cmd += ["--set", item]
            self.launched.append(launch(w.label, cmd, log_dir=self.log_dir, cwd=REPO))
        wait_ready(lambda: all(http_ok(f"http://{w.address}/health") for w in self.workers), self.launched, timeout_s,
              f"{self.name} workers")
        if self.initial_route:
            self.route(self.initial_route, self.router_settings)

    def route(self, labels: list[str], settings: list[str], timeout_s: float = 180) -> float:
        """Put a fresh EPP + Envoy in front of the named workers; returns its start-up seconds."""
        started = time.monotonic()
        old = [i for i in self.launched if i.label == "router"]
        if old:
            terminate(old, None, grace_s=15)
            self.launched[:] = [i for i in self.launched if i.label != "router"]
        chosen = [w for w in self.workers if w.label in labels]
        gateway = free_port()
        cmd = [PY, "-m", "disagg.cli", "epp", "--model", self.model, "--endpoints", ",".join(w.address for w in chosen),
               "--host", "127.0.0.1", "--gateway-port", str(gateway), "--gateway-host", "127.0.0.1",
               "--grpc-port", str(free_port()), "--health-port", str(free_port()),
               "--metrics-port", str(free_port()), "--discovery-interval", "0.5", "--log-level", "WARNING",
               "--set", f"block_size={self.settings.block_size}", "--set", f"max_model_len={self.settings.max_model_len}"]
        for item in settings:
            cmd += ["--set", item]
        router = launch("router", cmd, log_dir=self.log_dir, cwd=REPO)
        self.launched.append(router)
        if self.sampler is not None:
            self.sampler.roots = self.launched
        self.url = f"http://127.0.0.1:{gateway}"
        self.router_label = ",".join(labels) + (" " + " ".join(settings) if settings else "")
        expected = len(chosen)

        metrics_url = f"http://127.0.0.1:{cmd[cmd.index('--metrics-port') + 1]}/metrics"

        def ready() -> bool:
            return said_ready(router.log_tail(20_000)) and _live_endpoints(metrics_url) >= expected

        wait_ready(ready, [router], timeout_s, f"{self.name} router")
        return round(time.monotonic() - started, 1)


def _live_endpoints(metrics_url: str) -> int:
    """Workers in the EPP's pool, from its `disagg_endpoints` gauge."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=5).text):
        if family.name == "disagg_endpoints":
            total += int(sum(sample.value for sample in family.samples))
    return total
