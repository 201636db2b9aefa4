"""Ray Serve LLM's P/D app (`build_pd_openai_app`, vLLM's NixlConnector) on a local Ray, as the
peer we benchmark against. Run as its own process (one Ray per process), from the repository
root:

    python -m benchmarks.ray_serve_llm --model models/tiny --port 8000 --stream-batching-ms 50

Prefill is pinned to --prefill-core and decode to --decode-core, like our stack. Prints
`READY <url>` when the app answers, and shuts Serve and Ray down on SIGTERM or SIGINT.

Needs `ray[serve]` and vLLM, plus the pure-Python modules `ray.llm` imports that `ray[serve]`
does not pull (`pyarrow`, `jsonref`); never `ray[llm]`, which pins a CUDA vLLM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from disagg.bench.processes import free_port

# Ray Serve LLM's default: streamed tokens are sent in batches every 50 ms.
DEFAULT_STREAM_BATCHING_MS = 50.0


def engine_env(core: str | None, nixl_port: int, host: str, kv_cache_gib: int) -> dict[str, str]:
    """The env of a peer's vLLM engine: NixlConnector's side channel on `host`, UCX on loopback, pinned to
    `core` with one OpenMP thread (None: unpinned), patient with slow steps."""
    env = {
        "VLLM_NIXL_SIDE_CHANNEL_HOST": host,
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(nixl_port),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "UCX_NET_DEVICES": "lo",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600",
        "VLLM_ENGINE_READY_TIMEOUT_S": "3600",
    }
    if core is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = core
        env["OMP_NUM_THREADS"] = "1"
    return env


def pd_serving_args(model: str, *, model_id: str, host: str, prefill_core: str | None, decode_core: str | None,
                    prefill_nixl_port: int, decode_nixl_port: int, stream_batching_ms: float,
                    dtype: str = "auto", block_size: int = 128, max_model_len: int = 2048,
                    max_num_seqs: int = 16, kv_cache_gib: int = 1) -> dict[str, Any]:
    """The `build_pd_openai_app` argument: one replica per role, CPU engines, NixlConnector."""

    def llm_config(core: str | None, nixl_port: int) -> dict[str, Any]:
        return {
            "model_loading_config": {"model_id": model_id, "model_source": model},
            "accelerator_config": {"kind": "cpu"},
            "engine_kwargs": {
                "dtype": dtype,
                "block_size": block_size,
                "max_model_len": max_model_len,
                "max_num_seqs": max_num_seqs,
                "enforce_eager": True,
                "enable_prefix_caching": True,
                "kv_transfer_config": {"kv_connector": "NixlConnector", "kv_role": "kv_both",
                                       "kv_buffer_device": "cpu"},
            },
            "runtime_env": {"env_vars": engine_env(core, nixl_port, host, kv_cache_gib)},
            "experimental_configs": {"stream_batching_interval_ms": stream_batching_ms},
            "log_engine_metrics": False,
        }

    return {"prefill_config": llm_config(prefill_core, prefill_nixl_port),
            "decode_config": llm_config(decode_core, decode_nixl_port)}


def _wait_ready(url: str, model_id: str, timeout_s: float) -> None:
    """Until two completions in a row succeed, each prefilled on the prefill engine and decoded
    with its KV on the decode one: the ingress lists the model before the engines are up."""
    import httpx

    deadline = time.monotonic() + timeout_s
    body = {"model": model_id, "prompt": "are the engines ready? " * 60, "max_tokens": 4}
    passed = 0
    while time.monotonic() < deadline and passed < 2:
        try:
            ok = httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200
        except httpx.HTTPError:
            ok = False
        passed = passed + 1 if ok else 0
        if not ok:
            time.sleep(2)
    if passed >= 2:
        return
    raise TimeoutError(f"Ray Serve LLM at {url} not ready after {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ray_serve_llm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--model-id", help="served model name (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--stream-batching-ms", type=float, default=DEFAULT_STREAM_BATCHING_MS)
    p.add_argument("--prefill-core", default="0")
    p.add_argument("--decode-core", default="1")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--ray-tmpdir", help="Ray's temp dir (short: Ray's socket paths must be short)")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray
    from ray import serve
    from ray.serve.llm import build_pd_openai_app

    model_id = args.model_id or Path(args.model).name
    tmp = args.ray_tmpdir or tempfile.mkdtemp(prefix="rsl-", dir="/tmp")
    ray.init(_node_ip_address=args.host, _temp_dir=tmp, include_dashboard=False, num_cpus=8,
             runtime_env={"env_vars": {"VLLM_NIXL_SIDE_CHANNEL_HOST": args.host, "UCX_NET_DEVICES": "lo"}},
             logging_level=logging.WARNING)
    stop = threading.Event()
    # ray.init's SIGTERM handler exits without shutting Serve down; ours replaces it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_pd_openai_app(pd_serving_args(
            args.model, model_id=model_id, host=args.host, prefill_core=args.prefill_core or None,
            decode_core=args.decode_core or None, prefill_nixl_port=free_port(args.host),
            decode_nixl_port=free_port(args.host), stream_batching_ms=args.stream_batching_ms,
            dtype=args.dtype, block_size=args.block_size, max_model_len=args.max_model_len))
        serve.run(app, name="ray-serve-llm-pd", route_prefix="/", blocking=False)
        url = f"http://{args.host}:{args.port}"
        _wait_ready(url, model_id, args.timeout)
        print(f"READY {url} model={model_id}", flush=True)
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
