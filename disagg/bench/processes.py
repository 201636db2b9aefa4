"""Processes a benchmark starts: each in its own session with its own log, its whole tree
sampled for memory (RSS per component), and every process it ever had stopped at the end.

Ray daemonizes nothing here, but a parent that dies reparents its children to init; so the
sampler remembers every process it has seen (pid + start time, against pid reuse) and `stop`
ends all of them, not only the ones still in the tree.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

# A component label for a process from its command line, or None to inherit its parent's.
Classifier = Callable[[str], "str | None"]


def free_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's ephemeral range. A port is picked here long before the
    process that will listen on it binds it (engines take minutes to start); one from the
    ephemeral range could meanwhile be handed to anyone's `bind(0)`, a port below it cannot."""
    low = _ephemeral_low()
    if low > 24_000:
        rng = random.Random()
        for _ in range(200):
            port = rng.randrange(low - 8_000, low - 500)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Launched:
    """One process we started (and its descendants): `label` is its component's name."""

    label: str
    proc: subprocess.Popen
    log_path: Path
    classify: Classifier | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def launch(label: str, cmd: list[str], *, log_dir: Path, env: dict[str, str] | None = None,
           cwd: str | Path | None = None, classify: Classifier | None = None) -> Launched:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{label}.log"
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                start_new_session=True)
    return Launched(label, proc, log_path, classify)


@dataclass
class MemorySampler:
    """Samples the RSS of every process under `roots` every `interval_s`, summed per component;
    keeps each component's peak. RSS counts shared pages in every process that maps them, so a
    component's figure is an upper bound (the same for every stack)."""

    roots: list[Launched]
    interval_s: float = 0.5
    peaks: dict[str, int] = field(default_factory=dict)
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create_time
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def reset_peaks(self) -> None:
        self.peaks = {}

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for root in self.roots:
            for label, proc in _labelled_tree(root):
                try:
                    rss = proc.memory_info().rss
                    self.seen.setdefault(proc.pid, proc.create_time())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                totals[label] = totals.get(label, 0) + rss
        for label, rss in totals.items():
            if rss > self.peaks.get(label, 0):
                self.peaks[label] = rss
        return totals

    def peaks_mib(self) -> dict[str, float]:
        return {k: round(v / 2**20, 1) for k, v in sorted(self.peaks.items())}


def _labelled_tree(root: Launched) -> list[tuple[str, psutil.Process]]:
    try:
        top = psutil.Process(root.pid)
        procs = [top, *top.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []
    labels: dict[int, str] = {}
    out = []
    # children(recursive=True) lists parents before their children.
    for proc in procs:
        try:
            own = root.classify(" ".join(proc.cmdline())) if root.classify else None
            parent = proc.ppid()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        label = own or labels.get(parent) or root.label
        labels[proc.pid] = label
        out.append((label, proc))
    return out


def component_roots(roots: list[Launched]) -> dict[str, int]:
    """The topmost process of each component (a Serve replica's actor, not its engine child)."""
    out: dict[str, int] = {}
    for root in roots:
        for label, proc in _labelled_tree(root):
            out.setdefault(label, proc.pid)
    return out


def terminate(launched: list[Launched], sampler: MemorySampler | None, *, grace_s: float = 60.0) -> float:
    """SIGTERM each launched process (it shuts its own children down), wait up to `grace_s`,
    then SIGKILL whatever is left of every process ever seen. Returns the seconds it took."""
    started = time.monotonic()
    remembered: dict[int, float] = dict(sampler.seen) if sampler else {}
    for item in launched:
        for label, proc in _labelled_tree(item):
            try:
                remembered.setdefault(proc.pid, proc.create_time())
            except psutil.Error:
                pass
    for item in launched:
        if item.alive():
            try:
                item.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for item in launched:
        try:
            item.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for item in launched:
        if item.alive():
            try:
                os.killpg(item.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    leftovers = []
    for pid, created in remembered.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                leftovers.append(proc)
        except psutil.Error:
            continue
    for proc in leftovers:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=10)
    for item in launched:
        try:
            item.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    return time.monotonic() - started
