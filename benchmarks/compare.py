"""`python -m benchmarks.compare` (from the repository root): the P/D study on our stack, then our
stack side by side with Ray Serve LLM's P/D and vLLM's reference proxy; JSON (written after every
stack and arm), plots and a table in benchmarks/README.md.

1. The P/D study on our stack (`--study-model`, the ~100M-parameter one), gateway path: three
   standalone workers (prefill on core 0, decode on core 0, decode on core 1) that stay up while
   the router (EPP + Envoy) restarts with each routing setting:
       aggregated     decode0 + decode1 (two engines, one core each, each prefills locally)
       round robin    decode0 + decode1 with every scorer weight 0 (no prefix affinity)
       disaggregated  prefill0 + decode1 (the same two cores), `pd_threshold_tokens` swept
   Workload (ii) gives decode ITL p99 disaggregated vs aggregated; workload (i) gives TTFT
   prefix-aware vs round robin.
2. Side by side, on the same model (`--model`, the tiny one by default), the same core pinning
   (prefill core 0, decode core 1) and the same requests, one stack at a time:
       ours                 `disagg serve` (Ray Serve; router, prefill, decode)
       ray-serve-llm        Ray Serve LLM `build_pd_openai_app`, NixlConnector, default 50 ms
                            stream batching
       reference            two vLLM OpenAI servers behind `benchmarks.reference_proxy`
       ray-serve-llm-sb0    Ray Serve LLM with stream batching off (uniform workload only)
   Each runs every workload open loop (Poisson) for latency and closed loop for throughput.

    python -m benchmarks.compare                 # everything (~30 min on 2 cores)
    python -m benchmarks.compare --quick         # fewer requests, fewer runs (~12 min)
    python -m benchmarks.compare --stacks ours,reference --no-study
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from benchmarks import report as render
from benchmarks.peers import RayServeLLM, ReferenceProxy
from benchmarks.profile import Profile
from disagg.bench import driver, workloads
from disagg.bench.processes import component_roots
from disagg.bench.progress import Progress, heartbeat
from disagg.bench.results import machine, versions
from disagg.bench.stacks import EngineSettings, GatewayWorker, OursGateway, OursRay, Stack, ensure_model, native_dtype

log = logging.getLogger("benchmarks.compare")
# In the order they run: if the time budget runs out, what is skipped is the variant, not a peer.
STACKS = ("ours", "ray-serve-llm", "reference", "ray-serve-llm-sb0")
# Scorer weights all 0: the ranker falls back to the shortest queue with a rotating tie-break,
# i.e. load-balanced round robin without prefix affinity.
ROUND_ROBIN = ["routing.prefix_weight=0", "routing.load_weight=0", "routing.kv_usage_weight=0"]


@dataclass(frozen=True)
class Plan:
    """How much to run. `shapes`: each workload's builder arguments; `rates`: open-loop requests/s;
    `closed`: closed-loop concurrency (absent: no closed-loop run). The `study_` fields are the
    same for the P/D study, on a model whose long prefill takes seconds on one core."""

    shapes: dict[str, dict[str, Any]]
    rates: dict[str, float]
    closed: dict[str, int]
    study_shapes: dict[str, dict[str, Any]]
    study_rates: dict[str, float]
    thresholds: tuple[int, ...]

    @staticmethod
    def full() -> "Plan":
        return Plan(
            shapes={"shared_prefix": {"conversations": 3, "turns": 4}, "mixed": {"requests": 12},
                    "uniform": {"requests": 12}},
            # Below what the slower stacks sustain (~35 output tokens/s): TTFT, not a growing queue.
            rates={"shared_prefix": 0.5, "mixed": 0.5, "uniform": 0.5},
            closed={"shared_prefix": 4, "mixed": 4, "uniform": 4},
            study_shapes={"shared_prefix": {"conversations": 3, "turns": 3, **STUDY_SHARED_PREFIX},
                          "mixed": {"requests": 10, **STUDY_MIXED}},
            study_rates={"mixed": 0.25, "shared_prefix": 0.3},
            # With the aggregated arm (never disaggregate) a sweep of three points.
            thresholds=(256, 0))

    @staticmethod
    def quick() -> "Plan":
        return Plan(
            shapes={"shared_prefix": {"conversations": 4, "turns": 3}, "mixed": {"requests": 12},
                    "uniform": {"requests": 12}},
            rates={"shared_prefix": 1.0, "mixed": 1.0, "uniform": 1.0},
            closed={"uniform": 4},
            study_shapes={"shared_prefix": {"conversations": 3, "turns": 3, **STUDY_SHARED_PREFIX},
                          "mixed": {"requests": 10, **STUDY_MIXED}},
            study_rates={"mixed": 0.25, "shared_prefix": 0.3},
            thresholds=(256,))


# Three engines of the study's model start in 2-4 minutes here; one stuck longer is retried once.
STUDY_START_TIMEOUT_S = 420.0
# The study's model takes ~1 s per 300 prompt tokens on one (AVX2, fp32) core here. Workload (ii):
# a long prompt's prefill stalls every decode on its engine for a second or more (the
# interference), short prompts get answers long enough to show decode's inter-token gaps.
STUDY_MIXED = {"long_prompt": (384, 512), "long_answer": (4, 8), "short_prompt": (16, 32),
               "short_answer": (32, 48)}
# Workload (i): a cache miss prefills the whole conversation, a hit only the newest turn. Each
# turn adds more than a 128-token KV block, so a conversation's history, not only the system
# prompt every engine soon holds, is what a pick can find cached or not.
STUDY_SHARED_PREFIX = {"system_tokens": 192, "user_tokens": 128, "answer_tokens": 32}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer requests and runs")
    p.add_argument("--model", default="models/tiny", help="model for the side-by-side (built if missing)")
    p.add_argument("--study-model", default="models/bench", help="model for the P/D study (built if missing)")
    p.add_argument("--stacks", default=",".join(STACKS), help=f"comma list of {', '.join(STACKS)} ('' for none)")
    p.add_argument("--no-study", action="store_true", help="skip the P/D study")
    p.add_argument("--profile", action="store_true",
                   help="one more run of ours under py-spy: where its router, prefill and decode spend time")
    p.add_argument("--out", default="benchmarks", help="directory for JSON, plots and README.md")
    p.add_argument("--json", type=Path, help="write the report here (default: OUT/compare.json, "
                                             "OUT/compare-quick.json with --quick)")
    p.add_argument("--plot", type=Path, help="the side-by-side plot (the P/D study's without stacks) here, "
                                             "the others beside it as STEM-memory.png, STEM-pd-study.png "
                                             "(default: OUT/compare-*.png)")
    p.add_argument("--no-readme", action="store_true", help="write JSON and plots, leave README.md alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dtype", default=None,
                   help="engine dtype for every stack (default: the model's own, float32 on CPUs without bf16)")
    p.add_argument("--budget-min", type=float, default=29.0,
                   help="skip what is left (and say so) once this many minutes have passed")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a stack may take to start")
    p.add_argument("--nixl-spin", action="store_true",
                   help="let NIXL's progress thread spin in the peers' NixlConnector, as vLLM leaves it (a core per "
                        "engine; by default it waits for UCX events instead, see benchmarks/nixl_quiet)")
    return p.parse_args(argv)


class Budget:
    def __init__(self, minutes: float):
        self.started = time.monotonic()
        self.limit_s = minutes * 60

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.limit_s - self.elapsed()


def contention() -> dict[str, float]:
    """How busy the machine is right now: the 1-minute load average and how long a fixed bit of
    pure-Python work takes (about 20 ms on an idle core of this class)."""
    started = time.perf_counter()
    x = 0
    for i in range(400_000):
        x += i * i
    return {"load_avg_1m": round(os.getloadavg()[0], 1), "probe_ms": round((time.perf_counter() - started) * 1000, 1)}


def _run(url: str, model: str, workload: workloads.Workload, *, rate: float | None = None,
         concurrency: int | None = None, seed: int = 0) -> dict[str, Any]:
    before = contention()
    label = f"{workload.name} {'closed' if concurrency else 'open'}"
    run = asyncio.run(driver.drive(url, model, workload, rate=rate, concurrency=concurrency, seed=seed,
                                   timeout_s=300.0, on_result=Progress(label, len(workload))))
    out = run.to_json()
    out["contention"] = {"before": before, "after": contention()}
    for r in out["requests"]:  # per-event gaps stay out of the JSON (summaries keep percentiles)
        r.pop("itl_s", None)
    s = out["summary"]
    log.info("  %-13s %-12s TTFT p50 %s ms  ITL p99 %s ms  TPOT p50 %s ms  %s tok/s  failed %d/%d",
             workload.name, out["load"], s["ttft_p50_ms"], s["itl_p99_ms"], s["tpot_p50_ms"], s["output_tok_s"],
             s["failed"], s["requests"])
    return out


def make_stack(name: str, model: str, settings: EngineSettings, log_dir: Path, nixl_spin: bool = False) -> Stack:
    if name == "ours":
        return OursRay("ours", model, settings, log_dir=log_dir / name)
    if name == "ray-serve-llm":
        return RayServeLLM(name, model, settings, log_dir=log_dir / name, stream_batching_ms=50.0,
                           nixl_spin=nixl_spin)
    if name == "ray-serve-llm-sb0":
        return RayServeLLM(name, model, settings, log_dir=log_dir / name, stream_batching_ms=0.0,
                           nixl_spin=nixl_spin)
    if name == "reference":
        return ReferenceProxy(name, model, settings, log_dir=log_dir / name, nixl_spin=nixl_spin)
    raise ValueError(f"unknown stack {name!r}; choose from {', '.join(STACKS)}")


PROFILED = ("ours",)
# Stream batching changes only how tokens are framed: one workload shows it (and saves minutes).
STACK_WORKLOADS = {"ray-serve-llm-sb0": ("uniform",)}


def warm_up_workload(model: str, seed: int) -> workloads.Workload:
    """Prompts long enough that every stack disaggregates them (ours above its 256-token
    threshold): the first NIXL handshake and first-request costs stay out of the measured runs."""
    return workloads.uniform(model, seed=seed + 1000, requests=3, prompt=(400, 600), answer=(4, 8), salt="warm-up")


def profiled_run(stack: Stack, workload: workloads.Workload, concurrency: int, out_dir: Path) -> dict[str, Any]:
    """One more closed-loop run, not measured, with py-spy sampling the stack's router, decode and
    Serve processes: where each spends its time."""
    pids = {k: v for k, v in component_roots(stack.launched).items() if k in ("router", "decode", "serve", "prefill")}
    with Profile(pids, out_dir) as prof:
        asyncio.run(driver.drive(stack.url, stack.model_name, workload, concurrency=concurrency, timeout_s=300.0))
    return {"pids": pids, "profiles": prof.summary(), "raw_dir": str(out_dir)}


def side_by_side(names: list[str], model: str, plan: Plan, settings: EngineSettings, log_dir: Path,
                 budget: Budget, seed: int, start_timeout: float, profile: bool = True, nixl_spin: bool = False,
                 checkpoint: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """Each stack in turn; `checkpoint(results)` after each, so a run cut short keeps what it measured."""
    loads = {name: workloads.build(name, model, seed=seed, **plan.shapes[name]) for name in workloads.WORKLOADS}
    warm = warm_up_workload(model, seed)
    results: dict[str, Any] = {"model": Path(model).name, "workloads": {k: w.summary() for k, w in loads.items()},
                               "stacks": []}
    for i, name in enumerate(names):
        entry: dict[str, Any] = {"name": name, "runs": []}
        results["stacks"].append(entry)
        # A stack needs ~3-6 minutes to start, run and stop here; leave it out rather than overrun.
        if budget.left() < 240:
            entry["skipped"] = f"time budget spent ({budget.elapsed() / 60:.1f} min)"
            log.warning("skipping %s: %s", name, entry["skipped"])
            continue
        stack = make_stack(name, model, settings, log_dir, nixl_spin)
        log.info("starting %s", name)
        try:
            with heartbeat(name, "still starting"):
                stack.start(timeout_s=start_timeout)
            log.info("%s up in %.0f s", name, stack.startup_s)
            entry["warm_up_errors"] = asyncio.run(driver.warm_up(stack.url, stack.model_name, warm, n=len(warm)))
            for wname, workload in loads.items():
                if wname not in STACK_WORKLOADS.get(name, workloads.WORKLOADS):
                    continue
                entry["runs"].append(_run(stack.url, stack.model_name, workload, rate=plan.rates[wname], seed=seed))
                if wname in plan.closed:
                    entry["runs"].append(_run(stack.url, stack.model_name, workload, concurrency=plan.closed[wname]))
            if profile and name in PROFILED:
                log.info("%s: profiled run", name)
                entry["profile"] = profiled_run(stack, loads["uniform"], 4, log_dir / name / "profile")
        except Exception as e:  # noqa: BLE001 - one stack failing must not lose the others' results
            log.exception("%s failed", name)
            entry["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        finally:
            entry["memory_mib"] = stack.memory_mib()
            stack.stop()
            entry.update(stack.info())
            log.info("%s stopped in %.0f s", name, stack.shutdown_s or 0)
            checkpoint(results)
    return results


def study(model: str, plan: Plan, settings: EngineSettings, log_dir: Path, budget: Budget, seed: int,
          start_timeout: float, checkpoint: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """The P/D study on the gateway path: the engines start once, the router restarts per arm;
    `checkpoint(results)` after each arm."""
    workers = [GatewayWorker("prefill0", "prefill", settings.prefill_core),
               GatewayWorker("decode0", "decode", settings.prefill_core),
               GatewayWorker("decode1", "decode", settings.decode_core)]
    stack = OursGateway("ours-gateway", model, settings, log_dir=log_dir / "study", workers=workers,
                        # A slow prefill must not fall back to a local one: that would be another arm.
                        # Our connector (the default): vLLM's NixlConnector spins a core per engine
                        # here (NIXL's progress thread), which would load the cores the arms compare.
                        worker_settings=["prefill_timeout_s=600"])
    results: dict[str, Any] = {"model": Path(model).name, "arms": [], "workloads": {}}
    salt = iter(range(1, 1000))

    def load(name: str) -> workloads.Workload:
        # A fresh salt per run: no run hits the prefix cache another run filled.
        w = workloads.build(name, model, seed=seed, salt=f"study-{next(salt)}", **plan.study_shapes[name])
        results["workloads"].setdefault(name, w.summary())
        return w

    def warm() -> workloads.Workload:
        # Long enough to be disaggregated at the default threshold (first NIXL handshake).
        return workloads.uniform(model, seed=seed + 1000, requests=2, prompt=(300, 400), answer=(4, 8),
                                 salt=f"warm-{next(salt)}")

    def arm(label: str, endpoints: list[str], routing: list[str], runs: list[str], **extra: Any) -> None:
        if budget.left() < 60:
            results["arms"].append({"arm": label, "skipped": "time budget spent", **extra})
            log.warning("skipping study arm %s: time budget spent", label)
            return
        router_s = stack.route(endpoints, routing)
        entry = {"arm": label, "endpoints": endpoints, "routing": routing, "router_startup_s": router_s,
                 "runs": [], **extra}
        results["arms"].append(entry)
        entry["warm_up_errors"] = asyncio.run(driver.warm_up(stack.url, stack.model_name, warm()))
        for name in runs:
            log.info("study %s:", label)
            entry["runs"].append(_run(stack.url, stack.model_name, load(name), rate=plan.study_rates[name], seed=seed))
        checkpoint(results)

    try:
        log.info("starting the study's workers (%s)", ", ".join(w.label for w in workers))
        with heartbeat("study", "workers still starting"):
            stack.start(timeout_s=start_timeout)
        results["startup_s"] = stack.startup_s
        arm("aggregated", ["decode0", "decode1"], [], ["mixed", "shared_prefix"])
        arm("round-robin", ["decode0", "decode1"], ROUND_ROBIN, ["shared_prefix"])
        for t in plan.thresholds:
            arm(f"disaggregated t={t}", ["prefill0", "decode1"], [f"routing.pd_threshold_tokens={t}"], ["mixed"],
                threshold=t)
    except Exception as e:  # noqa: BLE001
        log.exception("study failed")
        results["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    finally:
        results["memory_mib"] = stack.memory_mib()
        stack.stop()
        results.update({"startup_s": stack.startup_s, "shutdown_s": stack.shutdown_s, "log_dir": str(stack.log_dir)})
    return results


# -- ratios -------------------------------------------------------------------------------------


def _summary(runs: list[dict[str, Any]], workload: str, closed: bool) -> dict[str, Any] | None:
    """The run's summary; None when the run is missing or had failures (percentiles over only the
    requests that succeeded would flatter the stack that failed)."""
    for r in runs:
        if r["workload"] == workload and r["load"].startswith("closed") == closed:
            return r["summary"] if not r["summary"]["failed"] else None
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _geomean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x]
    return round(math.exp(sum(math.log(x) for x in vals) / len(vals)), 3) if vals else None


def ratios(side: dict[str, Any] | None, pd: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if side:
        stacks = {s["name"]: s for s in side["stacks"] if s.get("runs")}
        ours = stacks.get("ours")
        for peer in ("ray-serve-llm", "ray-serve-llm-sb0", "reference"):
            if ours is None or peer not in stacks:
                continue
            per: dict[str, Any] = {}
            for w in workloads.WORKLOADS:
                o_open, p_open = _summary(ours["runs"], w, False), _summary(stacks[peer]["runs"], w, False)
                o_closed, p_closed = _summary(ours["runs"], w, True), _summary(stacks[peer]["runs"], w, True)
                per[w] = {
                    "ttft_p50": _ratio(o_open and o_open["ttft_p50_ms"], p_open and p_open["ttft_p50_ms"]),
                    "tpot_p50": _ratio(o_open and o_open["tpot_p50_ms"], p_open and p_open["tpot_p50_ms"]),
                    "throughput_closed": _ratio(o_closed and o_closed["output_tok_s"],
                                                p_closed and p_closed["output_tok_s"]),
                }
            out[f"ours_vs_{peer}"] = {
                "per_workload": per,
                "ttft_p50_geomean": _geomean([v["ttft_p50"] for v in per.values()]),
                "throughput_geomean": _geomean([v["throughput_closed"] for v in per.values()]),
            }
    if pd:
        arms = {a["arm"]: a for a in pd.get("arms", []) if a.get("runs")}

        def metric(arm: str, workload: str, key: str, group: str | None = None) -> float | None:
            for r in arms.get(arm, {}).get("runs", []):
                if r["workload"] == workload and not r["summary"]["failed"]:
                    return (r["groups"].get(group, {}) if group else r["summary"]).get(key)
            return None

        disagg = "disaggregated t=256"
        out["itl_p99_disagg_over_agg_mixed"] = _ratio(metric(disagg, "mixed", "itl_p99_ms"),
                                                      metric("aggregated", "mixed", "itl_p99_ms"))
        out["itl_p99_disagg_over_agg_mixed_short_prompts"] = _ratio(
            metric(disagg, "mixed", "itl_p99_ms", "short_prompt"),
            metric("aggregated", "mixed", "itl_p99_ms", "short_prompt"))
        out["ttft_p50_prefix_over_round_robin_shared_prefix"] = _ratio(
            metric("aggregated", "shared_prefix", "ttft_p50_ms"), metric("round-robin", "shared_prefix", "ttft_p50_ms"))
        out["ttft_p99_prefix_over_round_robin_shared_prefix"] = _ratio(
            metric("aggregated", "shared_prefix", "ttft_p99_ms"), metric("round-robin", "shared_prefix", "ttft_p99_ms"))
    return out


# -- entry point -------------------------------------------------------------------------------


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every started stack is stopped on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    budget = Budget(args.budget_min)
    plan = Plan.quick() if args.quick else Plan.full()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc)
    log_dir = Path(f"/tmp/dgb-{stamp:%Y%m%d-%H%M%S}")
    settings = EngineSettings(dtype=args.dtype or native_dtype(), block_size=args.block_size)
    names = [n for n in args.stacks.split(",") if n]
    unknown = [n for n in names if n not in STACKS]
    if unknown:
        print(f"benchmarks.compare: unknown stacks {unknown}; choose from {', '.join(STACKS)}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "date": stamp.isoformat(timespec="seconds"),
        "command": "python -m benchmarks.compare " + " ".join(argv),
        "quick": args.quick, "machine": machine(), "versions": versions(),
        "settings": {"engines": settings.__dict__, "plan": plan.__dict__, "seed": args.seed},
        "logs": str(log_dir),
    }
    name = "compare-quick" if args.quick else "compare"
    json_path = args.json or out_dir / f"{name}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def save(key: str = "", part: dict[str, Any] | None = None) -> None:
        """The report so far, on disk: an interrupted run keeps every finished stack and arm."""
        if part is not None:
            report[key] = part
        report["ratios"] = ratios(report.get("side_by_side"), report.get("pd_study"))
        report["elapsed_s"] = round(budget.elapsed(), 1)
        json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")

    # The study first: its arms are few and each needed; the side by side's last stack is a variant.
    if not args.no_study:
        study_model = ensure_model(args.study_model, "bench")
        save("pd_study", study(study_model, plan, settings, log_dir, budget, args.seed,
                               min(args.start_timeout, STUDY_START_TIMEOUT_S),
                               checkpoint=lambda part: save("pd_study", part)))
    if names:
        model = ensure_model(args.model, "tiny")
        save("side_by_side", side_by_side(names, model, plan, settings, log_dir, budget, args.seed,
                                          args.start_timeout, profile=args.profile, nixl_spin=args.nixl_spin,
                                          checkpoint=lambda part: save("side_by_side", part)))
    save()

    if args.plot is not None:
        plots = [os.path.relpath(p, out_dir) for p in render.plots_at(report, args.plot)]
    else:
        plots = render.plots(report, out_dir, prefix=name)
    if not args.no_readme:
        render.write_readme(report, out_dir / "README.md", os.path.relpath(json_path, out_dir), plots)
    print(json.dumps(report["ratios"], indent=1))
    print(f"wrote {json_path} and {len(plots)} plots in {report['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

