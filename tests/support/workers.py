"""Start real standalone workers (`python -m disagg.worker`) as subprocesses for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples on `url`/metrics whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@dataclass
class WorkerProcess:
    role: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    settings: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def describe(self) -> dict:
        return httpx.get(f"{self.url}/v1/worker", timeout=5).json()

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.url, name, **labels)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (the engine core child dies with its parent's pipes)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def start_worker_process(model: str, role: str, *, cpu_bind: str | None, log_dir: Path,
                         prefill_endpoints: list[str] = (), settings: list[str] = (), port: int | None = None
                         ) -> WorkerProcess:
    port = port or free_port()
    cmd = [sys.executable, "-m", "disagg.worker", "--role", role, "--model", model, "--port", str(port),
           "--prefill-endpoints", ",".join(prefill_endpoints)]
    if cpu_bind is not None:
        cmd += ["--cpu-bind", cpu_bind]
    for s in settings:
        cmd += ["--set", s]
    log_path = log_dir / f"{role}-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return WorkerProcess(role, port, proc, log_path, list(settings))


def wait_ready(*workers: WorkerProcess, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(workers)
    while pending:
        for w in list(pending):
            if w.proc.poll() is not None:
                raise RuntimeError(f"{w.role} worker exited:\n{w.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{w.url}/health", timeout=1).status_code == 200:
                    pending.remove(w)
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not ready: {pending}")
        time.sleep(0.5)


def wait_idle(worker: WorkerProcess, timeout_s: float = 15) -> dict:
    """Wait until the worker runs nothing and holds no KV blocks; returns its last load."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = worker.describe()["load"]
        if load["running"] == 0 and load["waiting"] == 0 and load["kv_usage"] == 0.0:
            return load
        if time.monotonic() > deadline:
            return load
        time.sleep(0.2)
