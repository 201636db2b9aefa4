"""NIXL's UCX backend (nixl_cu12): one-sided READ/WRITE, zero-copy on one host (UCX picks
shared memory / CMA), RDMA across hosts.

NIXL checks descriptors against the registrations in the metadata it was given, but a peer's
stale metadata still reaches memory the target has since deregistered (measured: a READ after
deregistration succeeds). The Agent closes that gap with region-table pushes and lease
confirmation; this module only drives NIXL.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any

import numpy as np

from kv_transfer.backends.base import AccessGuard, Backend, Op, XferState
from kv_transfer.descriptors import DescList
from kv_transfer.errors import PeerError, TransferError

log = logging.getLogger(__name__)


def _quiet_nixl_logging() -> None:
    # NIXL logs every agent and backend creation at INFO on stdout.
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    logging.getLogger("nixl").setLevel(logging.WARNING)


class NixlBackend(Backend):
    name = "nixl"
    one_sided = True

    def start(self, access: AccessGuard) -> None:
        if _is_loopback(self.host):
            # An agent bound to loopback keeps UCX's sockets (notifications, connection setup)
            # there too; shared memory and CMA carry the data either way.
            os.environ.setdefault("UCX_NET_DEVICES", "lo")
        _quiet_nixl_logging()
        from nixl_cu12._api import nixl_agent, nixl_agent_config

        # No progress thread: NIXL's spins a core even when idle (measured 0.9 core); the Agent
        # progresses the worker whenever it polls a transfer or notifications.
        config = nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=[])
        self._nixl = nixl_agent(self.agent_name, config)
        # UCX's "peer" error handling rules out the shared-memory/CMA lanes for RMA, so READs
        # and WRITEs fall back to emulation that the target must progress: with an idle target
        # they never complete (measured). "none" keeps one-sided zero-copy; a dead peer is
        # still noticed, through the Agent's control channel and CMA's own errors.
        mode = os.environ.get("DISAGG_NIXL_ERROR_HANDLING", "none")
        self._nixl.create_backend("UCX", {"ucx_error_handling_mode": mode})
        self._peers: set[str] = set()

    def metadata(self) -> bytes:
        return bytes(self._nixl.get_agent_metadata())

    def register(self, descs: DescList) -> Any:
        return self._nixl.register_memory(self._nixl.get_reg_descs(_as_nixl(descs), descs.mem_type))

    def deregister(self, handle: Any) -> None:
        self._nixl.deregister_memory(handle)

    def add_peer(self, name: str, metadata: bytes) -> None:
        # Loading metadata for a known agent merges it (new registrations), keeping connections.
        got = self._nixl.add_remote_agent(metadata)
        got = got.decode() if isinstance(got, bytes) else got
        if got != name:
            raise PeerError(f"NIXL metadata names agent {got!r}, expected {name!r}")
        self._peers.add(name)

    def remove_peer(self, name: str) -> None:
        if name in self._peers:
            self._peers.discard(name)
            try:
                self._nixl.remove_remote_agent(name)
            except Exception:  # already gone on NIXL's side
                log.debug("removing NIXL peer %s failed", name, exc_info=True)

    def post(self, op: Op, local: DescList, remote: DescList, peer: str, notif: bytes) -> Any:
        if peer not in self._peers:
            raise PeerError(f"unknown peer {peer!r}")
        try:
            handle = self._nixl.initialize_xfer(
                op, self._nixl.get_xfer_descs(_as_nixl(local), local.mem_type),
                self._nixl.get_xfer_descs(_as_nixl(remote), remote.mem_type), peer, notif)
        except Exception as e:
            raise TransferError(f"NIXL refused the transfer: {e}") from e
        xfer = _NixlXfer(handle)
        try:
            state = self._nixl.transfer(handle)
        except Exception as e:  # e.g. NIXL_ERR_REMOTE_DISCONNECT: the peer died
            xfer.error = f"NIXL could not post the transfer: {type(e).__name__}: {e}"
            return xfer
        if state == "ERR":
            xfer.error = "NIXL failed to post the transfer"
        return xfer

    def state(self, handle: "_NixlXfer") -> tuple[XferState, str | None]:
        if handle.error is not None:
            return XferState.ERR, handle.error
        try:
            state = self._nixl.check_xfer_state(handle.nixl)
        except Exception as e:
            handle.error = f"NIXL transfer failed: {type(e).__name__}: {e}"
            return XferState.ERR, handle.error
        if state == "DONE":
            return XferState.DONE, None
        if state == "PROC":
            return XferState.PROC, None
        handle.error = "NIXL transfer failed (ERR)"
        return XferState.ERR, handle.error

    def release(self, handle: "_NixlXfer") -> None:
        try:
            self._nixl.release_xfer_handle(handle.nixl)
        except Exception:
            # NIXL keeps a handle it could not cancel; it frees leaked ones with the agent.
            log.debug("NIXL could not release a transfer handle", exc_info=True)

    def send_notif(self, peer: str, msg: bytes) -> None:
        if peer not in self._peers:
            raise PeerError(f"unknown peer {peer!r}")
        try:
            self._nixl.send_notif(peer, msg)
        except Exception as e:
            raise PeerError(f"NIXL could not notify {peer!r}: {e}") from e

    def take_notifs(self) -> dict[str, list[bytes]]:
        notifs = self._nixl.get_new_notifs()
        return {(k.decode() if isinstance(k, bytes) else k): list(v) for k, v in notifs.items()}

    def close(self) -> None:
        for name in list(self._peers):
            self.remove_peer(name)
        self._nixl = None  # NIXL tears the agent down when the object goes


class _NixlXfer:
    __slots__ = ("nixl", "error")

    def __init__(self, nixl_handle: Any) -> None:
        self.nixl = nixl_handle
        self.error: str | None = None


def _as_nixl(descs: DescList) -> np.ndarray:
    return descs.array.astype(np.uint64)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
