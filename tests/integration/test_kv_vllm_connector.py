"""DisaggConnector between two real vLLM engines, each in its own process (vLLM on CPU spawns
its engine core; one engine per process keeps vLLM's global metrics sane).

The prefill engine runs the prompt with max_tokens=1 and `do_remote_decode`; the decode engine
runs the same prompt with the returned kv_transfer_params and must answer exactly what an
aggregated run answers, having computed at most one block of the prompt itself.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.integration

BLOCK = 32
LEASE_S = 8.0
MAX_TOKENS = 12


# -- engine processes --

def _engine_main(conn: Any, model: str, cpu: str, lease_s: float, env: dict[str, str]) -> None:
    os.environ.update({"VLLM_CPU_OMP_THREADS_BIND": cpu, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "VLLM_LOGGING_LEVEL": "WARNING", "NIXL_LOG_LEVEL": "WARN", **env})
    import asyncio

    asyncio.run(_serve_engine(conn, model, lease_s))


async def _serve_engine(conn: Any, model: str, lease_s: float) -> None:
    import asyncio

    from vllm import SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    usage: list[float] = [0.0]
    # Prompt tokens by where they came from, summed over the engine's life.
    sources = {"computed": 0, "external": 0, "local_hit": 0}

    class Usage(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                usage[0] = scheduler_stats.kv_cache_usage
            if iteration_stats is not None:
                pts = iteration_stats.prompt_token_stats
                sources["computed"] += pts.computed
                sources["external"] += pts.external_kv_transfer
                sources["local_hit"] += pts.local_cache_hit

        def log_engine_initialized(self) -> None:
            pass

    engine_id = f"engine-{uuid.uuid4().hex[:8]}"
    transfer = KVTransferConfig(
        kv_connector="DisaggConnector", kv_connector_module_path="kv_transfer.vllm_connector",
        kv_role="kv_both", engine_id=engine_id, kv_load_failure_policy="recompute",
        kv_connector_extra_config={"backend": os.environ.get("DISAGG_TEST_KV_BACKEND", "auto"),
                                   "lease_s": lease_s, "host": "127.0.0.1"})
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model, enforce_eager=True, max_model_len=1024, max_num_seqs=4, block_size=BLOCK,
        enable_prefix_caching=True, disable_log_stats=False, kv_transfer_config=transfer), stat_loggers=[Usage])
    conn.send({"engine_id": engine_id, "pid": os.getpid()})
    while True:
        cmd, args = await asyncio.to_thread(conn.recv)
        if cmd == "exit":
            llm.shutdown()
            conn.send(None)
            return
        if cmd == "usage":
            conn.send(usage[0])
            continue
        if cmd == "metrics":
            # Our connector's series, as this (front-end) process exports them.
            from prometheus_client import REGISTRY

            await asyncio.sleep(args.get("settle_s", 0.0))
            totals: dict[str, float] = {}
            for metric in REGISTRY.collect():
                for sample in metric.samples:
                    if sample.name.startswith("disagg_kv_") and not sample.name.endswith("_created"):
                        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            conn.send(totals)
            continue
        if cmd == "reject":
            await llm.notify_kv_transfer_request_rejected(f"reject-{uuid.uuid4().hex[:6]}", args["params"])
            conn.send(None)
            continue
        extra = {"kv_transfer_params": args["params"]} if args.get("params") is not None else None
        sp = SamplingParams(max_tokens=args["max_tokens"], temperature=0.0, ignore_eos=True, extra_args=extra)
        final, before = None, dict(sources)
        async for out in llm.generate({"prompt_token_ids": args["prompt"]}, sp, request_id=args["request_id"]):
            final = out
        assert final is not None
        await asyncio.sleep(0.05)  # the last iteration's stats reach the logger after the output
        conn.send({"tokens": list(final.outputs[0].token_ids), "params": final.kv_transfer_params,
                   "prompt_tokens": {k: sources[k] - before[k] for k in sources}})


class Engine:
    """One AsyncLLM in its own process. `start()` returns at once; `ready()` waits for it."""

    def __init__(self, model: str, cpu: str, lease_s: float = LEASE_S, env: dict[str, str] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_engine_main, args=(child, model, cpu, lease_s, env or {}), daemon=False)
        self.process.start()
        child.close()
        self.info: dict[str, Any] = {}

    def ready(self, timeout_s: float = 1200.0) -> "Engine":
        # Generous: an engine starts in ~20 s on a quiet 2-core machine, minutes on a busy one.
        if not self.conn.poll(timeout_s):
            self.kill()
            raise TimeoutError("engine did not start")
        self.info = self.conn.recv()
        return self

    def call(self, cmd: str, timeout_s: float = 120.0, **args: Any) -> Any:
        self.send(cmd, **args)
        return self.reply(timeout_s)

    def send(self, cmd: str, **args: Any) -> None:
        self.conn.send((cmd, args))

    def reply(self, timeout_s: float = 120.0) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError("engine did not answer")
        return self.conn.recv()

    def generate(self, prompt: list[int], max_tokens: int = MAX_TOKENS, params: dict | None = None) -> dict:
        return self.call("generate", prompt=prompt, max_tokens=max_tokens, params=params,
                         request_id=f"r-{uuid.uuid4().hex[:8]}")

    def prefill(self, prompt: list[int]) -> dict:
        out = self.generate(prompt, 1, {"do_remote_decode": True})
        assert out["params"] is not None and out["params"]["do_remote_prefill"], out
        return out["params"]

    def wait_idle(self, timeout_s: float = 20.0) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            usage = self.call("usage")
            if usage == 0.0 or time.monotonic() > deadline:
                return usage
            time.sleep(0.2)

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.call("exit", timeout_s=30)
            except Exception:
                pass
            self.process.join(30)
        self.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            # The engine core is a child of this process: kill the whole group we started.
            for child in _children(self.process.pid):
                try:
                    os.kill(child, 9)
                except ProcessLookupError:
                    pass
            self.process.kill()
            self.process.join(10)


def _children(pid: int | None) -> list[int]:
    import psutil

    if pid is None:
        return []
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def prompt_tokens(seed: int, n: int = 300) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


@pytest.fixture(scope="module")
def engines(tiny_model: str):
    # Started together: start-up is mostly imports, one core each.
    prefill = Engine(tiny_model, "0")
    decode = Engine(tiny_model, "1", env={"DISAGG_KV_FAULT_INJECTION": "1"})
    try:
        prefill.ready()
        decode.ready()
        yield prefill, decode
    finally:
        decode.close()
        prefill.close()


# -- the specification --

def test_prefill_returns_nixl_style_params_with_a_lease(engines) -> None:
    prefill, _ = engines
    prompt = prompt_tokens(1)
    params = prefill.prefill(prompt)
    for key in ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port", "lease_id",
                "lease_expires_at", "layout"):
        assert key in params, key
    assert params["remote_engine_id"] == prefill.info["engine_id"]
    assert len(params["remote_block_ids"]) == -(-len(prompt) // BLOCK)
    assert params["lease_expires_at"] > time.time()
    # Nobody reads it: the lease expires and the prefill frees the blocks by itself.
    assert prefill.wait_idle(LEASE_S + 10) == 0.0


def test_disaggregated_output_equals_aggregated(engines) -> None:
    prefill, decode = engines
    prompt = prompt_tokens(2)
    params = prefill.prefill(prompt)
    before = decode.call("metrics")
    out = decode.generate(prompt, params=params)
    reference = prefill.generate(prompt)  # aggregated, on the other engine
    assert out["tokens"] == reference["tokens"]
    assert out["prompt_tokens"]["computed"] <= BLOCK, out["prompt_tokens"]
    assert out["prompt_tokens"]["external"] >= len(prompt) - BLOCK, out["prompt_tokens"]
    after = decode.call("metrics", settle_s=1.0)
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert grew.get("disagg_kv_transfers_total") == 1, grew
    assert grew.get("disagg_kv_transfer_bytes_total", 0) >= len(params["remote_block_ids"]) * BLOCK, grew


def test_prefill_frees_blocks_once_decode_acknowledged(engines) -> None:
    prefill, decode = engines
    prompt = prompt_tokens(3)
    params = prefill.prefill(prompt)
    t0 = time.monotonic()
    decode.generate(prompt, params=params)
    assert prefill.wait_idle(LEASE_S) == 0.0
    assert time.monotonic() - t0 < LEASE_S - 2  # by the acknowledgement, not by expiry
    assert decode.wait_idle() == 0.0


def test_read_after_lease_expiry_is_recomputed(engines) -> None:
    prefill, decode = engines
    prompt = prompt_tokens(4)
    params = prefill.prefill(prompt)
    assert prefill.wait_idle(LEASE_S + 10) == 0.0  # expired and freed
    # Pretend the decode's clock disagrees: it reads, and the prefill's confirmation fails it.
    stale = dict(params, lease_expires_at=time.time() + 3600)
    before = decode.call("metrics")
    out = decode.generate(prompt, params=stale)
    assert out["tokens"] == prefill.generate(prompt)["tokens"]
    assert out["prompt_tokens"]["computed"] >= len(prompt) - BLOCK, out["prompt_tokens"]  # recomputed
    after = decode.call("metrics", settle_s=1.0)
    assert after.get("disagg_kv_transfer_failures_total", 0) - before.get("disagg_kv_transfer_failures_total", 0) == 1
    assert prefill.call("metrics", settle_s=0.5).get("disagg_kv_lease_expiries_total", 0) >= 1
    assert decode.wait_idle() == 0.0


def test_rejected_transfer_frees_prefill_blocks_early(engines) -> None:
    prefill, decode = engines
    params = prefill.prefill(prompt_tokens(5))
    t0 = time.monotonic()
    decode.call("reject", params=params)
    assert prefill.wait_idle(LEASE_S) == 0.0
    assert time.monotonic() - t0 < LEASE_S - 2


def test_killed_prefill_mid_transfer_still_answers_correctly(engines) -> None:
    """Runs last: it kills the module's prefill engine."""
    prefill, decode = engines
    prompt = prompt_tokens(6)
    reference = prefill.generate(prompt)["tokens"]  # aggregated, before the prefill dies
    params = prefill.prefill(prompt)
    # The decode has met this prefill before (handshake done); it waits 2 s before its READ,
    # and the prefill dies meanwhile.
    decode.send("generate", prompt=prompt, max_tokens=MAX_TOKENS, request_id="killed-prefill",
                params=dict(params, fault_delay_read_s=2.0))
    time.sleep(1.0)
    prefill.kill()
    out = decode.reply(120)
    assert out["tokens"] == reference
    assert out["prompt_tokens"]["computed"] >= len(prompt) - BLOCK, out["prompt_tokens"]  # recomputed
    assert decode.wait_idle() == 0.0
