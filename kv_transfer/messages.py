"""Messages that cross the control channel between two agents (pydantic, msgpack on the wire)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from kv_transfer.lease import LeaseStatus


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentMetadata(_Message):
    """Everything a peer needs to reach an agent and check accesses against its memory."""

    name: str
    # A new incarnation means a restarted agent: peers drop what they knew of the old one.
    incarnation: str
    backend: str
    backend_metadata: bytes
    regions: list[list[int | str]]
    regions_generation: int
    control_host: str = ""
    control_port: int = 0
    # Opaque bytes the owner publishes beside its metadata (the vLLM connector: its KV layout).
    app_metadata: bytes = b""


class Hello(_Message):
    """A peer asks for our metadata; `subscribe` asks us to push region-table changes to it."""

    type: Literal["hello"] = "hello"
    requester: str
    subscribe: bool = True


class LeaseCheck(_Message):
    """Is this lease still held? With `release`, end it (the peer's acknowledgement)."""

    type: Literal["lease_check"] = "lease_check"
    lease_id: str
    generation: int
    release: bool = False
    wait_s: float = 0.0


class LeaseRenew(_Message):
    type: Literal["lease_renew"] = "lease_renew"
    lease_id: str
    generation: int
    ttl_s: float | None = None


class LeaseReply(_Message):
    status: LeaseStatus
    expires_at: float | None = None


class RegionsUpdate(_Message):
    """Pushed by a target after it registered or deregistered memory."""

    type: Literal["regions"] = "regions"
    name: str
    incarnation: str
    regions: list[list[int | str]]
    regions_generation: int
    # NIXL's metadata changes with registrations (it carries the remote keys).
    backend_metadata: bytes = b""


class RegionsAck(_Message):
    type: Literal["regions_ack"] = "regions_ack"
    regions_generation: int


class ErrorReply(_Message):
    error: str
