"""`disagg bench soak`: many streaming clients for minutes against one stack: every token asked
for arrives exactly once, and the stack's memory stays flat.

Each of `--clients` clients streams completions one after another (ignore_eos, a random
`max_tokens`, a prompt from a pool that shares prefixes), asking for each token's id
(`logprobs: 0` with `return_tokens_as_token_ids`), so the tokens received are counted one by
one: lost (fewer than asked) and duplicated (more, or usage disagreeing) are told apart. The RSS
of every process of the stack is sampled every `--sample-s`. vLLM's KV cache on a CPU is memory
the engines touch as blocks are first used, so RSS rises while the workload reaches blocks it
has not used yet; the report gives the growth per minute after `--settle-min` minutes, when the
blocks in use have stopped growing (`vllm:kv_cache_usage_perc` peaked), which a leak would not do.

    disagg bench soak --minutes 10 --clients 64 --json benchmarks/soak/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from disagg.bench.progress import say
from disagg.bench.stacks import EngineSettings, OursRay, native_dtype


def _prompts(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog prefill decode stream answer key value block".split()
    shared = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) for _ in range(8)]
    return [f"{rng.choice(shared)} question {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
            for i in range(256)]


async def _client(url: str, model: str, prompts: list[str], deadline: float, seed: int, totals: dict[str, int]) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0)) as client:
        while time.monotonic() < deadline:
            asked = rng.randint(8, 96)
            body = {"model": model, "prompt": rng.choice(prompts), "max_tokens": asked, "temperature": 0.7,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                    "logprobs": 0, "return_tokens_as_token_ids": True}
            received, usage, done = 0, None, False
            totals["requests"] += 1
            totals["asked"] += asked
            try:
                async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        totals["failed"] += 1
                        continue
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            event = json.loads(line[6:])
                            if "error" in event:
                                totals["error_events"] += 1
                            for choice in event.get("choices", []):
                                received += len((choice.get("logprobs") or {}).get("tokens") or [])
                            usage = event.get("usage") or usage
            except (httpx.HTTPError, ValueError):
                totals["failed"] += 1
                continue
            totals["received"] += received
            totals["not_done"] += not done
            totals["lost"] += max(0, asked - received)
            totals["duplicated"] += max(0, received - asked)
            totals["usage_mismatch"] += bool(usage is None or usage.get("completion_tokens") != received)


def _stack_rss(root: int) -> int:
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _kv_usage(url: str) -> float:
    """The highest KV usage any worker reports (0..1)."""
    usage = 0.0
    for w in httpx.get(f"{url}/v1/pool", timeout=10).json():
        usage = max(usage, w.get("kv_usage", 0.0))
    return usage


async def soak(url: str, model: str, root_pid: int | None, *, minutes: float, clients: int, sample_s: float,
               settle_min: float, seed: int) -> dict[str, Any]:
    prompts = _prompts(seed)
    totals = dict.fromkeys(["requests", "asked", "received", "lost", "duplicated", "failed", "error_events",
                            "not_done", "usage_mismatch"], 0)
    deadline = time.monotonic() + minutes * 60
    started = time.monotonic()
    tasks = [asyncio.create_task(_client(url, model, prompts, deadline, seed + i, totals)) for i in range(clients)]
    samples = []
    while not all(t.done() for t in tasks):
        elapsed = time.monotonic() - started
        samples.append({"t_s": round(elapsed, 1), "rss_mib": _stack_rss(root_pid) / 2**20 if root_pid else None,
                        "kv_usage": await asyncio.to_thread(_kv_usage, url), "requests": totals["requests"]})
        say("soak", f"{elapsed / 60:.1f} of {minutes:g} min: {totals['requests']} requests, {totals['received']} tokens, "
                    f"lost {totals['lost']}, duplicated {totals['duplicated']}, failed {totals['failed']}"
            + (f", stack RSS {samples[-1]['rss_mib']:.0f} MiB" if root_pid else ""))
        await asyncio.wait(tasks, timeout=sample_s)
    await asyncio.gather(*tasks)
    settled = [s for s in samples if s["t_s"] >= settle_min * 60 and s["rss_mib"] is not None]
    growth = None
    if len(settled) >= 2:
        span = (settled[-1]["t_s"] - settled[0]["t_s"]) / 60
        growth = (settled[-1]["rss_mib"] - settled[0]["rss_mib"]) / span if span else None
    return {"minutes": minutes, "clients": clients, **totals, "rss_growth_mib_per_min_after_settle": growth,
            "settle_min": settle_min, "samples": samples}


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = [x for x in result["samples"] if x["rss_mib"] is not None]
    if not s:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([x["t_s"] / 60 for x in s], [x["rss_mib"] for x in s], label="stack RSS (MiB)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MiB")
    ax2 = ax.twinx()
    ax2.plot([x["t_s"] / 60 for x in s], [x["kv_usage"] for x in s], "--", color="grey", label="peak KV usage")
    ax2.set_ylabel("KV usage")
    ax.set_title(f"{result['clients']} streaming clients: {result['received']} tokens, lost {result['lost']}, "
                 f"duplicated {result['duplicated']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disagg bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running stack (default: start `disagg serve` with --model)")
    p.add_argument("--model", default="models/tiny")
    p.add_argument("--model-name", default=None)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--settle-min", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("benchmarks/soak/soak.json"))
    p.add_argument("--plot", type=Path, help="PNG plot (default: beside --json)")
    args = p.parse_args(argv)
    model_name = args.model_name or Path(args.model).name
    stack = None
    try:
        if args.url:
            url, root = args.url, None
        else:
            say("soak", f"starting disagg serve with {args.model}")
            stack = OursRay(name="ours", model=args.model, log_dir=args.json.parent / "soak-logs",
                            settings=EngineSettings(dtype=native_dtype()))
            stack.start()
            url, root = stack.url, stack.launched[0].pid
        result = asyncio.run(soak(url, model_name, root, minutes=args.minutes, clients=args.clients,
                                  sample_s=args.sample_s, settle_min=args.settle_min, seed=args.seed))
    finally:
        if stack is not None:
            stack.stop()
    result["command"] = "disagg bench soak " + " ".join(sys.argv[1:] if argv is None else argv)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    plot_path = args.plot or args.json.with_suffix(".png")
    print(f"{result['requests']} requests, {result['received']} of {result['asked']} tokens: lost {result['lost']}, "
          f"duplicated {result['duplicated']}, failed {result['failed']}; RSS growth after "
          f"{result['settle_min']:g} min: {result['rss_growth_mib_per_min_after_settle']} MiB/min")
    print(f"wrote {args.json}" + (f" and {plot_path}" if plot(result, plot_path) else ""))
    return 0 if not (result["lost"] or result["duplicated"] or result["failed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
