"""The vLLM engine, embedded in-process (v1 AsyncLLM).

One engine per process: vLLM's Prometheus metrics live in the process-global registry, and on
CPU its engine core is a spawned child that inherits this process's environment (core pinning,
KV cache size), which is set here just before the engine starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any, AsyncIterator

from disagg.config import AppConfig
from disagg.engine.base import (EngineStats, GenerateOutput, GenerateRequest, PositionLogprobs, RequestRejected,
                                SamplingOptions, TokenLogprob)
from kv_transfer.layout import KVLayout

log = logging.getLogger(__name__)
# How long shutdown() waits for the engine core to exit before it is killed.
SHUTDOWN_S = 2.0


def engine_environment(config: AppConfig, cpu_bind: str | None, side_channel_host: str | None = None,
                       runtime_dir: str | None = None) -> dict[str, str]:
    """Environment a vLLM engine on this host needs; applied before the engine core spawns."""
    env = {
        # The address peers reach this engine's KV at (never a wildcard).
        "VLLM_NIXL_SIDE_CHANNEL_HOST": side_channel_host or config.host,
        # What vLLM's own sockets bind (KV events on tcp://*:0, its torch.distributed store):
        # the worker's address, not the machine's external one.
        "VLLM_HOST_IP": side_channel_host or config.host,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if runtime_dir is not None:
        # vLLM's ipc:// sockets between its processes, removed with the worker's directory.
        env["VLLM_RPC_BASE_PATH"] = runtime_dir
    if config.kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(config.kv_cache_gib)
    if cpu_bind is not None:
        # Two engines on a small machine must not fight over the same cores.
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
        env["OMP_NUM_THREADS"] = str(_count_cpus(cpu_bind))
    return env


def _count_cpus(bind: str) -> int:
    n = 0
    for part in bind.replace("|", ",").split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) - int(lo) + 1) if hi else 1
    return max(n, 1)


def kv_transfer_config(config: AppConfig, engine_id: str, host: str) -> dict[str, Any] | None:
    """vLLM KVTransferConfig kwargs for the configured connector (None: no connector)."""
    if config.kv_connector == "none":
        return None
    if config.kv_connector == "nixl":
        return {
            "kv_connector": "NixlConnector",
            "kv_role": "kv_both",
            "kv_buffer_device": "cpu",
            "engine_id": engine_id,
            # A failed pull is recomputed on decode, never served from garbage.
            "kv_load_failure_policy": "recompute",
            # vLLM heartbeats every lease/6 s, so the lease must be at least 6 s.
            "kv_connector_extra_config": {"kv_lease_duration": max(6, int(config.kv_lease_s))},
        }
    return {
        "kv_connector": "DisaggConnector",
        "kv_connector_module_path": "kv_transfer.vllm_connector",
        "kv_role": "kv_both",
        "kv_buffer_device": "cpu",
        "engine_id": engine_id,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "backend": config.kv_backend,
            "lease_s": config.kv_lease_s,
            "host": host,
        },
    }


class VllmEngine:
    """`Engine` over vLLM's AsyncLLM."""

    def __init__(
        self,
        config: AppConfig,
        *,
        cpu_bind: str | None = None,
        kv_events_endpoint: str | None = None,
        kv_events_replay_endpoint: str | None = None,
        side_channel_host: str | None = None,
        nixl_side_channel_port: int | None = None,
        runtime_dir: str | None = None,
    ):
        self.config = config
        self.cpu_bind = cpu_bind
        # Where vLLM binds its KV-event publisher and replay socket (ipc://PATH, or tcp://*:0 for
        # a free port on VLLM_HOST_IP); after start(), the endpoints it bound.
        self.kv_events_endpoint = kv_events_endpoint
        self.kv_events_replay_endpoint = kv_events_replay_endpoint
        self.side_channel_host = side_channel_host
        self.nixl_side_channel_port = nixl_side_channel_port
        self.runtime_dir = runtime_dir
        self.engine_id = f"engine-{uuid.uuid4().hex[:12]}"
        self.layout: KVLayout | None = None
        self.num_blocks = 0
        self._llm: Any = None
        self._stats = EngineStats()

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.update(engine_environment(self.config, self.cpu_bind, self.side_channel_host, self.runtime_dir))
        if self.nixl_side_channel_port is not None:
            os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(self.nixl_side_channel_port)

        c = self.config
        kwargs: dict[str, Any] = dict(
            model=c.model,
            served_model_name=[c.model_name],
            dtype=c.dtype,
            block_size=c.block_size,
            max_model_len=c.max_model_len,
            max_num_seqs=c.max_num_seqs,
            enforce_eager=c.enforce_eager,
            seed=c.seed,
            enable_prefix_caching=True,
            disable_log_stats=False,
        )
        if c.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = c.max_num_batched_tokens
        transfer = kv_transfer_config(c, self.engine_id, self.side_channel_host or c.host)
        if transfer is not None:
            from vllm.config import KVTransferConfig

            kwargs["kv_transfer_config"] = KVTransferConfig(**transfer)
        if self.kv_events_endpoint:
            from vllm.config import KVEventsConfig

            kwargs["kv_events_config"] = KVEventsConfig(
                enable_kv_cache_events=True,
                publisher="zmq",
                endpoint=self.kv_events_endpoint,
                replay_endpoint=self.kv_events_replay_endpoint,
                topic="kv-events",
            )

        stats_sink = self._stats

        from vllm.v1.metrics.loggers import StatLoggerBase

        class _SchedulerSnapshot(StatLoggerBase):
            """Keeps the latest scheduler stats for `stats()` (vLLM calls record() each step)."""

            def __init__(self, vllm_config: Any, engine_index: int = 0):
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    stats_sink.waiting = scheduler_stats.num_waiting_reqs
                    stats_sink.running = scheduler_stats.num_running_reqs
                    stats_sink.kv_usage = scheduler_stats.kv_cache_usage

            def log_engine_initialized(self) -> None:
                pass

        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), stat_loggers=[_SchedulerSnapshot])
        if self.kv_events_endpoint:
            # The publisher binds in the engine core, which reports what it bound (a port 0 taken).
            for bound in self._llm.get_kv_event_sources().values():
                self.kv_events_endpoint, self.kv_events_replay_endpoint = bound.endpoint, bound.replay_endpoint
        vc = self._llm.vllm_config
        self.num_blocks = int(vc.cache_config.num_gpu_blocks or 0)
        self._stats.num_blocks = self.num_blocks
        mc = vc.model_config
        self.layout = KVLayout(
            model=c.model_name,
            dtype=str(mc.dtype).removeprefix("torch."),
            block_size=vc.cache_config.block_size,
            num_layers=mc.get_num_layers(vc.parallel_config),
            num_kv_heads=mc.get_num_kv_heads(vc.parallel_config),
            head_dim=mc.get_head_size(),
            tp_size=vc.parallel_config.tensor_parallel_size,
        )
        log.info("engine %s ready: %d KV blocks, layout %s", self.engine_id, self.num_blocks, self.layout.fingerprint())

    @property
    def tokenizer(self) -> Any:
        return self._llm.tokenizer

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineGenerateError

        finished = False
        started = False
        try:
            stream = self._llm.generate(
                prompt={"prompt_token_ids": request.prompt_token_ids},
                sampling_params=sampling_params(request),
                request_id=request.request_id,
            )
            async for out in stream:
                started = True
                finished = out.finished
                for completion in out.outputs:
                    yield GenerateOutput(
                        request_id=request.request_id,
                        token_ids=list(completion.token_ids),
                        text=completion.text,
                        finished=out.finished,
                        finish_reason=completion.finish_reason,
                        num_prompt_tokens=len(out.prompt_token_ids or request.prompt_token_ids),
                        num_cached_tokens=out.num_cached_tokens or 0,
                        kv_transfer_params=out.kv_transfer_params,
                        index=completion.index,
                        logprobs=_logprobs(completion, request.sampling.logprobs),
                    )
        except (VLLMClientError, EngineGenerateError) as e:
            # vLLM checks the sampling options as it builds them and when the request is added (a
            # schema its grammar backend cannot compile, say): the client's mistake, not the engine's.
            cause = e if isinstance(e, VLLMClientError) else e.__cause__
            if started or not isinstance(cause, ValueError | VLLMClientError):
                raise
            raise RequestRejected(str(cause), _option_at_fault(request, cause)) from None
        finally:
            if not finished:
                # The consumer went away (client disconnect, cancel): free the blocks now rather
                # than when the garbage collector finalizes vLLM's stream.
                await asyncio.shield(self._llm.abort(request.request_id))

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def release_remote_kv(self, request_id: str, kv_transfer_params: dict[str, Any]) -> None:
        """Decode side: give up a prefill's blocks we will not read, so the prefill frees them
        now instead of at lease expiry."""
        params = dict(kv_transfer_params, do_remote_prefill=True)
        await self._llm.notify_kv_transfer_request_rejected(request_id, params)

    def stats(self) -> EngineStats:
        return self._stats

    async def shutdown(self) -> None:
        if self._llm is not None:
            # Bounded: a stop must end (vLLM's default waits on each of its processes in turn;
            # the worker's guard ends what is left after this).
            self._llm.shutdown(timeout=SHUTDOWN_S)
            self._llm = None


def sampling_params(request: GenerateRequest) -> Any:
    """vLLM's SamplingParams for a request: every option passes as vLLM names it."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    s = request.sampling
    structured = None
    if s.structured is not None:
        structured = StructuredOutputsParams(json=s.structured.json_schema) if s.structured.json_schema is not None \
            else StructuredOutputsParams(json_object=True)
    return SamplingParams(
        n=s.n,
        max_tokens=s.max_tokens,
        min_tokens=s.min_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        seed=s.seed,
        stop=s.stop or None,
        stop_token_ids=s.stop_token_ids or None,
        ignore_eos=s.ignore_eos,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        logit_bias=s.logit_bias or None,
        logprobs=s.logprobs,
        structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA,
        extra_args={"kv_transfer_params": request.kv_transfer_params} if request.kv_transfer_params else None,
    )


def _option_at_fault(request: GenerateRequest, error: Exception) -> str | None:
    """The SamplingOptions field vLLM's refusal is about. vLLM names some (its `parameter`); the
    structured-output backends name none, but say "schema", "grammar" or "structured"."""
    name = getattr(error, "parameter", None)
    if name == "structured_outputs" or (name is None and request.sampling.structured is not None and any(
            word in str(error).lower() for word in ("schema", "grammar", "structured", "json"))):
        return "structured"
    return name if name in SamplingOptions.model_fields else None


def _logprobs(completion: Any, top: int | None) -> list[PositionLogprobs] | None:
    """vLLM's per-position logprob dicts (the sampled token and the `top` most likely, keyed by
    token id, ranked) as PositionLogprobs of this delta's tokens."""
    if top is None or completion.logprobs is None:
        return None
    positions = []
    for token_id, entries in zip(completion.token_ids, completion.logprobs):
        chosen = entries[token_id]
        ranked = sorted((e for e in entries.items() if e[1].rank is not None and e[1].rank <= top),
                        key=lambda e: e[1].rank)
        positions.append(PositionLogprobs(
            sampled=TokenLogprob(token_id, chosen.decoded_token or "", chosen.logprob),
            top=[TokenLogprob(t, lp.decoded_token or "", lp.logprob) for t, lp in ranked[:top]],
        ))
    return positions
