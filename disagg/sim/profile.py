"""`disagg profile`: measure one vLLM engine on this machine and fit the cost model.

The engine runs in this process (`disagg.engine.VllmEngine`), pinned to one core with one OpenMP
thread as the stack pins its engines. It is timed as the stack sees it, through AsyncLLM's
stream, so each point includes the engine's own per-step overhead:

    prefill  one request of `new` prompt tokens after `cached` ones already in the prefix cache,
             max_tokens=1: submit to the end of the stream;
    decode   `batch` requests of `context` prompt tokens decoding together: the time per step
             while all of them decode (the window between the last first token and the first
             last token, over the tokens one request produced in it);
    mixed    (a check, not fitted) a long prompt arriving while a batch decodes: the prompt's
             time against the model's step with both parts.

Each part is fitted by least squares (numpy) over its points; the fit's error is kept in the
profile. Transfer costs per backend come from `disagg bench transfer`'s JSON: latency from its
one-block case, bandwidth from its coalesced READ (consecutive block ids are coalesced).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from disagg.bench.progress import say
from disagg.sim.cost import (CostModel, DecodeCost, EngineLimits, FitError, PrefillCost, StackCost, TransferCost,
                             attention)

PREFILL_POINTS = [(0, 16), (0, 128), (0, 512), (0, 1024), (0, 1536), (0, 2000), (512, 512), (1024, 512),
                  (1024, 1000), (1536, 256)]  # (cached, new)
DECODE_POINTS = [(1, 32), (1, 1024), (4, 32), (4, 768), (8, 256), (16, 32), (16, 512), (16, 1024)]  # (batch, context)
DECODE_TOKENS = 24
TRANSFER_JSON = Path("benchmarks/transfer/transfer.json")


class Point(NamedTuple):
    features: tuple[float, ...]
    seconds: float


def fit(points: Sequence[Point]) -> tuple[list[float], FitError]:
    """Least squares with non-negative coefficients: a feature whose coefficient comes out
    negative (noise on a small term) is dropped and the rest refitted."""
    x = np.array([p.features for p in points], dtype=float)
    y = np.array([p.seconds for p in points], dtype=float)
    keep = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    full = np.zeros(x.shape[1])
    full[keep] = np.maximum(coef, 0)
    rel = (x @ full - y) / y
    return full.tolist(), FitError(points=len(points), rms_relative=round(float(np.sqrt(np.mean(rel ** 2))), 4),
                                   max_relative=round(float(np.max(np.abs(rel))), 4))


def transfer_costs(path: Path) -> dict[str, TransferCost]:
    """Per backend, from `disagg bench transfer --json`: one-block latency, coalesced READ bandwidth."""
    results = json.loads(path.read_text())["results"]
    out: dict[str, TransferCost] = {}
    for backend in sorted({r["backend"] for r in results} - {"nixl-raw"}):
        mine = {r["case"]: r for r in results if r["backend"] == backend and r["op"] == "READ"}
        if "latency" in mine and "coalesced" in mine:
            out[backend] = TransferCost(latency_s=mine["latency"]["median_s"],
                                        bandwidth_bytes_s=mine["coalesced"]["gbps"] * 1e9)
    return out


class Profiler:
    """Times requests on one running engine; never reuses prompt tokens unless asked to."""

    def __init__(self, engine, vocab: int, seed: int = 0) -> None:
        self.engine = engine
        self.vocab = vocab
        self.rng = random.Random(seed)

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.vocab) for _ in range(n)]  # 0-2: special tokens

    async def run(self, tokens: list[int], max_tokens: int) -> list[float]:
        """perf_counter() of the submit and of every streamed output."""
        from disagg.engine.base import GenerateRequest, SamplingOptions

        req = GenerateRequest(request_id=uuid.uuid4().hex, prompt_token_ids=tokens,
                              sampling=SamplingOptions(max_tokens=max_tokens, ignore_eos=True, temperature=0.0))
        times = [time.perf_counter()]
        async for out in self.engine.generate(req):
            times.extend([time.perf_counter()] * max(len(out.token_ids), 1))
        return times

    async def prefill(self, cached: int, new: int, repeat: int = 3) -> float:
        samples = []
        for _ in range(repeat):
            prefix = self.tokens(cached)
            if cached:
                await self.run(prefix + self.tokens(1), 1)  # puts the prefix's blocks in the cache
            times = await self.run(prefix + self.tokens(new), 1)
            samples.append(times[-1] - times[0])
        return min(samples)  # the machine is shared: the least disturbed sample

    async def decode(self, batch: int, context: int, repeat: int = 2) -> float:
        samples = []
        for _ in range(repeat):
            runs = await asyncio.gather(*(self.run(self.tokens(context), DECODE_TOKENS) for _ in range(batch)))
            start = max(r[1] for r in runs)  # every request has its first token
            end = min(r[-1] for r in runs)  # none has finished
            steps = sum(1 for t in runs[0] if start < t <= end)
            samples.append((end - start) / steps if steps else (runs[0][-1] - runs[0][1]) / (DECODE_TOKENS - 1))
        return min(samples)

    async def mixed(self, batch: int, context: int, prompt: int) -> float:
        """A `prompt`-token request's time while `batch` requests decode."""
        decoding = [asyncio.ensure_future(self.run(self.tokens(context), 4 * DECODE_TOKENS)) for _ in range(batch)]
        await asyncio.sleep(0.5)
        times = await self.run(self.tokens(prompt), 1)
        await asyncio.gather(*decoding)
        return times[-1] - times[0]


async def measure(model: str, core: str, dtype: str, block_size: int, kv_cache_gib: int, max_model_len: int,
                  transfer: dict[str, TransferCost], name: str) -> CostModel:
    from disagg.config import AppConfig
    from disagg.engine.vllm_engine import VllmEngine

    config = AppConfig(model=model, dtype=dtype, block_size=block_size, kv_cache_gib=kv_cache_gib,
                       max_model_len=max_model_len, kv_connector="none", max_num_seqs=16,
                       routing={"kv_events": False})
    engine = VllmEngine(config, cpu_bind=core)
    say("profile", f"starting the engine on core {core} ({dtype}, block size {block_size}, {kv_cache_gib} GiB KV)")
    await engine.start()
    try:
        vc = engine._llm.vllm_config
        vocab = vc.model_config.get_vocab_size()
        profiler = Profiler(engine, vocab)
        await profiler.prefill(0, 256, repeat=2)  # warm-up: first-call costs
        prefill_points = []
        for i, (cached, new) in enumerate(PREFILL_POINTS):
            s = await profiler.prefill(cached, new)
            prefill_points.append(Point((1.0, new, attention(cached, new)), s))
            say("profile", f"prefill {i + 1}/{len(PREFILL_POINTS)}: {new} new after {cached} cached: {s * 1e3:.1f} ms")
        decode_points = []
        for i, (batch, context) in enumerate(DECODE_POINTS):
            s = await profiler.decode(batch, context)
            decode_points.append(Point((1.0, batch, batch * (context + DECODE_TOKENS / 2)), s))
            say("profile", f"decode {i + 1}/{len(DECODE_POINTS)}: batch {batch}, context {context}: "
                           f"{s * 1e3:.1f} ms/step")
        mixed = (4, 64, 1024)
        mixed_s = await profiler.mixed(*mixed)
        say("profile", f"mixed check: a {mixed[2]}-token prompt while {mixed[0]} decode: {mixed_s * 1e3:.1f} ms")
        limits = EngineLimits(block_size=engine.layout.block_size, num_blocks=max(engine.num_blocks - 1, 1),
                              max_num_seqs=vc.scheduler_config.max_num_seqs,
                              max_num_batched_tokens=vc.scheduler_config.max_num_batched_tokens)
        layout = engine.layout
    finally:
        await engine.shutdown()
    (p0, p1, p2), prefill_error = fit(prefill_points)
    (d0, d1, d2), decode_error = fit(decode_points)
    dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}.get(layout.dtype, 2)
    cost = CostModel(
        name=name, model=Path(model).name, hardware=_hardware(core), dtype=layout.dtype,
        kv_bytes_per_token=2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * dtype_bytes,
        prefill=PrefillCost(base_s=p0, per_token_s=p1, per_attention_s=p2),
        decode=DecodeCost(base_s=d0, per_seq_s=d1, per_context_token_s=d2),
        limits=limits, transfer=transfer or {"tcp": TransferCost(latency_s=1e-3, bandwidth_bytes_s=1.5e9)},
        backend="nixl" if "nixl" in transfer else next(iter(transfer), "tcp"),
        stack=StackCost(),
        fit={"prefill": prefill_error, "decode": decode_error},
        sources={"prefill": f"measured: {len(prefill_points)} points, least of 3 (disagg profile)",
                 "decode": f"measured: {len(decode_points)} batches of {DECODE_TOKENS} tokens, least of 2 "
                           "(disagg profile)",
                 "limits": "the engine's vLLM config", "kv_bytes_per_token": "2 x layers x KV heads x head dim x dtype",
                 "transfer": "disagg bench transfer JSON" if transfer else "assumed (asyncio TCP on this host class)",
                 "stack": "not measured by profile (0): see disagg/sim/README-section.md"},
    )
    cost.points = {"prefill [cached, new, s]": [[c, n, round(pt.seconds, 6)] for (c, n), pt in
                                                zip(PREFILL_POINTS, prefill_points)],
                   "decode [batch, context, s/step]": [[b, c, round(pt.seconds, 6)] for (b, c), pt in
                                                       zip(DECODE_POINTS, decode_points)],
                   "mixed [batch, context, prompt, s]": [[*mixed, round(mixed_s, 6)]]}
    predicted = cost.step_s(mixed[2], attention(0, mixed[2]), mixed[0], mixed[0] * (mixed[1] + 2 * DECODE_TOKENS))
    cost.fit["mixed_check"] = FitError(points=1, rms_relative=round(abs(predicted - mixed_s) / mixed_s, 4),
                                       max_relative=round(abs(predicted - mixed_s) / mixed_s, 4))
    return cost


def measure_stack(model: str, cost: CostModel, rate: float = 2.0, requests: int = 16, path: str = "serve"
                  ) -> StackCost:
    """What our stack adds to the engine alone, on this machine now, at `rate` requests/s:
    `disagg serve` as `disagg bench serve` starts it (1 prefill + 1 decode) serves short prompts
    (prefilled on decode) and long ones (prefilled remotely), each answering 32-128 tokens, timed
    as `disagg bench serve` times them. Per short request, TTFT minus the engine's prefill is the
    stack's; a long one's extra is the prefill call's; TPOT over a lone request's simulated TPOT
    (with `path`'s stream window) is how much slower the stack's engines step (its other processes
    share the cores). The stack's own processes load the machine more as more streams
    run, so profile at the rate you mean to simulate. `path`: `disagg serve`'s (serve) or the
    gateway's."""
    from disagg.bench import driver, workloads
    from disagg.bench.serve import make_stack
    from disagg.bench.stacks import EngineSettings, native_dtype
    from disagg.sim.cluster import last_seen

    log_dir = Path(f"/tmp/dgp-{time.strftime('%H%M%S')}")
    stack = make_stack("disagg", model, EngineSettings(dtype=native_dtype()), log_dir, path=path)
    say("profile", f"starting the stack ({stack.description}); logs in {log_dir}")
    stack.start(timeout_s=900)
    try:
        warm = workloads.uniform(model, seed=1000, requests=2, prompt=(300, 400), answer=(4, 8), salt="warm-up")
        asyncio.run(driver.warm_up(stack.url, stack.model_name, warm))
        wl = workloads.mixed(model, seed=99, requests=requests, long_prompt=(600, 700), long_answer=(32, 128),
                             short_prompt=(32, 64), short_answer=(32, 128), salt="profile-stack")
        run = asyncio.run(driver.drive(stack.url, stack.model_name, wl, rate=rate, seed=99))
    finally:
        stack.stop()
    timed = [r for r in run.results if r.ok and r.ttft_s is not None and r.tpot_s]
    window = stream_window_s(path)

    def lone_tpot(r: driver.RequestResult) -> float:
        step, n = cost.step_s(0, 0, 1, r.prompt_tokens + 64), r.output_tokens
        return last_seen(0.0, step * (n - 1), n, window) / (n - 1)

    scale = max(statistics.median(r.tpot_s / lone_tpot(r) for r in timed), 1.0)
    scaled = cost.model_copy(update={"stack": StackCost(step_scale=scale)})

    def prefill(r: driver.RequestResult) -> float:
        return scaled.step_s(r.prompt_tokens, attention(0, r.prompt_tokens), 0, 0)

    request_s = max(statistics.median(r.ttft_s - prefill(r) for r in timed if r.group == "short_prompt"), 0.0)
    call_s = max(statistics.median(r.ttft_s - request_s - prefill(r) - scaled.transfer_s(r.prompt_tokens)
                                   - scaled.step_s(1, 2 * r.prompt_tokens, 0, 0)
                                   for r in timed if r.group == "long_prompt"), 0.0)
    say("profile", f"stack at {rate:g}/s: {request_s * 1e3:.1f} ms per request, {call_s * 1e3:.1f} ms per prefill "
                   f"call, engine steps x{scale:.2f} ({len(timed)} requests timed)")
    return StackCost(request_s=request_s, prefill_call_s=call_s, step_scale=scale)


def stream_window_s(path: str) -> float:
    """How long a stream's tokens may wait to leave together on `path`: the Serve path merges deltas
    (`stream_batching_ms`, across its process hops); a worker's own endpoint (the gateway path)
    sends each as it comes."""
    from disagg.config import AppConfig

    return 0.0 if path == "gateway" else AppConfig.model_fields["stream_batching_ms"].default / 1000


def _hardware(core: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, 1 core (core {core}, OMP_NUM_THREADS=1) of {os.cpu_count()}, load {os.getloadavg()[0]:.1f} at start"


def main(argv: list[str] | None = None) -> int:
    from disagg.bench.serve import PATHS
    from disagg.bench.stacks import ensure_model, native_dtype

    p = argparse.ArgumentParser(prog="disagg profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/tiny", help="model directory (built if missing)")
    p.add_argument("--json", type=Path, required=True, help="write the cost model here")
    p.add_argument("--plot", type=Path, help="PNG of the measured points against the fit")
    p.add_argument("--name", help="the profile's name (default: the JSON file's stem)")
    p.add_argument("--core", default="1", help="the core the engine is pinned to")
    p.add_argument("--dtype", help="default: the model's own, float32 on CPUs without bf16")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--kv-cache-gib", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--transfer", type=Path, default=TRANSFER_JSON, help="`disagg bench transfer --json` output")
    p.add_argument("--stack", action="store_true", help="also time our stack (`disagg serve`) around the engine: "
                   "the per-request and per-prefill-call overheads, and how much slower its engines step (2-3 min)")
    p.add_argument("--stack-rate", type=float, default=2.0, help="requests/s of the --stack measurement")
    p.add_argument("--stack-path", choices=PATHS, default="serve",
                   help="the --stack measurement's request path: `disagg serve`'s Serve proxy, or the gateway "
                        "(Envoy + disagg epp in front of the workers' own endpoints)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model = ensure_model(args.model, "tiny")
    transfer = transfer_costs(args.transfer) if args.transfer.exists() else {}
    started = time.monotonic()
    cost = asyncio.run(measure(model, args.core, args.dtype or native_dtype(), args.block_size, args.kv_cache_gib,
                               args.max_model_len, transfer, args.name or args.json.stem))
    if args.stack:
        cost.stack = measure_stack(model, cost, rate=args.stack_rate, path=args.stack_path)
        cost.sources["stack"] = (f"measured: disagg serve ({args.stack_path} path) at {args.stack_rate:g} requests/s "
                                 "(disagg profile --stack)")
    cost.save(args.json)
    if args.plot:
        from disagg.sim.plots import plot_profile

        plot_profile(cost, args.plot)
    print(json.dumps({"prefill": cost.prefill.model_dump(), "decode": cost.decode.model_dump(),
                      "fit": {k: v.model_dump() for k, v in cost.fit.items()}}, indent=1))
    say("profile", f"wrote {args.json} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
