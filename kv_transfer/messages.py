"""Messages that cross the control channel between two agents: msgspec Structs, tagged by `type`.

Requests (`Hello`, `LeaseCheck`, `LeaseRenew`) are answered by a `Reply`; a target pushes
`RegionsUpdate` to its subscribers, which answer `RegionsAck`.
"""

from __future__ import annotations

import msgspec

from kv_transfer.lease import LeaseStatus


class _Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class AgentMetadata(_Message, tag="metadata"):
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


class Hello(_Message, tag="hello"):
    """A peer asks for our metadata; `subscribe` asks us to push region-table changes to it."""

    requester: str
    subscribe: bool = True


class LeaseCheck(_Message, tag="lease_check"):
    """Is this lease still held? With `release`, end it (the peer's acknowledgement)."""

    lease_id: str
    generation: int
    release: bool = False
    wait_s: float = 0.0


class LeaseRenew(_Message, tag="lease_renew"):
    lease_id: str
    generation: int
    ttl_s: float | None = None


class LeaseReply(_Message, tag="lease_reply"):
    status: LeaseStatus
    expires_at: float | None = None


class ErrorReply(_Message, tag="error"):
    error: str


class RegionsUpdate(_Message, tag="regions"):
    """Pushed by a target after it registered or deregistered memory."""

    name: str
    incarnation: str
    regions: list[list[int | str]]
    regions_generation: int
    # NIXL's metadata changes with registrations (it carries the remote keys).
    backend_metadata: bytes = b""


class RegionsAck(_Message, tag="regions_ack"):
    regions_generation: int


Request = Hello | LeaseCheck | LeaseRenew
Reply = AgentMetadata | LeaseReply | ErrorReply
