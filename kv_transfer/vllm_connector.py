"""`DisaggConnector`: our vLLM KV connector (KVConnectorBase_V1) over `kv_transfer.Agent`.

Enable it with::

    KVTransferConfig(kv_connector="DisaggConnector",
                     kv_connector_module_path="kv_transfer.vllm_connector",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"backend": "auto", "lease_s": 30, "host": "127.0.0.1"})

It speaks vLLM NixlConnector's kv_transfer_params, plus a lease and the KV layout fingerprint.
A prefill request carries `{"do_remote_decode": True}` and runs with max_tokens=1; its output's
kv_transfer_params go, unchanged, into the decode request's `kv_transfer_params`.

Lifecycle (vLLM calls these; scheduler half in `connector/scheduler.py`, worker half in
`connector/worker.py`):

- start-up, worker: `register_kv_caches` (creates the agent, registers the KV cache, starts the
  control channel), then `get_handshake_metadata`; scheduler: `set_xfer_handshake_metadata_pp_aware`
  learns the address a prefill response must name.
- decode request, scheduler: `get_num_new_matched_tokens` claims the prompt as external (async),
  `update_state_after_alloc` turns the allocated blocks into a load, `build_connector_meta`
  hands it to the worker; worker: `start_load_kv` starts the READ, `get_transfer_results` reports
  it finished (failed or not), `get_block_ids_with_load_errors` names blocks to recompute.
- prefill request, scheduler: `request_finished` keeps the blocks under a lease and returns the
  params; worker: `start_load_kv` holds the lease; `get_transfer_results` reports the request
  sent once the decode acknowledged or the lease expired, and vLLM frees the blocks.
- `shutdown`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorHandshakeMetadata,
                                                               KVConnectorMetadata, KVConnectorRole)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kv_transfer.connector.messages import DisaggConnectorMetadata
from kv_transfer.connector.params import ConnectorSettings, layout_of
from kv_transfer.connector.scheduler import SchedulerSide
from kv_transfer.connector.stats import DisaggKVStats, DisaggPromMetrics
from kv_transfer.connector.worker import WorkerSide

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


class DisaggConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None and transfer.engine_id is not None
        self.engine_id = transfer.engine_id
        settings = ConnectorSettings.model_validate(transfer.kv_connector_extra_config or {})
        layout = layout_of(vllm_config).fingerprint()
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = SchedulerSide(self.engine_id, settings, vllm_config.cache_config.block_size, layout)
        else:
            rank = vllm_config.parallel_config.rank
            self.worker = WorkerSide(self.engine_id, settings, layout, kv_cache_config.num_blocks,
                                     agent_name=f"{self.engine_id}-r{rank}")

    # -- worker half --

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return None if self.worker is None else self.worker.handshake()

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, DisaggConnectorMetadata)
        self.worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # whole-request loads, finished before the request is scheduled

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        return None  # decodes pull; nothing is pushed

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self.worker is not None
        return self.worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set() if self.worker is None else self.worker.get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> DisaggKVStats | None:
        data = None if self.worker is None else self.worker.take_stats()
        return None if data is None else DisaggKVStats(data=data)

    # -- scheduler half --

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_connector_meta()

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self.scheduler.request_finished(request, block_ids)

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        if self.scheduler is not None:
            self.scheduler.set_handshake(metadata)

    # -- both --

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> DisaggKVStats | None:
        return DisaggKVStats(data=data) if data is not None else DisaggKVStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> DisaggPromMetrics:
        return DisaggPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        if self.scheduler is not None:
            self.scheduler.shutdown()
