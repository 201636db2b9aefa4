"""The transfer backend protocol: how an Agent moves bytes, whatever carries them.

Lifecycle, in call order (the Agent is the only caller):

1. ``Backend(agent_name, host)`` then ``start(access)``: open endpoints; a two-sided backend
   serves each incoming access inside ``with access(descs):``, which refuses descriptors outside
   the Agent's live registered memory and keeps it registered until the access is done.
2. ``metadata()``: the bytes a peer needs to reach this backend (it travels inside the Agent's
   metadata). Does not change state.
3. ``register(descs)`` / ``deregister(handle)``: make memory reachable, or unreachable. The Agent
   keeps the region table; backends only do what their transport needs (NIXL pins and exports
   keys; two-sided backends need nothing).
4. ``add_peer(name, metadata)`` / ``remove_peer(name)``: learn or forget how to reach a peer.
5. ``post(op, local, remote, peer, notif)``: start one transfer, already checked by the Agent
   on the initiator side. Returns a backend handle. ``state(handle)`` polls it without
   blocking; ``release(handle)`` frees it (cancelling if it is still in flight).
6. ``send_notif(peer, msg)`` / ``take_notifs()``: notifications, delivered to the target after
   the transfer they ride with completed.
7. ``close()``.

Capability flags say what the Agent must add on top, instead of branching on backend names:
``one_sided`` backends never see the target side of an access, so the target's checks happen
before posting (initiator) and after completion (lease confirmation) only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from enum import Enum
from typing import Any, ClassVar, Literal

from kv_transfer.descriptors import DescList

Op = Literal["READ", "WRITE"]


class XferState(str, Enum):
    """NIXL's transfer states."""

    DONE = "DONE"
    PROC = "PROC"
    ERR = "ERR"


# `with access(descs):` raises AccessError unless every descriptor is inside live registered
# memory, and keeps those regions registered until the block exits.
AccessGuard = Callable[[DescList], AbstractContextManager[None]]


class Backend(ABC):
    name: ClassVar[str]
    # True: the target's CPU never sees an access (RMA); False: it serves every access.
    one_sided: ClassVar[bool]

    def __init__(self, agent_name: str, host: str = "127.0.0.1") -> None:
        self.agent_name = agent_name
        self.host = host

    @abstractmethod
    def start(self, access: AccessGuard) -> None:
        """Open endpoints. Called once, before anything else."""

    @abstractmethod
    def metadata(self) -> bytes:
        """How peers reach this backend. Read-only."""

    @abstractmethod
    def register(self, descs: DescList) -> Any:
        """Make memory reachable by peers; returns a handle for `deregister`."""

    @abstractmethod
    def deregister(self, handle: Any) -> None:
        """Make registered memory unreachable through this backend."""

    @abstractmethod
    def add_peer(self, name: str, metadata: bytes) -> None:
        """Learn how to reach `name` (replacing what was known)."""

    @abstractmethod
    def remove_peer(self, name: str) -> None:
        """Forget `name`; its in-flight transfers end in ERR."""

    @abstractmethod
    def post(self, op: Op, local: DescList, remote: DescList, peer: str, notif: bytes) -> Any:
        """Start a transfer; never blocks on its completion. Raises TransferError if it cannot start."""

    @abstractmethod
    def state(self, handle: Any) -> tuple[XferState, str | None]:
        """Poll a transfer: its state and, for ERR, why. Does not block."""

    @abstractmethod
    def release(self, handle: Any) -> None:
        """Free a transfer handle, cancelling the transfer if it is still in flight."""

    @abstractmethod
    def send_notif(self, peer: str, msg: bytes) -> None:
        """Send a notification not tied to a transfer."""

    @abstractmethod
    def take_notifs(self) -> dict[str, list[bytes]]:
        """Notifications received since the last call, by sender name. Empties the queue."""

    @abstractmethod
    def close(self) -> None:
        """Release endpoints and registrations."""
