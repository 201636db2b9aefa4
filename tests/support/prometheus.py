"""A real Prometheus (Debian's `prometheus` package) on loopback, for metrics tests."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.support.workers import free_port

# vLLM's metric names are the model-server protocol GIE and llm-d scrape (`vllm:num_requests_waiting`
# ...): promtool's naming lint objects to their colons, and to vLLM's histogram named
# `vllm:iteration_tokens_total`. Those two lints on vllm:* names are expected; anything else is a
# problem.
EXPECTED_VLLM_LINTS = ("metric names should not contain ':'", 'non-counter metrics should not have "_total" suffix')


def promtool_problems(metrics_text: str) -> list[str]:
    out = subprocess.run(["promtool", "check", "metrics"], input=metrics_text, capture_output=True, text=True,
                         timeout=60)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return [line for line in lines
            if not (line.startswith("vllm:") and any(lint in line for lint in EXPECTED_VLLM_LINTS))]


class Prometheus:
    def __init__(self, targets: dict[str, list[str]], workdir: Path, interval_s: float = 1.0):
        if shutil.which("prometheus") is None:
            raise RuntimeError("Debian's prometheus package is not installed (`apt-get install prometheus`)")
        self.port = free_port()
        config = {
            # Prometheus durations take integer units only ("1.0s" is refused).
            "global": {"scrape_interval": f"{round(interval_s * 1000)}ms",
                       "scrape_timeout": f"{round(interval_s * 1000)}ms"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": t}]} for job, t in targets.items()],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=open(workdir / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError((workdir / "prometheus.log").read_text()[-2000:])
            time.sleep(0.5)

    def query(self, promql: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def targets_up(self) -> dict[str, float]:
        return {s["metric"]["instance"]: float(s["value"][1]) for s in self.query("up")}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
