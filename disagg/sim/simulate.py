"""`disagg simulate`: replay a workload or a trace against simulated engines, with the real
scheduler picking every request (`disagg.sim.cluster`), and report what clients would see.

    disagg simulate --profile disagg/sim/profiles/a100-opt-13b.json --prefill 2 --decode 2 \\
        --workload mixed --rate 4 --duration 60 --json sim.json --plot sim.png

Percentiles are computed as `disagg bench serve` computes them (`disagg.bench.driver.percentile`);
TPOT is (last token - first token) / (tokens - 1) per request, as the client measures it. The
prefix hit rate is the fleet's, as vLLM counts it: prompt tokens found in an engine's prefix cache
over prompt tokens looked up, summed over engines (a remote prefill is looked up on both sides).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import simpy
import yaml

from disagg.bench.driver import percentile
from disagg.bench.progress import say
from disagg.config import RoutingConfig
from disagg.sim import trace
from disagg.sim.cluster import Cluster, Deployment, Faults
from disagg.sim.cost import CostModel
from disagg.sim.trace import SimRequest


@dataclass(frozen=True)
class Slo:
    ttft_s: float | None = None
    tpot_s: float | None = None

    def met(self, ttft: float | None, tpot: float | None) -> bool:
        return ((self.ttft_s is None or (ttft is not None and ttft <= self.ttft_s))
                and (self.tpot_s is None or tpot is None or tpot <= self.tpot_s))


@dataclass
class SimResult:
    summary: dict[str, Any]
    roles: dict[str, Any]
    faults: dict[str, int]
    timeline: dict[str, Any]
    requests: dict[str, list]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def simulate(cost: CostModel, deployment: Deployment, requests: Iterable[SimRequest], *, faults: Faults | None = None,
             slo: Slo = Slo(), seed: int = 0, total: int | None = None, drain_s: float = 120.0,
             sample_every_s: float = 1.0, progress: bool = True) -> SimResult:
    """Run one simulation to the end of its requests (or `drain_s` after the last arrival)."""
    started = time.monotonic()
    env = simpy.Environment()
    cluster = Cluster(env, cost, deployment, faults=faults, seed=seed, sample_every_s=sample_every_s)
    replay = cluster.replay(requests, total, progress)
    env.run(until=cluster.sent_all)
    env.run(until=replay | env.timeout(drain_s))  # every request has an outcome, or the drain ends
    cluster.settle()
    if cluster.open_leases:  # let the leases of loads that never came run out
        env.run(until=env.now + cost.stack.kv_lease_s + 1e-6)
    return _result(cluster, deployment, slo, time.monotonic() - started)


def _result(cluster: Cluster, d: Deployment, slo: Slo, wall_s: float) -> SimResult:
    outs = cluster.outcomes
    done = [o for o in outs if o.status == "completed"]
    ttft = [o.ttft_s for o in done]
    tpot = [o.tpot_s for o in done if o.tpot_s is not None]
    span = max((o.arrival_s for o in outs), default=0.0) or 1.0
    good = sum(slo.met(o.ttft_s, o.tpot_s) for o in done)
    engines = cluster.engines.values()
    queries = sum(e.prefix_queries for e in engines)
    tokens = sum(o.output_tokens for o in done)
    horizon = cluster.last_outcome_s or cluster.env.now or 1.0

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    count = {s: sum(o.status == s for o in outs) for s in ("completed", "failed", "rejected", "unfinished", "lost")}
    summary = {
        "requests": len(outs), **count,
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p90": ms(percentile(ttft, 90)),
        "ttft_ms_p99": ms(percentile(ttft, 99)),
        "tpot_ms_p50": ms(percentile(tpot, 50)), "tpot_ms_p90": ms(percentile(tpot, 90)),
        "tpot_ms_p99": ms(percentile(tpot, 99)),
        "e2e_ms_p50": ms(percentile([o.e2e_s for o in done], 50)),
        "e2e_ms_p99": ms(percentile([o.e2e_s for o in done], 99)),
        "prefix_hit_rate": round(sum(e.prefix_hits for e in engines) / queries, 4) if queries else None,
        "remote_fraction": round(cluster.counters.remote / max(cluster.counters.picks, 1), 4),
        "slo": {"ttft_ms": ms(slo.ttft_s), "tpot_ms": ms(slo.tpot_s)},
        "slo_attainment": round(good / len(outs), 4) if outs else None,
        "goodput_rps": round(good / span, 3),
        "goodput_per_engine": round(good / span / max(d.engines, 1), 4),
        "output_tok_s": round(tokens / horizon, 1),
        "output_tok_s_per_engine": round(tokens / horizon / max(d.engines, 1), 2),
        "engines": d.engines, "simulated_s": round(horizon, 3), "wall_s": round(wall_s, 2),
    }
    roles: dict[str, Any] = {}
    for label in sorted({e.label for e in engines}):
        mine = [e for e in engines if e.label == label]
        q = sum(e.prefix_queries for e in mine)
        roles[label] = {"engines": len(mine),
                        "utilisation": round(sum(e.busy_s for e in mine) / (len(mine) * horizon), 4),
                        "prefix_hit_rate": round(sum(e.prefix_hits for e in mine) / q, 4) if q else None,
                        "preemptions": sum(e.preemptions for e in mine), "steps": sum(e.steps for e in mine),
                        "died": sum(not e.alive for e in mine)}
    tl = cluster.timeline
    columns = ("index", "group", "arrival_s", "status", "decision", "prompt_tokens", "output_tokens")
    requests: dict[str, list] = {c: [getattr(o, c) for o in outs] for c in columns}
    for c in ("ttft_s", "tpot_s", "e2e_s"):
        requests[c.replace("_s", "_ms")] = [ms(getattr(o, c)) for o in outs]
    requests["prefill_attempts"] = [o.prefill_attempts for o in outs]
    return SimResult(summary, roles, asdict(cluster.counters), {"every_s": tl.every_s, "t": tl.t, "roles": tl.roles},
                     requests)


# -- command line ---------------------------------------------------------------------------------


def add_source_args(p: argparse.ArgumentParser) -> None:
    """The flags that say what is replayed (shared with `disagg plan`)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workload", choices=["mixed", "uniform", "shared_prefix"])
    src.add_argument("--trace", type=Path, help="Mooncake-format JSONL trace")
    p.add_argument("--workload-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a workload builder's parameter, e.g. long_fraction=0.8 or prompt=[64,512]")
    p.add_argument("--model", help="with --workload: tokenize the very prompts `disagg bench serve` sends with this "
                                   "model's tokenizer (default: synthetic token ids)")
    p.add_argument("--rate", type=float, help="requests/s (Poisson; a trace is scaled to it)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    p.add_argument("--requests", type=int, help="this many requests (instead of rate x duration)")
    p.add_argument("--seed", type=int, default=0)


def requests_of(args: argparse.Namespace) -> list[SimRequest] | Iterable[SimRequest]:
    if args.trace is not None:
        reqs = trace.mooncake(args.trace, rate=args.rate, limit=args.requests)
        return [r for r in reqs if args.requests or r.arrival_s < args.duration]
    rate = args.rate or 10.0
    n = args.requests or max(int(rate * args.duration), 1)
    return trace.workload(args.workload, requests=n, rate=rate, seed=args.seed, model_dir=args.model,
                          **settings(args.workload_arg))


def settings(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` items, values parsed as YAML (lists become tuples)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        v = yaml.safe_load(value)
        out[key.strip()] = tuple(v) if isinstance(v, list) else v
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="disagg simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="cost model JSON (disagg profile, or disagg/sim/profiles/)")
    p.add_argument("--prefill", type=int, required=True)
    p.add_argument("--decode", type=int, required=True)
    p.add_argument("--aggregated", type=int, default=0, help="engines serving both (no prefill role)")
    add_source_args(p)
    p.add_argument("--pd-threshold", type=int, help="routing.pd_threshold_tokens")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a RoutingConfig field")
    p.add_argument("--kill-prefill-at", type=float, metavar="S", help="a prefill engine dies at S seconds")
    p.add_argument("--kill-decode-at", type=float, metavar="S", help="a decode engine dies at S seconds")
    p.add_argument("--transfer-failures", type=float, default=0.0, metavar="FRACTION")
    p.add_argument("--slo-ttft-ms", type=float)
    p.add_argument("--slo-tpot-ms", type=float)
    p.add_argument("--drain", type=float, default=120.0, help="seconds simulated past the last arrival at most")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    if args.prefill < 0 or args.decode < 0 or args.aggregated < 0 or args.decode + args.aggregated < 1:
        p.error("need at least one decode or aggregated engine, and no negative counts")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cost = CostModel.load(args.profile)
    routing = RoutingConfig(**settings(args.set), **({} if args.pd_threshold is None
                                                     else {"pd_threshold_tokens": args.pd_threshold}))
    deployment = Deployment(args.prefill, args.decode, args.aggregated, routing)
    faults = Faults(args.kill_prefill_at, args.kill_decode_at, args.transfer_failures)
    slo = Slo(args.slo_ttft_ms / 1000 if args.slo_ttft_ms else None,
              args.slo_tpot_ms / 1000 if args.slo_tpot_ms else None)
    total = args.requests or (None if args.trace else int((args.rate or 10.0) * args.duration))
    say("simulate", f"{cost.name}: {args.prefill} prefill + {args.decode} decode + {args.aggregated} aggregated, "
                    f"{args.workload or args.trace}, {total or 'all'} requests")
    result = simulate(cost, deployment, requests_of(args), faults=faults, slo=slo, seed=args.seed, total=total,
                      drain_s=args.drain)
    report = {"command": "disagg simulate " + " ".join(sys.argv[1:] if argv is None else argv),
              "profile": cost.name, "deployment": {"prefill": args.prefill, "decode": args.decode,
                                                   "aggregated": args.aggregated, "routing": routing.model_dump(),
                                                   "prefill_attempts": deployment.prefill_attempts,
                                                   "stream_window_s": deployment.stream_window_s},
              "workload": {"name": args.workload, "trace": str(args.trace) if args.trace else None,
                           "rate": args.rate, "duration": args.duration, "seed": args.seed,
                           "args": args.workload_arg, "model": args.model},
              "injected": asdict(faults), **result.to_json()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report) + "\n")
    if args.plot:
        from disagg.sim.plots import plot_simulation

        plot_simulation(report, args.plot)
    s = result.summary
    say("simulate", f"{s['completed']}/{s['requests']} completed ({s['failed']} failed, {s['rejected']} rejected, "
                    f"{s['unfinished']} unfinished, {s['lost']} lost); TTFT p50/p99 {s['ttft_ms_p50']}/"
                    f"{s['ttft_ms_p99']} ms, TPOT p50/p99 {s['tpot_ms_p50']}/{s['tpot_ms_p99']} ms, prefix hit "
                    f"{s['prefix_hit_rate']}, {s['wall_s']} s wall; wrote {args.json}")
    print(json.dumps({"summary": s, "faults": result.faults}, indent=1))
    return 0 if s["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
