"""The connector's settings, and the kv_transfer_params it reads and writes.

kv_transfer_params keep vLLM NixlConnector's keys (`do_remote_decode`, `do_remote_prefill`,
`remote_engine_id`, `remote_request_id`, `remote_block_ids`, `remote_host`, `remote_port`,
`remote_num_tokens`, `tp_size`) and add the lease (`lease_id`, `lease_generation`,
`lease_expires_at`) and the KV `layout` fingerprint.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kv_transfer.layout import KVLayout
from kv_transfer.lease import DEFAULT_LEASE_S, LeaseToken


class ConnectorSettings(BaseModel):
    """`kv_connector_extra_config` of KVTransferConfig."""

    model_config = ConfigDict(extra="ignore")

    backend: str = "auto"
    lease_s: float = Field(DEFAULT_LEASE_S, gt=0)
    # Where this engine's agent listens for peers (its control channel); advertised to decodes
    # as remote_host/remote_port. Port 0 picks a free one.
    host: str = Field(default_factory=lambda: os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1"))
    port: int = Field(0, ge=0, le=65535)
    # A decode does not start a read whose lease ends sooner than this.
    lease_margin_s: float = Field(0.5, ge=0)
    # Prefills shorter than this many tokens are not worth a transfer; decode recomputes them.
    min_remote_tokens: int = Field(1, ge=1)


class RemotePrefill(BaseModel):
    """What a prefill hands its decode: where the KV is, under which lease, in which layout."""

    model_config = ConfigDict(extra="ignore")

    remote_engine_id: str
    remote_request_id: str = ""
    remote_block_ids: list[int]
    remote_host: str
    remote_port: int
    remote_num_tokens: int = 0
    lease_id: str
    lease_generation: int
    lease_expires_at: float
    layout: str
    # Fault injection, honoured only when the decode engine runs with DISAGG_KV_FAULT_INJECTION=1:
    # wait this long between the handshake and the READ (tests kill the prefill meanwhile).
    fault_delay_read_s: float = 0.0

    @field_validator("remote_block_ids", mode="before")
    @classmethod
    def _one_group(cls, v: Any) -> Any:
        # NixlConnector nests block ids per KV cache group; we run one group.
        if isinstance(v, (list, tuple)) and len(v) == 1 and isinstance(v[0], (list, tuple)):
            return list(v[0])
        return v

    @property
    def lease(self) -> LeaseToken:
        return LeaseToken(self.lease_id, self.lease_generation)

    def seconds_left(self, now: float | None = None) -> float:
        return self.lease_expires_at - (time.time() if now is None else now)

    @classmethod
    def parse(cls, params: dict[str, Any] | None) -> "RemotePrefill | None":
        """The remote prefill these params describe, or None if they are not (complete) ours."""
        if not params or not params.get("do_remote_prefill"):
            return None
        try:
            return cls.model_validate(params)
        except ValueError:
            return None

    def to_params(self) -> dict[str, Any]:
        return {"do_remote_prefill": True, "do_remote_decode": False, "tp_size": 1,
                **self.model_dump(exclude={"fault_delay_read_s"})}


def layout_of(vllm_config: Any) -> KVLayout:
    """This engine's KV layout, computed the way the serving core computes it for routing."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    name = mc.served_model_name
    if isinstance(name, (list, tuple)):
        name = name[0]
    return KVLayout(
        model=str(name or mc.model),
        dtype=str(mc.dtype).removeprefix("torch."),
        block_size=int(vllm_config.cache_config.block_size),
        num_layers=int(mc.get_num_layers(pc)),
        num_kv_heads=int(mc.get_num_kv_heads(pc)),
        head_dim=int(mc.get_head_size()),
        tp_size=int(pc.tensor_parallel_size),
    )
