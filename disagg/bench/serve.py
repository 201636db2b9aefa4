"""`disagg bench serve`: one workload against our stack, disaggregated and aggregated, on the same
two cores; TTFT, inter-token latency (ITL), TPOT p50/p99 and output throughput as JSON and a PNG.

    disagg     1 prefill replica (core 0) + 1 decode replica (core 1), the stack's default KV
               connector (`--kv-connector` to choose); prompts longer than the P/D threshold (256
               uncached tokens) are prefilled remotely, shorter ones locally on decode
    aggregated 2 decode replicas (cores 0 and 1), no prefill role, no KV connector: every request
               is prefilled on the decode that serves it

Without `--url` each mode's stack is started (`disagg serve`), measured and stopped, one after
another; `--mode both` (the default) then reports disagg / aggregated for each metric, from the
same run and the same requests. With `--url` one already running stack is measured and labelled
with `--mode`. Progress goes to stderr; a table and the ratios to stdout.

    disagg bench serve --json benchmarks/serve/serve.json --plot benchmarks/serve/serve.png
    disagg bench serve --mode disagg --url http://127.0.0.1:8000 --rate 2 --requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from disagg.bench import driver, workloads
from disagg.bench.progress import Progress, heartbeat, say
from disagg.bench.results import fmt, machine, versions
from disagg.bench.stacks import EngineSettings, GatewayWorker, OursGateway, OursRay, ensure_model, native_dtype
from disagg.config import AppConfig, RoutingConfig

MODES = ("disagg", "aggregated")
# The summary metrics compared between the modes; a ratio's name drops the unit.
COMPARED = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
            "latency_p50_ms", "output_tok_s")


# How a stack serves its OpenAI port: `disagg serve` (Serve's proxy, the Router, the decode replica's
# handle stream) or the gateway path (Envoy asks `disagg epp` for the pair and streams from the
# decode worker's own HTTP endpoint: nothing of the stream crosses Ray).
PATHS = ("serve", "gateway")


@dataclass(frozen=True)
class Mode:
    """One way to spend the same two cores."""

    name: str
    prefill_replicas: int
    decode_replicas: int
    settings: tuple[str, ...]  # `disagg serve --set KEY=VALUE` items
    description: str


def stack_mode(name: str, kv_connector: str | None = None) -> Mode:
    """The stack `--mode NAME` starts; `kv_connector` (disagg mode only) defaults to the stack's."""
    if name == "disagg":
        connector = kv_connector or AppConfig.model_fields["kv_connector"].default
        threshold = RoutingConfig.model_fields["pd_threshold_tokens"].default
        return Mode("disagg", 1, 1, (f"kv_connector={connector}",),
                    f"1 prefill (core 0) + 1 decode (core 1), KV connector {connector}, remote prefill above "
                    f"{threshold} uncached prompt tokens")
    if name == "aggregated":
        return Mode("aggregated", 0, 2, ("kv_connector=none",),
                    "2 decode replicas (cores 0 and 1), no prefill, no KV connector: local prefill")
    raise ValueError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}")


def token_range(text: str) -> tuple[int, int]:
    """`LO,HI` (or one number N for N,N) as an inclusive token range."""
    parts = [p.strip() for p in text.split(",")]
    try:
        lo, hi = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI or N, got {text!r}") from None
    if len(parts) > 2 or lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return lo, hi


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="disagg bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=[*MODES, "both"], default="both")
    p.add_argument("--url", help="measure this running stack (labelled --mode) instead of starting one")
    p.add_argument("--model", default="models/tiny", help="model directory: the tokenizer the workload is "
                   "measured in, and the model a started stack serves (built if missing)")
    p.add_argument("--model-name", help="OpenAI model name (default: the model directory's name)")
    p.add_argument("--workload", choices=["mixed", "uniform"], default="mixed",
                   help="mixed: long prompt / short answer with short prompt / long answer; uniform: both "
                        "lengths uniform at random")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, help="closed loop: requests in flight (default 4)")
    p.add_argument("--rate", type=float, help="open loop: Poisson arrivals, requests/s")
    p.add_argument("--long-fraction", type=float, default=0.5, help="mixed: share of long prompts")
    p.add_argument("--long-prompt", type=token_range, default=(1024, 1536), metavar="LO,HI")
    p.add_argument("--long-answer", type=token_range, default=(4, 8), metavar="LO,HI")
    p.add_argument("--short-prompt", type=token_range, default=(32, 64), metavar="LO,HI")
    p.add_argument("--short-answer", type=token_range, default=(96, 128), metavar="LO,HI")
    p.add_argument("--prompt", type=token_range, default=(64, 1024), metavar="LO,HI", help="uniform: prompt tokens")
    p.add_argument("--answer", type=token_range, default=(16, 128), metavar="LO,HI", help="uniform: output tokens")
    p.add_argument("--warm-up", type=int, default=2, help="requests sent one by one before measuring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plot", type=Path, help="PNG plot (default: beside --json)")
    p.add_argument("--kv-connector", choices=["disagg", "nixl"],
                   help="the disagg mode's KV connector (default: the stack's default)")
    p.add_argument("--path", choices=PATHS, default="serve",
                   help="how a started stack serves: `disagg serve` (Serve's proxy and Router) or the gateway "
                        "path (standalone workers behind Envoy and `disagg epp`, as `disagg epp` serves them)")
    p.add_argument("--dtype", help="engine dtype (default: the model's own, float32 on CPUs without bf16)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a stack may take to start")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    args = p.parse_args(argv)
    if args.url and args.mode == "both":
        p.error("--url measures one stack: give --mode disagg or --mode aggregated with it")
    if args.rate is not None and args.concurrency is not None:
        p.error("give --rate (open loop) or --concurrency (closed loop), not both")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive")
    if args.rate is None and args.concurrency is None:
        args.concurrency = 4
    if args.concurrency is not None and args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if args.requests < 1:
        p.error("--requests must be at least 1")
    if args.json is not None and args.plot is None:
        args.plot = args.json.with_suffix(".png")
    return args


def modes_of(args: argparse.Namespace) -> list[str]:
    return list(MODES) if args.mode == "both" else [args.mode]


def build_workload(args: argparse.Namespace, model: str) -> workloads.Workload:
    if args.workload == "mixed":
        return workloads.mixed(model, seed=args.seed, requests=args.requests, long_fraction=args.long_fraction,
                               long_prompt=args.long_prompt, long_answer=args.long_answer,
                               short_prompt=args.short_prompt, short_answer=args.short_answer)
    return workloads.uniform(model, seed=args.seed, requests=args.requests, prompt=args.prompt, answer=args.answer)


def ratios(disagg: dict[str, Any] | None, aggregated: dict[str, Any] | None) -> dict[str, float | None]:
    """disagg / aggregated for each compared metric of two run summaries (below 1: disagg has the
    lower latency; for `output_tok_s` above 1: disagg has the higher throughput). None where a
    summary is missing, a run had failures (percentiles over only the requests that succeeded
    would flatter the one that failed), or a value is missing or zero."""
    out: dict[str, float | None] = {}
    for key in COMPARED:
        name = key.removesuffix("_ms")
        if not disagg or not aggregated or disagg.get("failed") or aggregated.get("failed"):
            out[name] = None
            continue
        a, b = disagg.get(key), aggregated.get(key)
        out[name] = round(a / b, 3) if a is not None and b else None
    return out


# -- one mode -------------------------------------------------------------------------------------


def make_stack(mode: str, model: str, settings: EngineSettings, log_dir: Path,
               kv_connector: str | None = None, path: str = "serve") -> OursRay | OursGateway:
    m = stack_mode(mode, kv_connector)
    if path == "gateway":
        cores = [settings.prefill_core, settings.decode_core]
        roles = ["prefill"] * m.prefill_replicas + ["decode"] * m.decode_replicas
        workers = [GatewayWorker(f"{role}{i}", role, core) for i, (role, core) in enumerate(zip(roles, cores))]
        gateway = OursGateway(mode, model, settings, log_dir=log_dir / f"{mode}-gateway", workers=workers,
                              worker_settings=list(m.settings), initial_route=[w.label for w in workers])
        gateway.description = f"{m.description}; the gateway path (Envoy + disagg epp)"
        return gateway
    if path != "serve":
        raise ValueError(f"unknown path {path!r}; choose one of {', '.join(PATHS)}")
    stack = OursRay(mode, model, settings, log_dir=log_dir / mode, settings_overrides=list(m.settings),
                    prefill_replicas=m.prefill_replicas, decode_replicas=m.decode_replicas)
    stack.description = m.description
    return stack


def worker_urls(stack: OursRay | OursGateway) -> list[str]:
    """The base URL of each of the stack's workers (for their own /metrics)."""
    if isinstance(stack, OursGateway):
        return [f"http://{w.address}" for w in stack.workers]
    import httpx

    return [f"http://{w['address']}" for w in httpx.get(f"{stack.url}/v1/pool", timeout=10).json()]


def bench_mode(mode: str, args: argparse.Namespace, model: str, model_name: str, workload: workloads.Workload,
               warm: workloads.Workload | None, settings: EngineSettings, log_dir: Path) -> dict[str, Any]:
    """Measure one mode: the stack at `args.url`, or one started (and stopped) here."""
    stack = None if args.url else make_stack(mode, model, settings, log_dir, args.kv_connector, args.path)
    entry: dict[str, Any] = {"mode": mode, "url": args.url,
                             "description": stack.description if stack else "running stack at --url"}
    try:
        url = args.url
        if stack is not None:
            say(mode, f"starting `disagg serve` ({stack.description}); logs in {stack.log_dir}")
            with heartbeat(mode, "still starting"):
                stack.start(timeout_s=args.start_timeout)
            url = stack.url
            say(mode, f"up at {url} in {stack.startup_s:.0f} s")
        if warm is not None:
            say(mode, f"warming up ({len(warm)} requests)")
            entry["warm_up_errors"] = asyncio.run(driver.warm_up(url, model_name, warm, n=len(warm)))
        load = f"{args.rate:g} requests/s open loop" if args.rate else f"{args.concurrency} in flight"
        say(mode, f"driving {len(workload)} requests ({workload.name}, {load})")
        run = asyncio.run(driver.drive(url, model_name, workload, rate=args.rate, concurrency=args.concurrency,
                                       seed=args.seed, timeout_s=args.timeout,
                                       on_result=Progress(mode, len(workload))))
        entry["run"] = run.to_json()
        for r in entry["run"]["requests"]:  # per-event gaps stay out of the JSON (summaries keep percentiles)
            r.pop("itl_s", None)
        s = entry["run"]["summary"]
        say(mode, f"TTFT p50/p99 {s['ttft_p50_ms']}/{s['ttft_p99_ms']} ms, ITL p50/p99 {s['itl_p50_ms']}/"
                  f"{s['itl_p99_ms']} ms, TPOT p50 {s['tpot_p50_ms']} ms, {s['output_tok_s']} tok/s, "
                  f"failed {s['failed']}/{s['requests']}")
    except Exception as e:  # noqa: BLE001 - one mode failing must not lose the other's results
        say(mode, f"failed: {type(e).__name__}: {str(e)[:300]}")
        entry["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    finally:
        if stack is not None:
            entry["memory_mib"] = stack.memory_mib()
            say(mode, "stopping the stack")
            stack.stop()
            entry["stack"] = stack.info()
    return entry


def add_ratios(report: dict[str, Any]) -> None:
    """When both modes ran: `ratios` over all requests, and `group_ratios` per request group when
    the workload has several (mixed: long_prompt, short_prompt)."""
    if not set(MODES) <= set(report["modes"]):
        return
    report["ratios"] = ratios(summary_of(report, "disagg"), summary_of(report, "aggregated"))
    groups = [(report["modes"][m].get("run") or {}).get("groups", {}) for m in MODES]
    names = sorted(set(groups[0]) | set(groups[1]))
    if len(names) > 1:
        report["group_ratios"] = {g: ratios(groups[0].get(g), groups[1].get(g)) for g in names}


# -- report ---------------------------------------------------------------------------------------


def summary_of(report: dict[str, Any], mode: str) -> dict[str, Any] | None:
    run = report["modes"].get(mode, {}).get("run")
    return run["summary"] if run else None


def table(report: dict[str, Any]) -> str:
    """Markdown: one row per mode, then the ratios (when both modes ran)."""
    lines = ["| mode | TTFT p50/p99 ms | ITL p50/p99 ms | TPOT p50/p99 ms | latency p50 ms | output tok/s | "
             "failed |", "|---|---|---|---|---|---|---|"]
    for mode, entry in report["modes"].items():
        s = summary_of(report, mode)
        if s is None:
            lines.append(f"| {mode} | - | - | - | - | - | {entry.get('error', '')[:120]} |")
            continue
        lines.append(f"| {mode} | {fmt(s['ttft_p50_ms'])}/{fmt(s['ttft_p99_ms'])} | {fmt(s['itl_p50_ms'])}/"
                     f"{fmt(s['itl_p99_ms'])} | {fmt(s['tpot_p50_ms'])}/{fmt(s['tpot_p99_ms'])} | "
                     f"{fmt(s['latency_p50_ms'])} | {fmt(s['output_tok_s'])} | {s['failed']}/{s['requests']} |")
    r = report.get("ratios")
    if r:
        lines += ["", "| disagg / aggregated | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | TPOT p50 | TPOT p99 | "
                  "output tok/s |", "|---|---|---|---|---|---|---|---|"]
        rows = [("all requests", r), *((f"{g} only", gr) for g, gr in report.get("group_ratios", {}).items())]
        for label, x in rows:
            lines.append(f"| {label} | {fmt(x['ttft_p50'])} | {fmt(x['ttft_p99'])} | {fmt(x['itl_p50'])} | "
                         f"{fmt(x['itl_p99'])} | {fmt(x['tpot_p50'])} | {fmt(x['tpot_p99'])} | "
                         f"{fmt(x['output_tok_s'])} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Four panels (TTFT, ITL, TPOT p50/p99 per mode; output tokens/s), ratios in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in report["modes"] if summary_of(report, m)]
    summaries = [summary_of(report, m) for m in modes]
    fig, axes = plt.subplots(1, 4, figsize=(15, 4))
    for ax, metric in zip(axes[:3], ("ttft", "itl", "tpot")):
        for i, q in enumerate(("p50", "p99")):
            ys = [s[f"{metric}_{q}_ms"] or 0 for s in summaries]
            bars = ax.bar([k + i * 0.4 for k in range(len(modes))], ys, 0.4, label=q)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks([k + 0.2 for k in range(len(modes))])
        ax.set_xticklabels(modes)
        ax.set_title(f"{metric.upper()} (ms)")
        ax.legend(fontsize=8)
    bars = axes[3].bar(modes, [s["output_tok_s"] or 0 for s in summaries], color="tab:green")
    axes[3].bar_label(bars, fmt="%.0f", fontsize=8)
    axes[3].set_title("output tokens/s")
    title = f"{report['model']}: {report['workload']['name']} workload, {report['workload']['requests']} requests, " \
            f"{report['load']}"
    r = report.get("ratios")
    if r:
        title += (f"\ndisagg/aggregated: TTFT p50 {fmt(r['ttft_p50'])}, p99 {fmt(r['ttft_p99'])}; ITL p50 "
                  f"{fmt(r['itl_p50'])}, p99 {fmt(r['itl_p99'])}; TPOT p50 {fmt(r['tpot_p50'])}; "
                  f"throughput {fmt(r['output_tok_s'])}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- entry point ----------------------------------------------------------------------------------


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so a started stack is stopped on the way out.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _bench(args, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    stamp = datetime.now(timezone.utc)
    model = ensure_model(args.model, "tiny") if args.url is None else str(Path(args.model).resolve())
    model_name = args.model_name or Path(model).name
    settings = EngineSettings(dtype=args.dtype or native_dtype(), block_size=args.block_size)
    log_dir = Path(f"/tmp/dgs-{stamp:%Y%m%d-%H%M%S}")
    workload = build_workload(args, model)
    # Long enough to be disaggregated (the first KV transfer, with its handshake, is not measured).
    warm = (workloads.uniform(model, seed=args.seed + 1000, requests=args.warm_up, prompt=(300, 400), answer=(4, 8),
                              salt="warm-up") if args.warm_up > 0 else None)
    w = workload.summary()
    say("bench", f"{w['requests']} requests ({w['name']}): prompts {w['prompt_tokens_min']}-"
                 f"{w['prompt_tokens_max']} tokens, {w['output_tokens_total']} output tokens; modes "
                 f"{', '.join(modes_of(args))}")
    report: dict[str, Any] = {
        "benchmark": "serve", "date": stamp.isoformat(timespec="seconds"),
        "command": "disagg bench serve " + " ".join(argv),
        "machine": machine(), "versions": versions(), "model": model_name, "workload": w,
        "load": f"poisson {args.rate:g}/s" if args.rate else f"closed {args.concurrency}",
        "engines": None if args.url else settings.__dict__, "path": None if args.url else args.path,
        "seed": args.seed, "logs": str(log_dir), "modes": {},
    }
    for mode in modes_of(args):
        report["modes"][mode] = bench_mode(mode, args, model, model_name, workload, warm, settings, log_dir)
    add_ratios(report)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.plot is not None:
        plot(report, args.plot)
    print(table(report))
    wrote = " and ".join(str(p) for p in (args.json, args.plot) if p is not None)
    say("bench", f"done in {report['elapsed_s'] / 60:.1f} min" + (f"; wrote {wrote}" if wrote else ""))
    ok = all("run" in e and not e["run"]["summary"]["failed"] for e in report["modes"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
