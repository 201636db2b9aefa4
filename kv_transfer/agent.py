"""`Agent`: NIXL's vocabulary over our backends, with every remote access checked.

A reader of NIXL feels at home: register memory, export metadata, add a remote agent, build
descriptor lists, initialize a READ or WRITE with a notification, post it, poll its state
(DONE/PROC/ERR), release it, collect notifications. On top of NIXL:

- every transfer is checked against the regions the target registered (the initiator checks
  before posting; two-sided targets check again before touching memory), and a target that
  deregisters memory pushes its new table to every peer and waits for each to apply it, so no
  peer can still reach the region once `deregister_memory` returns;
- leases: a target grants one over memory it hands off; a transfer made under a lease ends DONE
  only if the target confirms, after the data moved, that the lease was still held;
- `wait_xfer` awaits a transfer from asyncio without spinning a core.

Each agent runs a small control server (host, port) beside its data path; `fetch_remote_metadata`
takes that address, like NIXL's side channel.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kv_transfer.backends import Backend, Op, XferState, create_backend
from kv_transfer.control import Connection, ControlClient, ControlServer
from kv_transfer.descriptors import DescList, MemType
from kv_transfer.errors import AccessError, LeaseError, PeerError, TransferError
from kv_transfer.lease import DEFAULT_LEASE_S, Lease, LeaseEvent, LeaseStatus, LeaseTable, LeaseToken
from kv_transfer.messages import (AgentMetadata, ErrorReply, Hello, LeaseCheck, LeaseRenew, LeaseReply,
                                  RegionsAck, RegionsUpdate, Reply, Request)
from kv_transfer.metrics import TransferStats
from kv_transfer.regions import Region, RegionTable

log = logging.getLogger(__name__)

# How long a lease confirmation waits for a grant that is racing it on the target.
_CONFIRM_WAIT_S = 2.0
_CONFIRM_TIMEOUT_S = 10.0


@dataclass
class Registration:
    """What `register_memory` returns; pass it to `deregister_memory`."""

    regions: list[Region]
    backend_handle: Any
    descs: DescList


@dataclass
class XferHandle:
    """One transfer request. Reusable: `transfer` may post it again once it is DONE or ERR."""

    op: Op
    local: DescList
    remote: DescList
    remote_agent: str
    notif_msg: bytes
    lease: LeaseToken | None = None
    lease_expires_at: float | None = None
    release_lease: bool = False
    state: XferState = XferState.DONE
    error: TransferError | None = None
    posted: bool = False
    xfer_id: int = 0
    _backend_handle: Any = None
    _confirm: Future[Reply] | None = None
    _invalidated: str | None = None
    _started_at: float = 0.0
    _incarnation: str = ""
    # (local generation, remote incarnation, remote generation) of the tables this request was
    # last checked against.
    _checked: tuple[int, str, int] = (-1, "", -1)

    @property
    def nbytes(self) -> int:
        return self.local.total_bytes


@dataclass(frozen=True)
class FetchedMetadata:
    """A peer's metadata fetched off the owner thread; `add_fetched` finishes adding it."""

    metadata: AgentMetadata
    control: ControlClient


@dataclass
class _Remote:
    name: str
    incarnation: str
    regions: RegionTable
    control: ControlClient | None = None
    xfers: dict[int, XferHandle] = field(default_factory=dict)
    # Newer backend metadata pushed by the peer, applied by the owner thread (backends are not
    # thread-safe) the next time it uses this peer.
    pending_backend_md: bytes | None = None
    app_metadata: bytes = b""


class Agent:
    """A transfer agent. Not thread-safe for transfers (one owner thread posts and polls, as with
    NIXL); its control channel's threads only touch lease and region tables, which lock."""

    def __init__(self, name: str | None = None, backend: str = "auto", *, host: str = "127.0.0.1",
                 control_port: int = 0, lease_ttl_s: float = DEFAULT_LEASE_S,
                 push_timeout_s: float = 2.0) -> None:
        self.name = name or f"agent-{uuid.uuid4().hex[:12]}"
        self.incarnation = uuid.uuid4().hex
        self.host = host
        self.regions = RegionTable(self.name)
        self.leases = LeaseTable(lease_ttl_s)
        self.stats = TransferStats()
        self._push_timeout_s = push_timeout_s
        self._region_ids = itertools.count(1)
        self._xfer_ids = itertools.count(1)
        self._remotes: dict[str, _Remote] = {}
        # Region updates that arrived while their sender was being added (see _apply_push).
        self._early_updates: dict[str, RegionsUpdate] = {}
        self._lock = threading.Lock()  # guards _remotes and each remote's xfers
        self._backend: Backend = create_backend(backend, self.name, host)
        self._backend.start(self.regions.access)
        self._control = ControlServer(host, control_port, self._handle_control)
        self._fetcher: ThreadPoolExecutor | None = None
        # Published to peers with the metadata (set it before peers fetch).
        self.app_metadata = b""
        self._closed = False

    # -- identity and metadata --

    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def address(self) -> tuple[str, int]:
        """The control channel's (host, port): what peers pass to `fetch_remote_metadata`."""
        return self._control.host, self._control.port

    def get_agent_metadata(self) -> bytes:
        return msgspec.msgpack.encode(self._metadata())

    def _metadata(self) -> AgentMetadata:
        return AgentMetadata(name=self.name, incarnation=self.incarnation, backend=self._backend.name,
                             backend_metadata=self._backend.metadata(),
                             regions=[r.to_wire() for r in self.regions.regions()],
                             regions_generation=self.regions.generation,
                             control_host=self._control.host, control_port=self._control.port,
                             app_metadata=self.app_metadata)

    # -- memory --

    def register_memory(self, memory: Any, mem_type: MemType | None = None) -> Registration:
        """Register tensors, numpy arrays, (addr, len[, dev]) tuples or a DescList."""
        descs = DescList.from_memory(memory, mem_type)
        handle = self._backend.register(descs)
        regions = [Region(next(self._region_ids), d.addr, d.length, d.dev_id, descs.mem_type) for d in descs]
        for r in regions:
            self.regions.add(r)
        self._push_regions()
        return Registration(regions, handle, descs)

    def deregister_memory(self, registration: Registration) -> None:
        """Unregister. When this returns, every peer has applied the new table (or been cut off):
        no peer can reach the memory through this agent any more."""
        for r in registration.regions:
            self.regions.remove(r.region_id)  # waits for two-sided accesses being served
        self._push_regions()
        self._backend.deregister(registration.backend_handle)

    def get_reg_descs(self, memory: Any, mem_type: MemType | None = None) -> DescList:
        return DescList.from_memory(memory, mem_type)

    def get_xfer_descs(self, memory: Any, mem_type: MemType | None = None) -> DescList:
        return DescList.from_memory(memory, mem_type)

    def _push_regions(self) -> None:
        update = RegionsUpdate(name=self.name, incarnation=self.incarnation,
                               regions=[r.to_wire() for r in self.regions.regions()],
                               regions_generation=self.regions.generation,
                               backend_metadata=self._backend.metadata())
        dropped = self._control.push(update, self._push_timeout_s)
        if dropped:
            log.warning("agent %s cut off peers that did not apply its region update: %s", self.name, dropped)

    # -- remote agents --

    def add_remote_agent(self, metadata: bytes) -> str:
        """Load a peer's metadata (from `get_agent_metadata`); returns its name.

        Connects to the peer's control channel to subscribe to its region changes. Metadata from
        a new incarnation of a known name replaces the old one; the old one's transfers fail.
        """
        md = msgspec.msgpack.decode(metadata, type=AgentMetadata)
        return self._add_remote(md, None)

    def fetch_remote_metadata(self, host: str, port: int, timeout_s: float = 5.0) -> str:
        """Fetch a peer's metadata from its control address and add it; returns its name."""
        return self.add_fetched(self._fetch(host, port, timeout_s))

    def start_fetch(self, host: str, port: int, timeout_s: float = 5.0) -> Future[FetchedMetadata]:
        """`fetch_remote_metadata` in two halves, for an owner thread that must not block on the
        network: the fetch runs on a helper thread; pass its result to `add_fetched` here."""
        if self._fetcher is None:
            self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-fetch")
        return self._fetcher.submit(self._fetch, host, port, timeout_s)

    def add_fetched(self, fetched: FetchedMetadata) -> str:
        return self._add_remote(fetched.metadata, fetched.control)

    def remote_app_metadata(self, name: str) -> bytes:
        return self._remote(name).app_metadata

    def _fetch(self, host: str, port: int, timeout_s: float) -> FetchedMetadata:
        client = ControlClient(host, port, self._apply_push, timeout_s=timeout_s, on_lost=self._peer_lost)
        try:
            return FetchedMetadata(client.call(Hello(requester=self.name), timeout_s, AgentMetadata), client)
        except Exception:
            client.close()
            raise

    def _add_remote(self, md: AgentMetadata, client: ControlClient | None) -> str:
        if md.backend != self._backend.name:
            if client is not None:
                client.close()
            raise PeerError(f"agent {md.name!r} uses backend {md.backend!r}, this agent {self._backend.name!r}")
        with self._lock:
            old = self._remotes.get(md.name)
        if old is not None and old.incarnation == md.incarnation and (old.control is None or old.control.alive):
            # Already known and reachable: keep its connections (and in-flight transfers).
            old.regions.replace([Region.from_wire(r) for r in md.regions], md.regions_generation)
            if old.control is None and client is not None:
                old.control = client
            elif client is not None:
                client.close()
            return md.name
        if old is not None:
            self.remove_remote_agent(md.name)
        if client is None and md.control_port:
            # Metadata passed by hand: still subscribe to the peer's region changes.
            client = ControlClient(md.control_host, md.control_port, self._apply_push, on_lost=self._peer_lost)
            try:
                md = client.call(Hello(requester=self.name), expect=AgentMetadata)
            except Exception:
                client.close()
                raise
        table = RegionTable(md.name)
        table.replace([Region.from_wire(r) for r in md.regions], md.regions_generation)
        self._backend.add_peer(md.name, md.backend_metadata)
        with self._lock:
            self._remotes[md.name] = _Remote(md.name, md.incarnation, table, client, app_metadata=md.app_metadata)
            early = self._early_updates.pop(md.name, None)
        if early is not None and early.incarnation == md.incarnation:
            table.replace([Region.from_wire(r) for r in early.regions], early.regions_generation)
            if early.backend_metadata:
                self._backend.add_peer(md.name, early.backend_metadata)
        return md.name

    def remove_remote_agent(self, name: str) -> None:
        with self._lock:
            remote = self._remotes.pop(name, None)
        if remote is None:
            return
        for h in list(remote.xfers.values()):
            h._invalidated = f"remote agent {name!r} was removed"
        if remote.control is not None:
            remote.control.close()
        self._backend.remove_peer(name)

    def remote_agents(self) -> list[str]:
        with self._lock:
            return list(self._remotes)

    def remote_incarnation(self, name: str) -> str | None:
        with self._lock:
            remote = self._remotes.get(name)
        return None if remote is None else remote.incarnation

    def _remote(self, name: str) -> _Remote:
        with self._lock:
            remote = self._remotes.get(name)
        if remote is None:
            raise PeerError(f"unknown remote agent {name!r}; add_remote_agent or fetch_remote_metadata first")
        if remote.control is not None and not remote.control.alive:
            raise PeerError(f"lost the control channel to agent {name!r}: it died, restarted or cut us off")
        if remote.pending_backend_md is not None:
            md, remote.pending_backend_md = remote.pending_backend_md, None
            self._backend.add_peer(name, md)
        return remote

    def _peer_lost(self, client: ControlClient) -> None:
        """The control channel dropped: the peer died, restarted or cut us off. Its in-flight
        transfers fail (a one-sided transfer to a dead process may otherwise never finish)."""
        with self._lock:
            lost = [r for r in self._remotes.values() if r.control is client]
            inflight = [h for r in lost for h in r.xfers.values()]
        for h in inflight:
            h._invalidated = f"lost agent {h.remote_agent!r} during the transfer"

    def _apply_push(self, update: RegionsUpdate) -> RegionsAck:
        with self._lock:
            remote = self._remotes.get(update.name)
            if remote is None:
                # The sender subscribed us during our hello and changed its table before we
                # finished adding it: keep the newest update for _add_remote to apply.
                self._early_updates[update.name] = update
        if remote is not None and remote.incarnation == update.incarnation:
            gone = remote.regions.replace([Region.from_wire(r) for r in update.regions], update.regions_generation)
            if update.backend_metadata:
                remote.pending_backend_md = update.backend_metadata
            if gone:
                with self._lock:
                    inflight = list(remote.xfers.values())
                for h in inflight:
                    if remote.regions.overlaps(h.remote, gone):
                        h._invalidated = f"agent {update.name!r} deregistered memory this transfer used"
        return RegionsAck(regions_generation=update.regions_generation)

    # -- transfers --

    def initialize_xfer(self, operation: Op, local_descs: DescList, remote_descs: DescList,
                        remote_agent: str, notif_msg: bytes = b"", *,
                        lease: Lease | LeaseToken | None = None, lease_expires_at: float | None = None,
                        release_lease: bool = False) -> XferHandle:
        """Build a transfer request; raises AccessError/PeerError if it could never be valid.

        Under `lease`, the transfer ends DONE only once the target confirms the lease was still
        held after the data moved; `release_lease` makes that confirmation the acknowledgement
        that ends the lease.
        """
        if operation not in ("READ", "WRITE"):
            raise ValueError(f"operation must be READ or WRITE, not {operation!r}")
        if len(local_descs) != len(remote_descs):
            raise ValueError(f"{len(local_descs)} local descriptors but {len(remote_descs)} remote")
        if not local_descs.same_lengths(remote_descs):
            raise ValueError("local and remote descriptor lengths differ")
        remote = self._remote(remote_agent)
        checked = (self.regions.generation, remote.incarnation, remote.regions.generation)
        self.regions.check(local_descs, "local")
        remote.regions.check(remote_descs, "remote")
        token = lease.token if isinstance(lease, Lease) else lease
        if isinstance(lease, Lease) and lease_expires_at is None:
            lease_expires_at = lease.expires_at
        return XferHandle(operation, local_descs, remote_descs, remote_agent, bytes(notif_msg), token,
                          lease_expires_at, release_lease, xfer_id=next(self._xfer_ids), _checked=checked)

    def transfer(self, handle: XferHandle, notif_msg: bytes | None = None) -> XferState:
        """Post (or re-post) a transfer. Returns its state; refusals come back as ERR."""
        if handle.posted and handle.state is XferState.PROC:
            raise TransferError("transfer is still in flight; wait for it before posting again")
        if notif_msg is not None:
            handle.notif_msg = bytes(notif_msg)
        handle.posted, handle.error, handle._confirm, handle._invalidated = True, None, None, None
        handle._started_at = time.perf_counter()
        try:
            remote = self._remote(handle.remote_agent)
            if handle.lease_expires_at is not None and time.time() >= handle.lease_expires_at:
                raise LeaseError(f"lease {handle.lease.lease_id if handle.lease else ''} expired before the "
                                 "transfer was posted; nothing was transferred")
            # Check again only if a table changed since the request was last checked.
            checked = (self.regions.generation, remote.incarnation, remote.regions.generation)
            if checked != handle._checked:
                self.regions.check(handle.local, "local")
                remote.regions.check(handle.remote, "remote")
                handle._checked = checked
            handle._incarnation = remote.incarnation
            # Tracked before posting, so a region update racing the post still invalidates it.
            with self._lock:
                remote.xfers[handle.xfer_id] = handle
            handle._backend_handle = self._backend.post(handle.op, handle.local, handle.remote,
                                                        handle.remote_agent, handle.notif_msg)
        except TransferError as e:
            return self._fail(handle, e)
        handle.state = XferState.PROC
        return self.check_xfer_state(handle)

    def check_xfer_state(self, handle: XferHandle) -> XferState:
        """Poll without blocking: DONE, PROC or ERR (the reason is in `handle.error`)."""
        if handle.state is not XferState.PROC:
            return handle.state
        if handle._invalidated is not None:
            return self._fail(handle, AccessError(handle._invalidated))
        if handle._confirm is None:
            state, reason = self._backend.state(handle._backend_handle)
            if state is XferState.PROC:
                return state
            if state is XferState.ERR:
                return self._fail(handle, PeerError(reason or "transfer failed"))
            if handle.lease is None:
                return self._done(handle)
            remote = self._remotes.get(handle.remote_agent)
            if remote is None or remote.control is None or remote.incarnation != handle._incarnation:
                return self._fail(handle, LeaseError("cannot confirm the lease: no control channel to its owner"))
            check = LeaseCheck(lease_id=handle.lease.lease_id, generation=handle.lease.generation,
                               release=handle.release_lease, wait_s=_CONFIRM_WAIT_S)
            handle._confirm = remote.control.call_async(check)
            return XferState.PROC
        if not handle._confirm.done():
            if time.perf_counter() - handle._started_at > _CONFIRM_TIMEOUT_S + _CONFIRM_WAIT_S:
                return self._fail(handle, LeaseError("the lease owner did not confirm in time"))
            return XferState.PROC
        try:
            reply = handle._confirm.result()
        except Exception as e:
            return self._fail(handle, LeaseError(f"lease confirmation failed: {e}"))
        if not isinstance(reply, LeaseReply):
            error = reply.error if isinstance(reply, ErrorReply) else f"unexpected {type(reply).__name__}"
            return self._fail(handle, LeaseError(error))
        status = reply.status
        if status in (LeaseStatus.HELD, LeaseStatus.RELEASED):
            return self._done(handle)
        return self._fail(handle, LeaseError(
            f"lease {handle.lease.lease_id} was {status.value} when the transfer completed; "
            "the data may be stale and must not be used"))

    def get_xfer_error(self, handle: XferHandle) -> TransferError | None:
        return handle.error

    def release_xfer_handle(self, handle: XferHandle) -> None:
        """Free the request; a transfer still in flight is cancelled and ends ERR."""
        if handle._backend_handle is not None:
            self._backend.release(handle._backend_handle)
            handle._backend_handle = None
        if handle.state is XferState.PROC:
            self._fail(handle, TransferError("released while in flight"))
        self._forget(handle)

    async def wait_xfer(self, handle: XferHandle, timeout_s: float | None = None) -> None:
        """Await DONE; raises the transfer's TransferError on ERR, TimeoutError on timeout.

        Polls with exponential back-off (yield, then 20 us doubling to 2 ms) so a waiting coroutine
        costs little CPU while short transfers still finish with microsecond-scale latency.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = 0.0
        while True:
            state = self.check_xfer_state(handle)
            if state is XferState.DONE:
                return
            if state is XferState.ERR:
                assert handle.error is not None
                raise handle.error
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"transfer to {handle.remote_agent!r} did not finish in {timeout_s} s")
            await asyncio.sleep(delay)
            delay = min(max(delay * 2, 2e-5), 2e-3)

    def wait_xfer_sync(self, handle: XferHandle, timeout_s: float | None = None) -> None:
        """`wait_xfer` for synchronous callers (same back-off, with time.sleep)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay, spins = 0.0, 0
        while True:
            state = self.check_xfer_state(handle)
            if state is XferState.DONE:
                return
            if state is XferState.ERR:
                assert handle.error is not None
                raise handle.error
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"transfer to {handle.remote_agent!r} did not finish in {timeout_s} s")
            # A few tight polls first: small RMA transfers finish within microseconds.
            spins += 1
            if spins > 64:
                time.sleep(delay)
                delay = min(max(delay * 2, 2e-5), 2e-3)

    def _done(self, handle: XferHandle) -> XferState:
        handle.state = XferState.DONE
        self.stats.record_transfer(self._backend.name, handle.op, handle.nbytes,
                                   time.perf_counter() - handle._started_at)
        self._forget(handle)
        return handle.state

    def _fail(self, handle: XferHandle, error: TransferError) -> XferState:
        handle.state, handle.error = XferState.ERR, error
        reason = {AccessError: "access", LeaseError: "lease", PeerError: "peer"}.get(type(error), "other")
        self.stats.record_failure(self._backend.name, reason)
        self._forget(handle)
        return handle.state

    def _forget(self, handle: XferHandle) -> None:
        with self._lock:
            remote = self._remotes.get(handle.remote_agent)
            if remote is not None:
                remote.xfers.pop(handle.xfer_id, None)

    # -- notifications --

    def send_notif(self, remote_agent: str, notif_msg: bytes) -> None:
        self._remote(remote_agent)
        self._backend.send_notif(remote_agent, bytes(notif_msg))

    def get_new_notifs(self) -> dict[str, list[bytes]]:
        """Notifications received since the last call, by sender agent name."""
        return self._backend.take_notifs()

    # -- leases, owner side --

    def grant_lease(self, ttl_s: float | None = None, key: str = "") -> Lease:
        return self.leases.grant(ttl_s, key)

    def hold_lease(self, token: LeaseToken, expires_at: float, key: str = "") -> Lease:
        """Hold under a token chosen elsewhere (the vLLM scheduler names leases; the worker holds)."""
        return self.leases.hold(token, key=key, expires_at=expires_at,
                                ttl_s=max(0.0, expires_at - time.time()))

    def renew_lease(self, token: LeaseToken, ttl_s: float | None = None) -> Lease:
        status, lease = self.leases.renew(token, ttl_s)
        if lease is None:
            raise LeaseError(f"lease {token.lease_id} cannot be renewed: {status.value}")
        return lease

    def take_lease_events(self) -> list[LeaseEvent]:
        """Leases that ended (acknowledged or expired) since the last call: their memory may be reused."""
        events = self.leases.take_events()
        self.stats.record_lease_expiries(sum(e.status is LeaseStatus.EXPIRED for e in events))
        return events

    # -- leases, peer side --

    def confirm_lease(self, remote_agent: str, token: LeaseToken, release: bool = False,
                      timeout_s: float = 5.0) -> LeaseStatus:
        """Ask the owner whether a lease is held; with `release`, acknowledge it (ending it)."""
        remote = self._remote(remote_agent)
        if remote.control is None:
            raise PeerError(f"agent {remote_agent!r} has no control channel")
        check = LeaseCheck(lease_id=token.lease_id, generation=token.generation, release=release)
        return remote.control.call(check, timeout_s, LeaseReply).status

    def renew_remote_lease(self, remote_agent: str, token: LeaseToken, ttl_s: float | None = None,
                           timeout_s: float = 5.0) -> float:
        """Ask the owner to extend a lease; returns the new expiry (wall clock)."""
        remote = self._remote(remote_agent)
        if remote.control is None:
            raise PeerError(f"agent {remote_agent!r} has no control channel")
        renew = LeaseRenew(lease_id=token.lease_id, generation=token.generation, ttl_s=ttl_s)
        reply = remote.control.call(renew, timeout_s, LeaseReply)
        if reply.status is not LeaseStatus.HELD or reply.expires_at is None:
            raise LeaseError(f"lease {token.lease_id} cannot be renewed: {reply.status.value}")
        return reply.expires_at

    # -- control channel, server side (its threads) --

    def _handle_control(self, conn: Connection, request: Request) -> Reply:
        if isinstance(request, Hello):
            conn.peer_name = request.requester
            if request.subscribe:
                self._control.subscribe(conn)
            return self._metadata()
        token = LeaseToken(request.lease_id, request.generation)
        if isinstance(request, LeaseCheck):
            return LeaseReply(status=self.leases.check(token, request.release, wait_s=min(request.wait_s, 10.0)))
        status, lease = self.leases.renew(token, request.ttl_s)
        return LeaseReply(status=status, expires_at=lease.expires_at if lease else None)

    # -- lifecycle --

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            remotes = list(self._remotes.values())
            self._remotes.clear()
        for remote in remotes:
            if remote.control is not None:
                remote.control.close()
        self._control.close()
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=False, cancel_futures=True)
        self._backend.close()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
