"""A stop stops everything: `disagg serve --gateway`, ended by each way it can end (SIGTERM to it
or to its group, Ctrl-C to its group, SIGKILL to it, a crash of its Ray driver), leaves no process
it started running 30 s later (vLLM's engine cores and workers, Ray's, Envoy, the guards), the
gateway port free and no temporary file behind; the last line says it stopped cleanly. And a
stack whose engine cannot start ends at once, non-zero, with the engine's error. (That an engine
does not outlive its replica is tested on the two-decode stack: two_decodes/test_replica_death.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx
import psutil
import pytest

from tests.support.serve_stack import start_serve_stack
from tests.support.workers import REPO, free_port

pytestmark = pytest.mark.integration

STOPPED_CLEANLY = "disagg stopped cleanly"


class Recorder:
    """Every process below `root`, by pid and create time (a reused pid is another process), and
    the shared-memory files they map, recorded while the stack runs."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.processes: dict[tuple[int, float], str] = {}
        self.shm: set[str] = set()

    def record(self) -> None:
        try:
            children = psutil.Process(self.root).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in children:
            try:
                self.processes[(p.pid, p.create_time())] = " ".join(p.cmdline())[:120] or p.name()
                self.shm.update(m.path for m in p.memory_maps() if m.path.startswith("/dev/shm/"))
            except psutil.Error:
                continue

    def alive(self) -> list[str]:
        left = []
        for (pid, created), cmd in self.processes.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {cmd}")
            except psutil.NoSuchProcess:
                continue
        return left


def driver_of(proc: subprocess.Popen) -> psutil.Process:
    """The Ray driver: the child `disagg serve` supervises."""
    (driver,) = [c for c in psutil.Process(proc.pid).children() if "serve" in c.cmdline()]
    return driver


EXITS: dict[str, Callable[[subprocess.Popen], None]] = {
    "sigterm-to-the-process": lambda proc: proc.send_signal(signal.SIGTERM),
    "sigterm-to-the-group": lambda proc: os.killpg(proc.pid, signal.SIGTERM),
    "ctrl-c-to-the-group": lambda proc: os.killpg(proc.pid, signal.SIGINT),
    "sigkill-to-the-process": lambda proc: proc.kill(),
    "the-driver-crashes": lambda proc: driver_of(proc).kill(),
}


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def stack_tmp(monkeypatch) -> Path:
    """TMPDIR of the stack: every temporary file it makes lands in here (short: Ray's socket
    paths must be)."""
    path = Path(tempfile.mkdtemp(prefix="st", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(path))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


# Each exit path starts a stack of its own (about 90 s here): `make test` runs the one a terminal
# or a supervisor sends; the others are marked slow (`make test-slow`). A driver that dies under
# the supervisor is also in the unit tests (tests/unit/test_children.py, with stand-in processes).
ALWAYS = ("sigterm-to-the-group",)


@pytest.mark.parametrize("how", [how if how in ALWAYS else pytest.param(how, marks=pytest.mark.slow)
                                 for how in EXITS])
def test_every_exit_ends_every_process_frees_the_port_and_removes_the_temp_files(how, tiny_model, tmp_path,
                                                                                  stack_tmp) -> None:
    gateway_port = free_port()
    stack = start_serve_stack(tiny_model, tmp_path, args=["--gateway", "--gateway-port", str(gateway_port)])
    recorder = Recorder(stack.proc.pid)
    try:
        r = httpx.post(f"{stack.gateway_url}/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": list(range(10, 200)), "max_tokens": 4})
        assert r.status_code == 200, r.text
        for _ in range(6):
            recorder.record()
            time.sleep(0.5)
        names = " ".join(recorder.processes.values())
        for expected in ("VLLM::EngineCore", "VLLM::Worker", "envoy", "raylet", "gcs_server", "children.py"):
            assert expected in names, f"{expected} was not running"
        assert os.listdir(stack_tmp), "the stack made no temporary files where TMPDIR says"
        EXITS[how](stack.proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (recorder.alive() or stack.proc.poll() is None):
            time.sleep(0.25)
        took = 30 - (deadline - time.monotonic())
        assert recorder.alive() == [], f"still running {took:.0f} s after {how}"
        assert port_is_free(gateway_port), "Envoy still holds the gateway port"
        assert sorted(os.listdir(stack_tmp)) == [], "temporary files left behind"
        assert [p for p in recorder.shm if os.path.exists(p)] == [], "shared memory left behind"
        lines = stack.log.read_text(errors="replace").strip().splitlines()
        assert lines[-1].startswith(STOPPED_CLEANLY), lines[-20:]
        if how != "sigkill-to-the-process":  # then the supervisor's exit status went with it
            assert stack.proc.returncode == (1 if how == "the-driver-crashes" else 0)
        log = stack.log.read_text(errors="replace")
        # A group signal reaches only `disagg serve`, which stops Ray in order: no C++ stack dumps.
        assert "*** SIGTERM received" not in log and "*** Aborted at" not in log
    finally:
        if stack.proc.poll() is None:
            os.killpg(stack.proc.pid, signal.SIGKILL)
        for entry in recorder.alive():
            os.kill(int(entry.split()[0]), signal.SIGKILL)


def test_an_engine_that_cannot_start_ends_the_stack_at_once_with_its_error(tiny_model, tmp_path, stack_tmp) -> None:
    # 8192 tokens of context for a model of 4096 positions: vLLM refuses it.
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "disagg.cli", "serve", "--model", tiny_model, "--port", str(free_port()),
           "--set", "block_size=32", "--set", "max_model_len=8192", "--gateway", "--gateway-port", str(free_port())]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    recorder = Recorder(proc.pid)
    try:
        while proc.poll() is None and time.monotonic() - started < 300:
            recorder.record()
            time.sleep(0.5)
        text = log.read_text(errors="replace")
        assert proc.returncode not in (None, 0), text[-3000:]
        assert "ready:" not in text  # never stood half up
        last = "\n".join(text.strip().splitlines()[-3:])
        assert "max_model_len" in last and "8192" in last, text[-3000:]
        assert text.strip().splitlines()[-1].startswith(STOPPED_CLEANLY)
        assert recorder.alive() == []
        assert sorted(os.listdir(stack_tmp)) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
