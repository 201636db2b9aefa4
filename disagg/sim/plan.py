"""`disagg plan`: which deployment serves this traffic within the SLO on the fewest engines.

For the workload (or trace) at `--rate`, every configuration within `--max-engines` is simulated
with the real scheduler (`disagg.sim.simulate`):

    disaggregated  P prefill + D decode engines, for each P/D threshold in `--thresholds`
    aggregated     K engines that prefill and decode (no prefill role, no KV transfer)

A configuration meets the SLO when its TTFT p90 and TPOT p90 are within it. Its goodput is the
requests per second that met both (each request judged on its own), and the recommendation is
the configuration that meets the SLO with the highest goodput per engine (none meets it: the
highest goodput per engine, flagged). Configurations whose goodput per engine cannot beat the
best of their kind so far even if every request met the SLO (rate / engines) are not simulated.

The Pareto table and plot put output tokens/s per engine against tokens/s per user (1 / TPOT
p50), as AIConfigurator does; the answer comes with the AppConfig and Helm values that deploy it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from disagg.bench.progress import say
from disagg.config import RoutingConfig
from disagg.sim.cost import CostModel
from disagg.sim.simulate import Deployment, Slo, add_source_args, requests_of, simulate
from disagg.sim.trace import SimRequest

DEFAULT_THRESHOLDS = (0, 256, 1024)


@dataclass(frozen=True)
class Candidate:
    prefill: int
    decode: int
    aggregated: int
    pd_threshold_tokens: int

    @property
    def engines(self) -> int:
        return self.prefill + self.decode + self.aggregated

    @property
    def kind(self) -> str:
        return "aggregated" if self.aggregated else "disaggregated"

    @property
    def name(self) -> str:
        return f"{self.aggregated}A" if self.aggregated else f"{self.prefill}P{self.decode}D@{self.pd_threshold_tokens}"


@dataclass
class Row:
    """One configuration's simulated figures."""

    name: str
    kind: str
    prefill: int
    decode: int
    aggregated: int
    pd_threshold_tokens: int
    engines: int
    meets_slo: bool
    ttft_ms_p90: float | None
    tpot_ms_p90: float | None
    tpot_ms_p50: float | None
    slo_attainment: float | None
    goodput_rps: float
    goodput_per_engine: float
    tok_s_per_engine: float
    tok_s_per_user: float
    lost: int
    pareto: bool = False


def candidates(max_engines: int, thresholds: Sequence[int]) -> list[Candidate]:
    """Every configuration within `max_engines`, smallest first."""
    out = []
    for n in range(1, max_engines + 1):
        out.append(Candidate(0, 0, n, RoutingConfig.model_fields["pd_threshold_tokens"].default))
        out += [Candidate(p, n - p, 0, t) for p in range(1, n) for t in thresholds]
    return out


def evaluate(cost: CostModel, candidate: Candidate, requests: list[SimRequest], slo: Slo, seed: int,
             routing: RoutingConfig) -> Row:
    d = Deployment(candidate.prefill, candidate.decode, candidate.aggregated,
                   routing.model_copy(update={"pd_threshold_tokens": candidate.pd_threshold_tokens}))
    s = simulate(cost, d, requests, slo=slo, seed=seed, progress=False, drain_s=30.0, sample_every_s=10.0).summary
    meets = (s["ttft_ms_p90"] is not None and (slo.ttft_s is None or s["ttft_ms_p90"] <= slo.ttft_s * 1e3)
             and (slo.tpot_s is None or s["tpot_ms_p90"] is None or s["tpot_ms_p90"] <= slo.tpot_s * 1e3)
             and s["completed"] >= 0.9 * s["requests"])
    return Row(candidate.name, candidate.kind, candidate.prefill, candidate.decode, candidate.aggregated,
               candidate.pd_threshold_tokens, candidate.engines, meets, s["ttft_ms_p90"], s["tpot_ms_p90"],
               s["tpot_ms_p50"], s["slo_attainment"], s["goodput_rps"], s["goodput_per_engine"],
               s["output_tok_s_per_engine"], round(1000 / s["tpot_ms_p50"], 2) if s["tpot_ms_p50"] else 0.0,
               s["lost"])


def search(cost: CostModel, requests: list[SimRequest], *, slo: Slo, max_engines: int,
           thresholds: Sequence[int] = DEFAULT_THRESHOLDS, seed: int = 0, routing: RoutingConfig | None = None,
           progress: bool = True) -> list[Row]:
    """Simulate the candidates that can still win (see the module docstring)."""
    routing = routing or RoutingConfig()
    rows: list[Row] = []
    best = {"aggregated": 0.0, "disaggregated": 0.0}  # per kind, so that both kinds' best are known
    todo = candidates(max_engines, thresholds)
    offered = len(requests) / (max(r.arrival_s for r in requests) or 1.0)  # goodput's most, in requests/s
    started = time.monotonic()
    for i, c in enumerate(todo):
        if offered / c.engines <= best[c.kind]:
            continue  # even with every request good it cannot beat the best of its kind
        row = evaluate(cost, c, requests, slo, seed, routing)
        rows.append(row)
        if row.meets_slo:
            best[c.kind] = max(best[c.kind], row.goodput_per_engine)
        if progress:
            say("plan", f"{i + 1}/{len(todo)} {c.name}: TTFT p90 {row.ttft_ms_p90} ms, TPOT p90 {row.tpot_ms_p90} ms, "
                        f"goodput/engine {row.goodput_per_engine} {'(meets the SLO)' if row.meets_slo else ''}; "
                        f"{time.monotonic() - started:.0f} s")
    _mark_pareto(rows)
    return rows


def _mark_pareto(rows: list[Row]) -> None:
    for r in rows:
        r.pareto = not any(o.tok_s_per_engine >= r.tok_s_per_engine and o.tok_s_per_user >= r.tok_s_per_user
                           and (o.tok_s_per_engine, o.tok_s_per_user) != (r.tok_s_per_engine, r.tok_s_per_user)
                           for o in rows)


def recommend(rows: list[Row]) -> Row | None:
    meeting = [r for r in rows if r.meets_slo]
    pool = meeting or rows
    return max(pool, key=lambda r: (r.goodput_per_engine, -r.engines, r.tok_s_per_user), default=None)


def best_of(rows: list[Row], kind: str) -> Row | None:
    return recommend([r for r in rows if r.kind == kind])


def values_for(row: Row, cost: CostModel) -> dict[str, Any]:
    """What deploys `row`: AppConfig keys (`disagg serve --config`) and the Helm chart's values."""
    aggregated = bool(row.aggregated)
    decode = row.aggregated or row.decode
    app = {"block_size": cost.limits.block_size, "prefill": {"replicas": row.prefill},
           "decode": {"replicas": decode}, "routing": {"pd_threshold_tokens": row.pd_threshold_tokens}}
    helm = {"engine": {"blockSize": cost.limits.block_size}, "prefill": {"replicas": row.prefill},
            "decode": {"replicas": decode}, "routing": {"pdThresholdTokens": row.pd_threshold_tokens}}
    if aggregated:
        app["kv_connector"] = "none"
        helm["engine"]["kvConnector"] = "none"
    return {"app_config": app, "helm_values": helm}


def table(rows: list[Row]) -> str:
    lines = ["| config | engines | TTFT p90 ms | TPOT p90 ms | SLO met by | goodput/engine | tok/s/engine | "
             "tok/s/user | meets SLO | Pareto |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r.goodput_per_engine):
        lines.append(f"| {r.name} | {r.engines} | {r.ttft_ms_p90} | {r.tpot_ms_p90} | {r.slo_attainment} | "
                     f"{r.goodput_per_engine} | {r.tok_s_per_engine} | {r.tok_s_per_user} | "
                     f"{'yes' if r.meets_slo else 'no'} | {'*' if r.pareto else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="disagg plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="cost model JSON (disagg profile, or disagg/sim/profiles/)")
    add_source_args(p)
    p.add_argument("--slo-ttft-ms", type=float, required=True, help="TTFT p90 target")
    p.add_argument("--slo-tpot-ms", type=float, required=True, help="TPOT p90 target")
    p.add_argument("--max-engines", type=int, required=True)
    p.add_argument("--thresholds", default=",".join(map(str, DEFAULT_THRESHOLDS)),
                   help="P/D thresholds (uncached prompt tokens) to try, comma-separated")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    if args.rate is None:
        p.error("--rate is required")
    cost = CostModel.load(args.profile)
    requests = list(requests_of(args))
    slo = Slo(args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
    thresholds = [int(t) for t in args.thresholds.split(",") if t.strip()]
    say("plan", f"{cost.name}: {len(requests)} requests at {args.rate}/s, SLO TTFT p90 {args.slo_ttft_ms} ms / "
                f"TPOT p90 {args.slo_tpot_ms} ms, up to {args.max_engines} engines, thresholds {thresholds}")
    started = time.monotonic()
    rows = search(cost, requests, slo=slo, max_engines=args.max_engines, thresholds=thresholds,
                  seed=args.seed)
    best = recommend(rows)
    report: dict[str, Any] = {
        "command": "disagg plan " + " ".join(argv),
        "inputs": {"profile": cost.name, "workload": args.workload or str(args.trace), "rate": args.rate,
                   "requests": len(requests), "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
                   "max_engines": args.max_engines, "thresholds": thresholds, "seed": args.seed},
        "recommended": None, "meets_slo": bool(best and best.meets_slo),
        "best_disaggregated": None, "best_aggregated": None,
        "configurations": [asdict(r) for r in rows], "wall_s": None,
    }
    if best is not None:
        report["recommended"] = {**asdict(best), **values_for(best, cost)}
    for kind in ("disaggregated", "aggregated"):
        b = best_of(rows, kind)
        report[f"best_{kind}"] = asdict(b) if b else None
    report["wall_s"] = round(time.monotonic() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        from disagg.sim.plots import plot_plan

        plot_plan(report, args.plot)
    print(table(rows))
    if best is not None:
        print(f"\nrecommended: {best.name} ({best.engines} engines), goodput {best.goodput_per_engine} req/s per engine"
              f"{'' if best.meets_slo else ' (NO configuration meets the SLO at p90: the best of them)'}")
        print(json.dumps(values_for(best, cost), indent=1))
    say("plan", f"{len(rows)} configurations simulated in {report['wall_s']} s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
