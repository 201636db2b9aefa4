"""Plots and the markdown report of a `python -m benchmarks.compare` run (from its JSON alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from disagg.bench.results import fmt

GOALS = {
    "ttft": "ours/Ray Serve LLM P/D TTFT p50 <= 0.7",
    "throughput": "ours/Ray Serve LLM P/D throughput >= 1.3",
    "itl": "decode ITL p99 disaggregated/aggregated (ii) <= 0.33",
    "prefix": "TTFT prefix-aware/round robin (i) <= 0.33",
}


def _contention(run: dict[str, Any]) -> str:
    c = (run.get("contention") or {}).get("before")
    return f"{c['load_avg_1m']:.0f} / {c['probe_ms']:.0f}" if c else "-"


def _stacks(report: dict[str, Any]) -> list[dict[str, Any]]:
    return (report.get("side_by_side") or {}).get("stacks", [])


def _arms(report: dict[str, Any]) -> list[dict[str, Any]]:
    return (report.get("pd_study") or {}).get("arms", [])


# -- plots ----------------------------------------------------------------------------------------


def plots(report: dict[str, Any], out_dir: Path, prefix: str) -> list[str]:
    """PNG files written as PREFIX-NAME.png (names relative to out_dir); none when matplotlib is
    missing."""
    return [p.name for p in _plots(report, lambda name, first: out_dir / f"{prefix}-{name}.png")]


def plots_at(report: dict[str, Any], path: Path) -> list[Path]:
    """The first plot the report has (the side by side, else the P/D study) at `path`, the others
    beside it as STEM-NAME.png (`--plot FILE`); none when matplotlib is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return _plots(report, lambda name, first: path if first else path.with_name(f"{path.stem}-{name}.png"))


def _plots(report: dict[str, Any], path_for: Callable[[str, bool], Path]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = path_for(name, not written)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    stacks = [s for s in _stacks(report) if s.get("runs")]
    if stacks:
        keys = sorted({(r["workload"], r["load"]) for s in stacks for r in s["runs"]})
        panels = [("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"),
                  ("tpot_p50_ms", "TPOT p50 (ms)"), ("output_tok_s", "output tokens/s")]
        fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.2 * len(keys)), 3.2 * len(panels)))
        width = 0.8 / len(stacks)
        for ax, (metric, title) in zip(axes, panels):
            for i, s in enumerate(stacks):
                by_key = {(r["workload"], r["load"]): r["summary"].get(metric) for r in s["runs"]}
                ax.bar([k + i * width for k in range(len(keys))], [by_key.get(k) or 0 for k in keys], width,
                       label=s["name"])
            ax.set_xticks([k + width * (len(stacks) - 1) / 2 for k in range(len(keys))])
            ax.set_xticklabels([f"{w}\n{load}" for w, load in keys], fontsize=8)
            ax.set_title(title)
        axes[0].legend(fontsize=8)
        save(fig, "stacks")

        fig, ax = plt.subplots(figsize=(8, 4))
        components = sorted({c for s in stacks for c in s.get("memory_mib", {})})
        bottoms = [0.0] * len(stacks)
        for c in components:
            vals = [s.get("memory_mib", {}).get(c, 0) for s in stacks]
            ax.bar([s["name"] for s in stacks], vals, bottom=bottoms, label=c)
            bottoms = [b + v for b, v in zip(bottoms, vals)]
        ax.set_ylabel("peak RSS (MiB), per component")
        ax.legend(fontsize=8)
        save(fig, "memory")

    arms = [a for a in _arms(report) if a.get("runs")]
    if arms:
        sweep = sorted((a["threshold"], a) for a in arms if "threshold" in a)
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        labels, itl = [], []
        for a in arms:
            for r in a["runs"]:
                if r["workload"] == "mixed":
                    labels.append(a["arm"].replace("disaggregated ", "disagg "))
                    itl.append(r["summary"].get("itl_p99_ms") or 0)
        axes[0].bar(labels, itl)
        axes[0].set_title("(ii) mixed: decode ITL p99 (ms)")
        axes[0].tick_params(axis="x", rotation=30, labelsize=8)
        labels, ttft = [], []
        for a in arms:
            for r in a["runs"]:
                if r["workload"] == "shared_prefix":
                    labels.append("prefix-aware" if a["arm"] == "aggregated" else a["arm"])
                    ttft.append(r["summary"].get("ttft_p50_ms") or 0)
        axes[1].bar(labels, ttft)
        axes[1].set_title("(i) shared prefix: TTFT p50 (ms)")
        if sweep:
            xs = [str(t) for t, _ in sweep]
            for metric, label in (("itl_p99_ms", "ITL p99"), ("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99")):
                ys = [next((r["summary"].get(metric) or 0 for r in a["runs"] if r["workload"] == "mixed"), 0)
                      for _, a in sweep]
                axes[2].plot(xs, ys, marker="o", label=label)
            axes[2].set_xlabel("pd_threshold_tokens")
            axes[2].set_ylabel("ms")
            axes[2].set_title("(ii) mixed: P/D threshold sweep")
            axes[2].legend(fontsize=8)
        save(fig, "pd-study")
    return written


# -- markdown -------------------------------------------------------------------------------------


def markdown(report: dict[str, Any], json_name: str, plot_names: list[str]) -> str:
    m = report["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m benchmarks.compare` (drivers in `disagg/bench/`). This machine is shared and noisy:",
        "only ratios between stacks measured in the same run mean anything; absolute numbers do not",
        "carry over to other machines or runs.",
        "",
        f"- date: {report['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, load average at start "
        f"{m['load_avg_at_start']} ({m['platform']})",
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items()),
        f"- command: `{report['command']}` ({report['elapsed_s'] / 60:.1f} min); raw results: `{json_name}`",
        "",
    ]
    ratios = report.get("ratios", {})
    if ratios:
        lines += ["## Headline ratios (one run)", "", "| ratio | value | goal |", "|---|---|---|"]
        for peer in ("ray-serve-llm", "ray-serve-llm-sb0", "reference"):
            r = ratios.get(f"ours_vs_{peer}")
            if r:
                lines.append(f"| TTFT p50 ours / {peer} (geomean of workloads) | {fmt(r['ttft_p50_geomean'])} | "
                             f"{'<= 0.7' if peer.startswith('ray') else ''} |")
                lines.append(f"| output tok/s ours / {peer}, closed loop (geomean) | {fmt(r['throughput_geomean'])} | "
                             f"{'>= 1.3' if peer.startswith('ray') else ''} |")
        for key, label, goal in (
            ("itl_p99_disagg_over_agg_mixed", "decode ITL p99 disaggregated / aggregated, (ii) mixed", "<= 0.33"),
            ("itl_p99_disagg_over_agg_mixed_short_prompts", "  the same, short-prompt (long-answer) requests only", ""),
            ("ttft_p50_prefix_over_round_robin_shared_prefix", "TTFT p50 prefix-aware / round robin, (i) shared prefix",
             "<= 0.33"),
            ("ttft_p99_prefix_over_round_robin_shared_prefix", "TTFT p99 prefix-aware / round robin, (i)", ""),
        ):
            if key in ratios:
                lines.append(f"| {label} | {fmt(ratios[key])} | {goal} |")
        lines.append("")
        per = {k: v for k, v in ratios.items() if k.startswith("ours_vs_")}
        if per:
            lines += ["Per workload (ours / peer): TTFT p50 (open loop), TPOT p50 (open loop), output tok/s "
                      "(closed loop).", "", "| peer | workload | TTFT p50 | TPOT p50 | tok/s |", "|---|---|---|---|---|"]
            for key, r in per.items():
                for w, v in r["per_workload"].items():
                    lines.append(f"| {key.removeprefix('ours_vs_')} | {w} | {fmt(v['ttft_p50'])} | "
                                 f"{fmt(v['tpot_p50'])} | {fmt(v['throughput_closed'])} |")
            lines.append("")

    side = report.get("side_by_side")
    if side:
        lines += [f"## Side by side (model `{side['model']}`, prefill on core 0, decode on core 1)", ""]
        for w, s in side["workloads"].items():
            lines.append(f"- {w}: {s['requests']} requests, prompts {s['prompt_tokens_min']}-{s['prompt_tokens_max']} "
                         f"tokens ({s['prompt_tokens_total']} in all), {s['output_tokens_total']} output tokens")
        lines += ["", "Machine contention before each run: 1-minute load average and a fixed pure-Python probe "
                  "(~20 ms on an idle core).", "",
                  "| stack | workload | load | TTFT p50/p99 ms | ITL p50/p99 ms | TPOT p50/p99 ms | tok/s | "
                  "req/s | failed | load avg / probe ms |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in _stacks(report):
            if not s.get("runs"):
                why = (s.get("error") or s.get("skipped") or "").replace("\n", " ").replace("|", "/")[:160]
                lines.append(f"| {s['name']} | - | - | - | - | - | - | - | {why} | |")
                continue
            for r in s["runs"]:
                x = r["summary"]
                lines.append(
                    f"| {s['name']} | {r['workload']} | {r['load']} | {fmt(x['ttft_p50_ms'])}/{fmt(x['ttft_p99_ms'])} | "
                    f"{fmt(x['itl_p50_ms'])}/{fmt(x['itl_p99_ms'])} | {fmt(x['tpot_p50_ms'])}/{fmt(x['tpot_p99_ms'])} | "
                    f"{fmt(x['output_tok_s'])} | {fmt(x['req_s'])} | {x['failed']}/{x['requests']} | "
                    f"{_contention(r)} |")
        lines += ["", "Start-up, shut-down and peak memory (RSS summed per component's process tree; shared pages "
                  "count in every process, so these are upper bounds):", "",
                  "| stack | start s | stop s | peak RSS MiB per component |", "|---|---|---|---|"]
        for s in _stacks(report):
            mem = ", ".join(f"{k} {v:.0f}" for k, v in (s.get("memory_mib") or {}).items())
            lines.append(f"| {s['name']} | {fmt(s.get('startup_s'))} | {fmt(s.get('shutdown_s'))} | {mem} |")
        lines.append("")

    pd = report.get("pd_study")
    if pd:
        lines += [f"## P/D study (model `{pd['model']}`, gateway path: standalone workers + EPP + Envoy)", "",
                  "Engines: prefill0 (core 0), decode0 (core 0), decode1 (core 1); the router restarts per arm. "
                  "Aggregated = decode0 + decode1 (two engines, one core each, local prefill); disaggregated = "
                  "prefill0 + decode1 (the same two cores); round robin = aggregated with every scorer weight 0.",
                  ""]
        for w, s in pd.get("workloads", {}).items():
            lines.append(f"- {w}: {s['requests']} requests, prompts {s['prompt_tokens_min']}-{s['prompt_tokens_max']} "
                         "tokens")
        lines += ["", "| arm | workload | load | TTFT p50/p99 ms | ITL p50/p99 ms | TPOT p50/p99 ms | "
                  "short-prompt ITL p99 ms | tok/s | failed | load avg / probe ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for a in _arms(report):
            if not a.get("runs"):
                lines.append(f"| {a['arm']} | - | - | - | - | - | - | - | {a.get('skipped', '')} | |")
                continue
            for r in a["runs"]:
                x = r["summary"]
                short = r["groups"].get("short_prompt", {}).get("itl_p99_ms")
                lines.append(
                    f"| {a['arm']} | {r['workload']} | {r['load']} | {fmt(x['ttft_p50_ms'])}/{fmt(x['ttft_p99_ms'])} | "
                    f"{fmt(x['itl_p50_ms'])}/{fmt(x['itl_p99_ms'])} | {fmt(x['tpot_p50_ms'])}/{fmt(x['tpot_p99_ms'])} | "
                    f"{fmt(short)} | {fmt(x['output_tok_s'])} | {x['failed']}/{x['requests']} | {_contention(r)} |")
        mem = ", ".join(f"{k} {v:.0f}" for k, v in (pd.get("memory_mib") or {}).items())
        lines += ["", f"Workers started in {fmt(pd.get('startup_s'))} s; peak RSS MiB: {mem}", ""]
        if pd.get("error"):
            lines += [f"Study error: `{pd['error'][:300]}`", ""]

    profiled = [s for s in _stacks(report) if s.get("profile")]
    if profiled:
        lines += ["## Where the time goes (py-spy, an extra closed-loop run of `uniform`, 4 clients)", "",
                  "Share of each process's samples (50 Hz, idle threads excluded) in the functions on top of "
                  "the stack (self) and anywhere in it (total).", ""]
        for s in profiled:
            for component, prof in s["profile"]["profiles"].items():
                if not prof.get("samples"):
                    continue
                top_self = "; ".join(f"{f} {p}%" for f, p in prof["top_self"][:6])
                top_total = "; ".join(f"{f} {p}%" for f, p in prof["top_total"][:8])
                lines += [f"- **{s['name']} / {component}** ({prof['samples']} samples): self: {top_self}",
                          f"  - total: {top_total}"]
        lines.append("")

    if plot_names:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plot_names] + [""]
    notes = report.get("notes")
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def write_readme(report: dict[str, Any], path: Path, json_name: str, plot_names: list[str]) -> None:
    path.write_text(markdown(report, json_name, plot_names))
