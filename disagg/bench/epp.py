"""`disagg bench epp`: how fast the endpoint picker is.

1. Pick latency and picks per second at 8, 64 and 256 endpoints (half prefill, half decode), with
   100k blocks in the prefix index; prompts of 1024 tokens, half of them sharing an indexed prefix.
2. The latency the ext_proc hop adds: the same small request through Envoy alone, then through
   Envoy + EPP, to a stand-in worker that answers at once.

Wall-clock figures on a shared machine measure the machine as much as the code, so each is paired
with a CPU-time one: CPU seconds the picking thread spent per pick, and CPU seconds Envoy and the
EPP spent per request (from /proc and the process clock), which waiting for a core does not inflate.

Writes JSON (--json) and a PNG plot when matplotlib is installed (--plot); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from disagg.bench.progress import say
from disagg.config import AppConfig, RoutingConfig
from disagg.routing import PickRequest, Scheduler, StaticDiscovery
from disagg.routing.fakes import FakeWorker, make_info
from disagg.routing.prefix_index import block_hashes
from disagg.worker.protocol import EngineLoad

BLOCK = 32


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def reference_loop_ms() -> float:
    """CPU time of a fixed pure-Python loop (median of 11): how fast this machine runs Python
    right now. About 2.5-3 ms on an idle recent x86 core; more when cores are shared."""
    times = []
    for _ in range(11):
        c0 = time.thread_time()
        total = 0
        for i in range(100_000):
            total += i
        times.append((time.thread_time() - c0) * 1e3)
    return sorted(times)[5]


def bench_pick(num_endpoints: int, *, indexed_blocks: int, picks: int, prompt_tokens: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    # Signals never age here: the benchmark times picks, not freshness.
    scheduler = Scheduler(RoutingConfig(stale_after_s=1e6, dead_after_s=1e7), model="bench", block_size=BLOCK)
    endpoints = []
    for i in range(num_endpoints):
        role = "decode" if i % 2 == 0 else "prefill"
        e = scheduler.pool.upsert(make_info(role, f"10.{i // 250}.{i % 250}.1:8000", model="bench"))
        endpoints.append(e)

    def scrape() -> None:
        for e in endpoints:
            scheduler.pool.update_load(e.engine_id, EngineLoad(waiting=rng.randint(0, 2), running=rng.randint(0, 8),
                                                               kv_usage=rng.random()))

    scrape()
    prefixes: list[list[int]] = []
    indexed = 0
    while indexed < indexed_blocks:
        tokens = [rng.randrange(32_000) for _ in range(16 * BLOCK)]
        scheduler.index.record(rng.choice(endpoints).engine_id, block_hashes(tokens, BLOCK))
        prefixes.append(tokens)
        indexed += 16
    requests = []
    for i in range(picks):
        head = rng.choice(prefixes)[: prompt_tokens // 2] if i % 2 else []
        tail = [rng.randrange(32_000) for _ in range(prompt_tokens - len(head))]
        requests.append(PickRequest(model="bench", prompt_token_ids=head + tail))
    latencies = []
    cpu = []
    decisions = {"remote": 0, "local": 0}
    started = time.perf_counter()
    for i, req in enumerate(requests):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        pick = scheduler.pick(req)
        latencies.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        decisions[pick.decision] += 1
        if i % 50 == 49:  # a scrape round every 50 picks
            scrape()
    wall = time.perf_counter() - started
    latencies.sort()
    cpu.sort()
    return {
        "endpoints": num_endpoints,
        "indexed_blocks": indexed,  # before the picks (each pick records its prompt's blocks too)
        "index_entries_after": scheduler.index.num_blocks(),
        "picks": picks,
        "prompt_tokens": prompt_tokens,
        "p50_us": _percentile(latencies, 0.5) * 1e6,
        "p90_us": _percentile(latencies, 0.9) * 1e6,
        "p99_us": _percentile(latencies, 0.99) * 1e6,
        "mean_us": statistics.fmean(latencies) * 1e6,
        "cpu_p50_us": _percentile(cpu, 0.5) * 1e6,
        "cpu_p99_us": _percentile(cpu, 0.99) * 1e6,
        "cpu_mean_us": statistics.fmean(cpu) * 1e6,
        "picks_per_s": picks / wall,
        "picks_per_cpu_s": picks / sum(cpu) if sum(cpu) else None,
        "decisions": decisions,
    }


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _time_requests(url: str, n: int, body: dict[str, Any], envoy_pid: int | None = None) -> dict[str, Any]:
    """Sequential requests: wall latencies, and CPU seconds this process and Envoy spent."""
    import httpx

    out = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(20):  # warm-up: connections, Envoy's first ext_proc stream
            (await client.post("/v1/completions", json=body)).raise_for_status()
        own0 = time.process_time()
        envoy0 = _cpu_seconds(envoy_pid) if envoy_pid else 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json=body)
            out.append(time.perf_counter() - t0)
            r.raise_for_status()
        own = time.process_time() - own0
        envoy = (_cpu_seconds(envoy_pid) - envoy0) if envoy_pid else 0.0
    out.sort()
    return {"latencies": out, "own_cpu_s": own, "envoy_cpu_s": envoy}


async def bench_hop(requests: int) -> dict[str, Any]:
    from disagg.epp.envoy import EnvoyProcess, EnvoySettings, free_port, write_endpoints
    from disagg.epp.gateway import start_gateway
    from disagg.epp.prompt import RawPromptReader

    worker = FakeWorker("decode", model="bench").start()
    body = {"model": "bench", "prompt": list(range(200)), "max_tokens": 1}
    try:
        eds = Path(tempfile.mkdtemp(prefix="disagg-bench-envoy-"))
        write_endpoints(eds, [worker.address])
        port = free_port()
        alone = EnvoyProcess(EnvoySettings("127.0.0.1", port, "127.0.0.1", 1, free_port(), eds, ext_proc=False))
        await alone.start()
        try:
            await asyncio.sleep(0.3)
            envoy_only = await _time_requests(f"http://127.0.0.1:{port}", requests, body, alone.process.pid)
        finally:
            await alone.stop()
        direct = await _time_requests(f"http://{worker.address}", requests, body)
        config = AppConfig(model="bench", block_size=BLOCK)
        gateway = await start_gateway(config, StaticDiscovery([worker.address], interval_s=1.0), gateway_port=0,
                                      host="127.0.0.1", reader=RawPromptReader("bench"))
        try:
            while not gateway.scheduler.pool.endpoints("decode"):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            with_epp = await _time_requests(gateway.url, requests, body, gateway.envoy.process.pid)
        finally:
            await gateway.stop()
    finally:
        worker.stop()

    def summary(run: dict[str, Any]) -> dict[str, float]:
        values = run["latencies"]
        return {"p50_ms": _percentile(values, 0.5) * 1e3, "p90_ms": _percentile(values, 0.9) * 1e3,
                "p99_ms": _percentile(values, 0.99) * 1e3,
                "envoy_cpu_ms_per_request": run["envoy_cpu_s"] / requests * 1e3}

    result = {"requests": requests, "direct": summary(direct), "envoy": summary(envoy_only),
              "envoy_epp": summary(with_epp)}
    result["epp_hop_added_p50_ms"] = result["envoy_epp"]["p50_ms"] - result["envoy"]["p50_ms"]
    result["epp_hop_added_p99_ms"] = result["envoy_epp"]["p99_ms"] - result["envoy"]["p99_ms"]
    # This process ran the client and the stand-in worker in both runs, and the EPP in the second.
    result["epp_cpu_ms_per_request"] = (with_epp["own_cpu_s"] - envoy_only["own_cpu_s"]) / requests * 1e3
    result["envoy_ext_proc_cpu_ms_per_request"] = (
        result["envoy_epp"]["envoy_cpu_ms_per_request"] - result["envoy"]["envoy_cpu_ms_per_request"])
    return result


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    picks = result["pick"]
    xs = [p["endpoints"] for p in picks]
    left.plot(xs, [p["p50_us"] for p in picks], "o-", label="wall p50")
    left.plot(xs, [p["p99_us"] for p in picks], "s--", label="wall p99")
    left.plot(xs, [p["cpu_p50_us"] for p in picks], "^-", label="CPU p50")
    left.axhline(100, color="grey", lw=0.8, ls=":", label="p50 target at 64 (100 µs)")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("endpoints")
    left.set_ylabel("pick latency (µs)")
    left.set_title(f"pick() with {picks[0]['indexed_blocks'] // 1000}k indexed blocks")
    left.legend()
    hop = result.get("hop")
    if hop:
        names = ["direct", "envoy", "envoy_epp"]
        right.bar([n.replace("_", "+") for n in names], [hop[n]["p50_ms"] for n in names], label="p50")
        right.scatter([n.replace("_", "+") for n in names], [hop[n]["p99_ms"] for n in names], color="black",
                      marker="_", s=400, label="p99")
        right.set_ylabel("request latency (ms)")
        right.set_title(f"EPP hop adds {hop['epp_hop_added_p50_ms']:.2f} ms at p50")
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disagg bench epp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoints", default="8,64,256")
    p.add_argument("--indexed-blocks", type=int, default=100_000)
    p.add_argument("--picks", type=int, default=5000)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--hop-requests", type=int, default=500, help="0 skips the Envoy hop measurement")
    p.add_argument("--out", default="benchmarks", help="directory for epp.json and epp.png (when --json and "
                                                       "--plot are not given)")
    p.add_argument("--json", type=Path, help="write the report here (default: OUT/epp.json)")
    p.add_argument("--plot", type=Path, help="PNG plot (default: beside the JSON)")
    args = p.parse_args(argv)
    json_path = args.json or Path(args.out) / "epp.json"
    plot_path = args.plot or json_path.with_suffix(".png")

    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version(),
                    "reference_loop_ms": reference_loop_ms()},
        "pick": [],
    }
    for n in (int(x) for x in args.endpoints.split(",")):
        say("epp", f"pick at {n} endpoints: indexing {args.indexed_blocks} blocks, then {args.picks} picks")
        r = bench_pick(n, indexed_blocks=args.indexed_blocks, picks=args.picks, prompt_tokens=args.prompt_tokens)
        print(f"pick @ {n:4d} endpoints: p50 {r['p50_us']:.1f} µs, p99 {r['p99_us']:.1f} µs, "
              f"{r['picks_per_s']:.0f} picks/s; CPU p50 {r['cpu_p50_us']:.1f} µs, p99 {r['cpu_p99_us']:.1f} µs, "
              f"{r['picks_per_cpu_s']:.0f} picks per CPU second", flush=True)
        result["pick"].append(r)
    if args.hop_requests:
        say("epp", f"the ext_proc hop: {args.hop_requests} requests direct, through Envoy, through Envoy + EPP")
        hop = asyncio.run(bench_hop(args.hop_requests))
        print(f"hop: direct p50 {hop['direct']['p50_ms']:.2f} ms, Envoy {hop['envoy']['p50_ms']:.2f} ms, "
              f"Envoy+EPP {hop['envoy_epp']['p50_ms']:.2f} ms (EPP adds {hop['epp_hop_added_p50_ms']:.2f} ms p50); "
              f"CPU per request: EPP {hop['epp_cpu_ms_per_request']:.2f} ms, Envoy's ext_proc work "
              f"{hop['envoy_ext_proc_cpu_ms_per_request']:.2f} ms", flush=True)
        result["hop"] = hop
    result["machine"]["load_avg_after"] = os.getloadavg()
    result["machine"]["reference_loop_ms_after"] = reference_loop_ms()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {json_path}" + (f" and {plot_path}" if plot(result, plot_path) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
