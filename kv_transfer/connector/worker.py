"""The connector's worker half (runs where the KV cache tensors live, on the engine's thread).

It owns this engine's `Agent`: registers the KV cache, publishes where its blocks are, and
serves peers' lease confirmations on the agent's control channel.

Prefill side: holds handed-off blocks under leases; a lease that ends (the decode acknowledged
after reading, or it expired) is reported in `finished_sending`, so vLLM frees the blocks.
Decode side: each `Load` fetches the prefill's metadata (once per prefill, off-thread), then
READs the blocks under the prefill's lease, releasing the lease when the read is confirmed. A
load that fails for any reason is still reported in `finished_recving`, with its blocks in
`get_block_ids_with_load_errors()`, so vLLM recomputes them instead of using them.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kv_transfer.agent import Agent, FetchedMetadata, XferHandle
from kv_transfer.backends import XferState
from kv_transfer.blocks import BlockMap, block_transfer_descs
from kv_transfer.connector.messages import DisaggConnectorMetadata, DisaggHandshake, KVMap, Load
from kv_transfer.connector.params import ConnectorSettings
from kv_transfer.errors import LayoutMismatch, PeerError, TransferError
from kv_transfer.lease import LeaseToken

log = logging.getLogger(__name__)

# Give up on a load that has not finished in this long (the prefill's lease bounds it too).
_LOAD_TIMEOUT_S = 60.0
# Fault injection for tests: with this set to 1, a load waits `fault_delay_read_s` (from its
# kv_transfer_params) between the handshake and the READ.
_FAULT_INJECTION_ENV = "DISAGG_KV_FAULT_INJECTION"


@dataclass
class _Peer:
    """A prefill engine we read from, by control address."""

    fetch: Future[FetchedMetadata] | None
    name: str | None = None
    kv_map: KVMap | None = None
    block_map: BlockMap | None = None


@dataclass
class _PendingLoad:
    load: Load
    started: float = field(default_factory=time.monotonic)
    xfer: XferHandle | None = None
    ready_at: float = 0.0
    retried_fetch: bool = False
    # The failure came from a transfer, which the agent already counted in its metrics.
    transfer_failed: bool = False


class WorkerSide:
    def __init__(self, engine_id: str, settings: ConnectorSettings, layout: str, num_blocks: int,
                 agent_name: str) -> None:
        self.engine_id = engine_id
        self.settings = settings
        self.layout = layout
        self.num_blocks = num_blocks
        self.agent_name = agent_name
        self.agent: Agent | None = None
        self.block_map: BlockMap | None = None
        self._peers: dict[tuple[str, int], _Peer] = {}
        self._loads: dict[str, _PendingLoad] = {}
        self._recved: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._lease_requests: dict[str, str] = {}  # lease id -> request id
        self._sent: set[str] = set()            # leases ended, request not yet seen finished
        self._finished_seen: set[str] = set()   # vLLM said these finished; sends must be among them
        self._fault_injection = os.environ.get(_FAULT_INJECTION_ENV) == "1"

    # -- start-up --

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        tensors, seen = [], set()
        for t in kv_caches.values():
            if t.data_ptr() not in seen:  # layers may share one cache tensor
                seen.add(t.data_ptr())
                tensors.append(t)
        self.block_map = BlockMap.from_tensors(tensors, self.num_blocks)
        self.agent = Agent(self.agent_name, self.settings.backend, host=self.settings.host,
                           control_port=self.settings.port, lease_ttl_s=self.settings.lease_s)
        self.agent.register_memory([(int(t.data_ptr()), t.numel() * t.element_size()) for t in tensors],
                                   "DRAM" if tensors[0].device.type == "cpu" else "VRAM")
        kv_map = KVMap(engine_id=self.engine_id, layout=self.layout, block_map=self.block_map.to_wire())
        self.agent.app_metadata = msgspec.msgpack.encode(kv_map.model_dump())
        log.info("KV connector agent %s (%s) on %s:%d: %d layers x %d blocks of %d B", self.agent.name,
                 self.agent.backend_name, *self.agent.address, len(tensors), self.num_blocks,
                 self.block_map.block_bytes)

    def handshake(self) -> DisaggHandshake | None:
        if self.agent is None:
            return None
        host, port = self.agent.address
        return DisaggHandshake(host=host, port=port, agent_name=self.agent.name)

    # -- each step --

    def start_load_kv(self, meta: DisaggConnectorMetadata) -> None:
        assert self.agent is not None
        for hold in meta.holds:
            try:
                self.agent.hold_lease(LeaseToken(hold.lease_id, hold.lease_generation), hold.expires_at,
                                      key=hold.request_id)
            except ValueError:
                # A newer generation of this lease is held: the blocks were handed out again.
                log.warning("stale lease %s for %s ignored", hold.lease_id, hold.request_id)
                self._sent.add(hold.request_id)
                continue
            self._lease_requests[hold.lease_id] = hold.request_id
        for load in meta.loads:
            self._loads[load.request_id] = _PendingLoad(load)
        self._advance_loads()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.agent is None:
            return None, None
        self._finished_seen |= finished_req_ids
        self._advance_loads()
        for event in self.agent.take_lease_events():
            request_id = self._lease_requests.pop(event.lease.lease_id, None)
            if request_id is not None:
                self._sent.add(request_id)
        sending = self._sent & self._finished_seen
        self._sent -= sending
        self._finished_seen -= sending
        recving, self._recved = self._recved, set()
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def take_stats(self) -> dict[str, Any] | None:
        if self.agent is None:
            return None
        from kv_transfer.metrics import TransferStats
        snap = self.agent.stats.take()
        return None if TransferStats.is_empty(snap) else snap

    def shutdown(self) -> None:
        if self.agent is not None:
            for pending in self._loads.values():
                if pending.xfer is not None:
                    self.agent.release_xfer_handle(pending.xfer)
            self.agent.close()
            self.agent = None

    # -- decode: the load state machine --

    def _advance_loads(self) -> None:
        for request_id, pending in list(self._loads.items()):
            try:
                done = self._advance(pending)
            except TransferError as e:
                self._finish(request_id, pending, e)
                continue
            except Exception as e:  # a bug here must cost a recompute, not the engine
                log.exception("KV load for %s failed unexpectedly", request_id)
                self._finish(request_id, pending, TransferError(f"{type(e).__name__}: {e}"))
                continue
            if done:
                self._finish(request_id, pending, None)

    def _advance(self, pending: _PendingLoad) -> bool:
        """One non-blocking step; True once the load succeeded, raises TransferError on failure."""
        assert self.agent is not None
        load = pending.load
        if time.monotonic() - pending.started > _LOAD_TIMEOUT_S:
            raise TransferError(f"load did not finish in {_LOAD_TIMEOUT_S} s")
        if pending.xfer is not None:
            state = self.agent.check_xfer_state(pending.xfer)
            if state is XferState.PROC:
                return False
            error = pending.xfer.error
            self.agent.release_xfer_handle(pending.xfer)
            pending.xfer = None
            if state is XferState.ERR:
                pending.transfer_failed = True
                raise error or TransferError("transfer failed")
            return True
        peer = self._peer(load)
        if peer is None:
            return False  # handshake in flight
        if not pending.ready_at:
            delay = load.remote.fault_delay_read_s if self._fault_injection else 0.0
            pending.ready_at = time.monotonic() + delay
        if time.monotonic() < pending.ready_at:
            return False
        if not load.local_block_ids or len(load.local_block_ids) != len(load.remote_block_ids):
            raise TransferError(f"{len(load.local_block_ids)} local blocks for {len(load.remote_block_ids)} remote")
        assert self.block_map is not None and peer.block_map is not None and peer.name is not None
        local, remote = block_transfer_descs(self.block_map, load.local_block_ids, peer.block_map,
                                             load.remote_block_ids)
        remote_params = load.remote
        try:
            xfer = self.agent.initialize_xfer("READ", local, remote, peer.name, lease=remote_params.lease,
                                              lease_expires_at=remote_params.lease_expires_at, release_lease=True)
        except PeerError:
            # The cached agent died or restarted: fetch again once, then give up.
            self._peers.pop((remote_params.remote_host, remote_params.remote_port), None)
            if pending.retried_fetch:
                raise
            pending.retried_fetch = True
            return False
        pending.xfer = xfer
        self.agent.transfer(xfer)
        return self._advance(pending)

    def _peer(self, load: Load) -> _Peer | None:
        assert self.agent is not None
        remote = load.remote
        key = (remote.remote_host, remote.remote_port)
        peer = self._peers.get(key)
        if peer is None:
            peer = self._peers[key] = _Peer(self.agent.start_fetch(*key))
        if peer.fetch is not None:
            if not peer.fetch.done():
                return None
            fetch, peer.fetch = peer.fetch, None
            try:
                peer.name = self.agent.add_fetched(fetch.result())
                kv_map = KVMap.model_validate(msgspec.msgpack.decode(self.agent.remote_app_metadata(peer.name)))
            except Exception as e:
                del self._peers[key]
                raise PeerError(f"handshake with prefill at {key[0]}:{key[1]} failed: {e}") from e
            peer.kv_map, peer.block_map = kv_map, BlockMap.from_wire(kv_map.block_map)
        assert peer.kv_map is not None
        if peer.kv_map.engine_id != remote.remote_engine_id:
            # A different (restarted) engine answers at that address: its blocks are not ours.
            del self._peers[key]
            raise PeerError(f"{key[0]}:{key[1]} is engine {peer.kv_map.engine_id}, not {remote.remote_engine_id}")
        if peer.kv_map.layout != self.layout:
            raise LayoutMismatch(f"prefill layout {peer.kv_map.layout} differs from ours {self.layout}")
        return peer

    def _finish(self, request_id: str, pending: _PendingLoad, error: TransferError | None) -> None:
        del self._loads[request_id]
        self._recved.add(request_id)
        if error is None:
            return
        if pending.xfer is not None and self.agent is not None:
            self.agent.release_xfer_handle(pending.xfer)
        self._failed_blocks.update(pending.load.local_block_ids)
        if self.agent is not None and not pending.transfer_failed:
            reason = {PeerError: "peer", LayoutMismatch: "layout"}.get(type(error), "other")
            self.agent.stats.record_failure(self.agent.backend_name, reason)
        log.warning("KV load for %s failed; vLLM will recompute %d blocks: %s", request_id,
                    len(pending.load.local_block_ids), error)
