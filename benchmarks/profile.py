"""Sampling profiles of a stack's Python processes while a workload runs (py-spy), summarised as
the functions that hold the most samples: where a slow stack spends its time.

    with Profile({"router": pid1, "decode": pid2}, out_dir) as prof:
        ... run the workload ...
    prof.summary()   # {"router": {"samples": N, "top_self": [...], "top_total": [...]}, ...}
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profile:
    def __init__(self, pids: dict[str, int], out_dir: Path, rate: int = 50, idle: bool = False):
        self.pids = pids
        self.out_dir = out_dir
        self.rate = rate
        self.idle = idle
        self.procs: dict[str, subprocess.Popen] = {}
        self.files: dict[str, Path] = {}

    def __enter__(self) -> "Profile":
        exe = py_spy()
        if exe is None:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            path = self.out_dir / f"{name}.txt"
            cmd = [exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
                   "--output", str(path), "--nonblocking"]
            if self.idle:
                cmd.append("--idle")
            self.files[name] = path
            self.procs[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: Any) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def summary(self, top: int = 12) -> dict[str, Any]:
        return {name: summarise(path, top) for name, path in self.files.items() if path.exists()}


def summarise(path: Path, top: int = 12) -> dict[str, Any]:
    """From py-spy's raw (collapsed stacks) output: total samples, the functions with the most
    samples at the top of the stack (self) and anywhere in it (total), in percent."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_short(f) for f in stack.split(";")]
        if frames:
            self_counts[frames[-1]] += n
        for f in set(frames[1:]):  # frames[0] is the thread
            total_counts[f] += n

    def pct(counter: Counter[str]) -> list[list[Any]]:
        return [[f, round(100.0 * c / samples, 1)] for f, c in counter.most_common(top)] if samples else []

    return {"samples": samples, "top_self": pct(self_counts), "top_total": pct(total_counts)}


def _short(frame: str) -> str:
    """`func (path/to/module.py:123)` -> `func (module.py)`."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(file).parts
    return f"{name} ({'/'.join(parts[-2:])})" if parts else name
