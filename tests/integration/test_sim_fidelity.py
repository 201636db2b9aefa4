"""Fidelity: the simulator against the real stack on this machine, on the same workloads.

For each mode `disagg bench serve` measures (disagg: 1 prefill + 1 decode; aggregated: 2
engines), the real stack (the same workers behind Envoy and `disagg epp`: the gateway path, see
`PATH`; one started per mode) and the simulator (with a cost model `disagg profile` measures here
first) serve the same requests at the same Poisson send times: `mixed` and `shared_prefix`,
tokenized by the same router code. The profile is measured with `--stack --stack-path gateway`, so
that it carries what that stack adds on this machine now (it is shared).

Asserted in every run (the disaggregated mode; `--full` runs both): nothing fails and the prefix
hit rate is within 10 points (it agrees exactly); with `make test-slow` also TTFT p50 within a
factor of 2.5, so that a simulator that lost the stack's overheads (TTFT -90%) or an engine model
gone wrong fails. The issue's 25% is printed per case, not asserted: on this shared 2-core
machine the real stack's own TTFT p50 moved by up to 2x between runs of the same workload. Compared: TTFT p50 and
TPOT p50 (within 25%) and the prefix hit rate (within 10 points), the fleet's as vLLM counts it
(`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` summed over the workers).

The test runs small workloads so it cannot rot (a few minutes). The full figures:

    .venv/bin/python -m tests.integration.test_sim_fidelity --full --json /tmp/fidelity.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from disagg.bench import driver, workloads
from disagg.bench.progress import say
from disagg.bench.serve import make_stack, worker_urls
from disagg.bench.stacks import PY, REPO, EngineSettings, ensure_model, native_dtype
from disagg.sim import trace
from disagg.sim.cost import CostModel
from disagg.sim.profile import stream_window_s
from disagg.sim.simulate import Deployment, simulate
from tests.support.workers import metric

pytestmark = pytest.mark.integration

MODES = {"disagg": Deployment(prefill=1, decode=1), "aggregated": Deployment(prefill=0, decode=0, aggregated=2)}
SMALL = {"mixed": {"requests": 12}, "shared_prefix": {"conversations": 3, "turns": 3}}
FULL = {"mixed": {"requests": 24}, "shared_prefix": {"conversations": 8, "turns": 4}}
RATE = 2.0
TARGET = 0.25  # the bound on TTFT and TPOT p50 (relative), reported
FACTOR = 2.5  # what the test holds them to
HIT_POINTS = 0.10  # prefix hit rate, absolute
# The real stack's request path. Through `disagg serve`'s Serve proxy a stream's chunks were held
# back for up to 1-2 s after the Router had sent them (measured here: the Router's last SSE chunk at
# +0.3 s, the client's at +1.2 s), which no engine model can follow; the gateway path streams from
# the decode worker's own endpoint.
PATH = "gateway"


@dataclass
class Figures:
    ttft_ms_p50: float | None
    tpot_ms_p50: float | None
    prefix_hit_rate: float | None
    requests: int
    failed: int = 0


def measure_profile(model: str, path: Path) -> CostModel:
    subprocess.run([PY, "-m", "disagg.cli", "profile", "--model", model, "--stack", "--stack-path", PATH,
                    "--json", str(path)], cwd=REPO, check=True, timeout=1200, stdout=subprocess.DEVNULL)
    return CostModel.load(path)


def build(name: str, model: str, size: dict[str, int], seed: int) -> workloads.Workload:
    return workloads.build(name, model, seed=seed, **size)


def prefix_counters(stack: Any) -> tuple[float, float]:
    """(hits, queries) summed over the stack's workers."""
    hits = queries = 0.0
    for address in worker_urls(stack):
        hits += metric(address, "vllm:prefix_cache_hits_total")
        queries += metric(address, "vllm:prefix_cache_queries_total")
    return hits, queries


def real(mode: str, model: str, sizes: dict[str, dict[str, int]], seed: int) -> dict[str, Figures]:
    log_dir = Path(tempfile.mkdtemp(prefix="dgf-"))
    stack = make_stack(mode, model, EngineSettings(dtype=native_dtype()), log_dir, path=PATH)
    out: dict[str, Figures] = {}
    try:
        say(mode, f"starting the stack ({stack.description}); logs in {log_dir}")
        stack.start(timeout_s=900)
        warm = workloads.uniform(model, seed=seed + 1000, requests=2, prompt=(300, 400), answer=(4, 8), salt="warm-up")
        asyncio.run(driver.warm_up(stack.url, stack.model_name, warm))
        for name, size in sizes.items():
            wl = build(name, model, size, seed)
            before = prefix_counters(stack)
            run = asyncio.run(driver.drive(stack.url, stack.model_name, wl, rate=RATE, seed=seed, timeout_s=300))
            time.sleep(1.0)  # the engines' counters are updated every step; let the last ones land
            after = prefix_counters(stack)
            s = run.summary()
            queries = after[1] - before[1]
            out[name] = Figures(s["ttft_p50_ms"], s["tpot_p50_ms"], round((after[0] - before[0]) / queries, 4)
                                if queries else None, s["requests"], s["failed"])
            say(mode, f"{name}: {out[name]}")
    finally:
        stack.stop()
    return out


def simulated(mode: str, cost: CostModel, model: str, sizes: dict[str, dict[str, int]], seed: int
              ) -> dict[str, Figures]:
    out = {}
    for name, size in sizes.items():
        n = size.get("requests") or size["conversations"] * size["turns"]
        reqs = list(trace.workload(name, requests=n, rate=RATE, seed=seed, model_dir=model,
                                   **{k: v for k, v in size.items() if k != "requests"}))
        deployment = replace(MODES[mode], stream_window_s=stream_window_s(PATH))
        s = simulate(cost, deployment, reqs, seed=seed, progress=False).summary
        out[name] = Figures(s["ttft_ms_p50"], s["tpot_ms_p50"], s["prefix_hit_rate"], s["requests"], s["failed"])
    return out


def compare(real_figures: Figures, sim: Figures) -> dict[str, Any]:
    def rel(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or not a else round(b / a - 1, 3)

    return {"real": real_figures.__dict__, "sim": sim.__dict__,
            "ttft_error": rel(real_figures.ttft_ms_p50, sim.ttft_ms_p50),
            "tpot_error": rel(real_figures.tpot_ms_p50, sim.tpot_ms_p50),
            "hit_points": None if real_figures.prefix_hit_rate is None or sim.prefix_hit_rate is None
            else round(sim.prefix_hit_rate - real_figures.prefix_hit_rate, 3)}


def fidelity(model: str, cost: CostModel, sizes: dict[str, dict[str, int]], seed: int = 0,
             modes: tuple[str, ...] = tuple(MODES)) -> dict[str, Any]:
    import os

    report: dict[str, Any] = {"profile": cost.model_dump(), "rate": RATE, "seed": seed, "sizes": sizes,
                              "load_avg_at_start": os.getloadavg(), "cases": {}}
    for mode in modes:
        measured = real(mode, model, sizes, seed)
        sim = simulated(mode, cost, model, sizes, seed)
        for name in sizes:
            report["cases"][f"{name}/{mode}"] = compare(measured[name], sim[name])
    report["load_avg_at_end"] = os.getloadavg()
    return report


def table(report: dict[str, Any]) -> str:
    lines = ["| workload / mode | TTFT p50 ms real / sim | TPOT p50 ms real / sim | prefix hit real / sim | "
             f"within {TARGET:.0%} |", "|---|---|---|---|---|"]
    for case, c in report["cases"].items():
        r, s = c["real"], c["sim"]
        within = max(abs(c["ttft_error"]), abs(c["tpot_error"])) <= TARGET and abs(c["hit_points"]) <= HIT_POINTS
        lines.append(f"| {case} | {r['ttft_ms_p50']} / {s['ttft_ms_p50']} ({c['ttft_error']:+.0%}) | "
                     f"{r['tpot_ms_p50']} / {s['tpot_ms_p50']} ({c['tpot_error']:+.0%}) | "
                     f"{r['prefix_hit_rate']} / {s['prefix_hit_rate']} ({c['hit_points']:+.2f}) | "
                     f"{'yes' if within else 'no'} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_model(str(REPO / "models" / "tiny"), "tiny")


def small_comparison(model: str, tmp_path: Path) -> dict[str, Any]:
    """The small comparison, disaggregated mode only (a stack start is ~90 s here; --full runs both)."""
    cost = measure_profile(model, tmp_path / "profile.json")
    report = fidelity(model, cost, SMALL, modes=("disagg",))
    print("\n" + table(report))
    for case, c in report["cases"].items():
        assert not c["real"]["failed"], case
        assert abs(c["hit_points"]) <= HIT_POINTS, (case, c)
        for side in ("real", "sim"):
            assert c[side]["ttft_ms_p50"] and c[side]["tpot_ms_p50"] is not None, (case, side, c)
    return report


def test_the_simulator_follows_the_real_stack(model, tmp_path):
    # What holds in every run: the comparison runs end to end on both sides, nothing fails, and the
    # prefix hit rate agrees. The latencies are printed: on this shared 2-core machine one sample
    # of the real stack's TTFT p50 moved from 0.14x to 3.2x the simulator's between full runs
    # (the stack's start-up and other tests' processes share the cores with the one measured).
    small_comparison(model, tmp_path)


@pytest.mark.slow
def test_the_simulators_ttft_is_within_a_factor_of_the_real_stacks(model, tmp_path):
    # The latency bound, for a quiet machine (make test-slow): a simulator that lost the stack's
    # overheads (TTFT -90%) or an engine model gone wrong fails it.
    for case, c in small_comparison(model, tmp_path)["cases"].items():
        real, sim = c["real"]["ttft_ms_p50"], c["sim"]["ttft_ms_p50"]
        assert 1 / FACTOR <= sim / real <= FACTOR, (case, c)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="bench serve's default sizes (24 mixed, 8 x 4 shared_prefix)")
    p.add_argument("--profile", type=Path, help="a cost model already measured (default: measure one now)")
    p.add_argument("--model", default=str(REPO / "models" / "tiny"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    model = ensure_model(args.model, "tiny")
    cost = CostModel.load(args.profile) if args.profile else measure_profile(model, Path(tempfile.mkdtemp()) / "p.json")
    report = fidelity(model, cost, FULL if args.full else SMALL, args.seed)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
