"""The plots of `disagg profile`, `disagg simulate` and `disagg plan` (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from disagg.sim.cost import CostModel, attention


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def plot_profile(cost: CostModel, path: Path) -> None:
    """Measured points against the fitted model: prefill by prompt tokens, decode by batch."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    prefill = next((v for k, v in cost.points.items() if k.startswith("prefill")), [])
    decode = next((v for k, v in cost.points.items() if k.startswith("decode")), [])
    for cached in sorted({int(p[0]) for p in prefill}):
        pts = sorted((p for p in prefill if int(p[0]) == cached), key=lambda p: p[1])
        a.plot([p[1] for p in pts], [p[2] * 1e3 for p in pts], "o", label=f"measured, {cached} cached")
        a.plot([p[1] for p in pts], [cost.step_s(int(p[1]), attention(cached, int(p[1])), 0, 0) * 1e3 for p in pts],
               "-", alpha=0.6)
    a.set(xlabel="new prompt tokens", ylabel="ms", title=f"prefill (fit rms {cost.fit['prefill'].rms_relative:.1%})")
    a.legend(fontsize=7)
    for context in sorted({int(p[1]) for p in decode}):
        pts = sorted((p for p in decode if int(p[1]) == context), key=lambda p: p[0])
        b.plot([p[0] for p in pts], [p[2] * 1e3 for p in pts], "o", label=f"measured, context {context}")
        b.plot([p[0] for p in pts], [cost.step_s(0, 0, int(p[0]), int(p[0] * (context + 12))) * 1e3 for p in pts],
               "-", alpha=0.6)
    b.set(xlabel="batch (sequences decoding)", ylabel="ms per step",
          title=f"decode (fit rms {cost.fit['decode'].rms_relative:.1%})")
    b.legend(fontsize=7)
    fig.suptitle(f"{cost.name}: {cost.hardware}", fontsize=9)
    _save(fig, path)


def _cdf(ax: Any, values: list[float], label: str) -> None:
    xs = sorted(v for v in values if v is not None)
    if xs:
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)


def plot_simulation(report: dict[str, Any], path: Path) -> None:
    """TTFT and TPOT distributions, and per role utilisation and queueing over time."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    req = report["requests"]
    groups = sorted(set(req["group"]))
    for ax, metric in ((axes[0][0], "ttft_ms"), (axes[0][1], "tpot_ms")):
        _cdf(ax, req[metric], "all")
        if 1 < len(groups) <= 4:
            for g in groups:
                _cdf(ax, [v for v, gg in zip(req[metric], req["group"]) if gg == g], g)
        ax.set(xlabel=f"{metric.removesuffix('_ms').upper()} (ms)", ylabel="fraction of requests")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    tl = report["timeline"]
    for label, series in tl["roles"].items():
        axes[1][0].plot(tl["t"], series["busy"], label=label)
        axes[1][1].plot(tl["t"], series["waiting"], label=label)
    axes[1][0].set(xlabel="simulated s", ylabel="busy fraction", title="utilisation")
    axes[1][1].set(xlabel="simulated s", ylabel="requests waiting (sum)", title="queueing")
    axes[1][0].legend(fontsize=7)
    axes[1][1].legend(fontsize=7)
    s, d = report["summary"], report["deployment"]
    fig.suptitle(f"{report['profile']}: {d['prefill']}P + {d['decode']}D + {d['aggregated']}A; TTFT p50/p99 "
                 f"{s['ttft_ms_p50']}/{s['ttft_ms_p99']} ms, TPOT p50/p99 {s['tpot_ms_p50']}/{s['tpot_ms_p99']} ms, "
                 f"{s['completed']}/{s['requests']} completed, {s['lost']} lost", fontsize=9)
    _save(fig, path)


def plot_plan(report: dict[str, Any], path: Path) -> None:
    """Every configuration tried: tokens/s per engine against tokens/s per user, the Pareto front
    joined, SLO misses hollow, the recommendation circled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    rows = report["configurations"]
    for kind, color in (("disaggregated", "tab:blue"), ("aggregated", "tab:orange")):
        mine = [r for r in rows if r["kind"] == kind]
        ok = [r for r in mine if r["meets_slo"]]
        bad = [r for r in mine if not r["meets_slo"]]
        ax.scatter([r["tok_s_per_user"] for r in ok], [r["tok_s_per_engine"] for r in ok], color=color, label=kind)
        ax.scatter([r["tok_s_per_user"] for r in bad], [r["tok_s_per_engine"] for r in bad], facecolors="none",
                   edgecolors=color, label=f"{kind}, misses the SLO")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["tok_s_per_user"])
    ax.plot([r["tok_s_per_user"] for r in front], [r["tok_s_per_engine"] for r in front], "k--", lw=0.8,
            label="Pareto front")
    for r in rows:
        ax.annotate(r["name"], (r["tok_s_per_user"], r["tok_s_per_engine"]), fontsize=6, alpha=0.7)
    best = report.get("recommended")
    if best:
        ax.scatter([best["tok_s_per_user"]], [best["tok_s_per_engine"]], s=250, facecolors="none", edgecolors="red",
                   label="recommended")
    ax.set(xlabel="output tokens/s per user (1 / TPOT p50)", ylabel="output tokens/s per engine")
    ax.legend(fontsize=7)
    w = report["inputs"]
    ax.set_title(f"{w['profile']}: {w['workload']} at {w['rate']}/s, SLO TTFT {w['slo_ttft_ms']} ms / TPOT "
                 f"{w['slo_tpot_ms']} ms (p90)", fontsize=9)
    _save(fig, path)
