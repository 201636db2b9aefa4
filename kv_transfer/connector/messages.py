"""What the connector's halves tell each other: scheduler -> worker each step, worker ->
scheduler once at start-up (handshake), and an engine -> its peers (the KV map they read from)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorHandshakeMetadata, KVConnectorMetadata

from kv_transfer.connector.params import RemotePrefill


@dataclass
class Load:
    """Decode: read `remote.remote_block_ids[i]` of the prefill into `local_block_ids[i]`."""

    request_id: str
    local_block_ids: list[int]
    remote_block_ids: list[int]
    remote: RemotePrefill


@dataclass
class Hold:
    """Prefill: keep these blocks under this lease until the decode acknowledges or it expires."""

    request_id: str
    lease_id: str
    lease_generation: int
    expires_at: float


@dataclass
class DisaggConnectorMetadata(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)


@dataclass
class DisaggHandshake(KVConnectorHandshakeMetadata):
    """The worker's control address, reported to the scheduler so prefill responses can name it."""

    host: str
    port: int
    agent_name: str


class KVMap(BaseModel):
    """Published with the agent's metadata: what a peer needs to read this engine's blocks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine_id: str
    layout: str  # fingerprint
    block_map: dict[str, Any]
