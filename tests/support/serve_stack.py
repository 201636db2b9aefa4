"""`disagg serve` as a subprocess on its own Ray (own RAY_TMPDIR, free ports), for a test
module's fixture: start, find its URLs and workers, stop by its process group."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.workers import REPO, free_port


@dataclass
class ServeStack:
    proc: subprocess.Popen
    url: str
    log: Path
    ray_tmp: str

    @property
    def gateway_url(self) -> str | None:
        m = re.search(r"gateway: (http://\S+)", self.log.read_text(errors="replace"))
        return m.group(1) if m else None

    def _ready(self, group: int) -> str:
        m = re.search(r"ready: (http://\S+)/v1 .*Ray dashboard (http://[^\s;]+); Ray metrics (http://\S+)",
                      self.log.read_text(errors="replace"))
        assert m, "the stack has not said it is ready"
        return m.group(group)

    @property
    def dashboard(self) -> str:
        return self._ready(2)

    @property
    def ray_metrics(self) -> str:
        """Ray's Prometheus export (the disagg_* metrics appear there as ray_disagg_*)."""
        return self._ready(3)

    def post(self, path: str, body: object, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=120, **kw)

    def workers(self, role: str) -> list[str]:
        """host:port of each worker's own HTTP endpoint in this role."""
        return [w["address"] for w in httpx.get(f"{self.url}/v1/pool", timeout=10).json() if w["role"] == role]

    def stop(self) -> None:
        try:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        finally:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)


def start_serve_stack(model: str, log_dir: Path, settings: list[str] = (), timeout_s: float = 600,
                      args: list[str] = ()) -> ServeStack:
    """Start `disagg serve` (1 prefill + 1 decode, unless `settings` say otherwise; `args`: more
    flags) and wait until its router and pool are ready (and its gateway, with --gateway)."""
    # Ray's unix socket paths must stay short: pytest's tmp paths are too long for them.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    log = log_dir / "serve.log"
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "disagg.cli", "serve", "--model", model, "--port", str(free_port()),
           "--pd-threshold", "64", "--set", "block_size=32", "--set", "max_model_len=1024"]
    for s in settings:
        cmd += ["--set", s]
    cmd += list(args)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            text = log.read_text(errors="replace")
            m = re.search(r"ready: (http://\S+)/v1 ", text)
            if m and ("--gateway" not in args or "gateway: http" in text):
                stack = ServeStack(proc, m.group(1), log, ray_tmp)
                while time.monotonic() < deadline:
                    if stack.workers("decode") and stack.workers("prefill"):
                        return stack
                    time.sleep(0.5)
            time.sleep(1)
    except BaseException:  # an interrupted start (Ctrl-C, a timeout) leaves no stack behind
        _kill(proc, ray_tmp)
        raise
    _kill(proc, ray_tmp)
    raise RuntimeError(f"disagg serve did not come up:\n{log.read_text(errors='replace')[-4000:]}")


def _kill(proc: subprocess.Popen, ray_tmp: str) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait(30)
    shutil.rmtree(ray_tmp, ignore_errors=True)
