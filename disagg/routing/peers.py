"""Active-active picker replicas: what one replica cannot see, its peers' picks, shared over ZMQ.

Every replica follows every worker's KV events and load, so the prefix index and the loads agree
between replicas without syncing them. What a replica cannot see is the picks its peers made
since the last load signal: each replica publishes its picks (`PickNotice`: the endpoints booked,
the prompt's blocks for approximate prefix entries) on a PUB socket it binds, and applies its
peers' as it applies its own (a pending request on each endpoint, until the endpoint's next load
signal counts it; the blocks as approximate entries).

Best effort, bounded, and measured: a notice that cannot be sent at once is dropped (the next
load signal repairs the loads), and the lag, the loss and the agreement are exported:
- `disagg_epp_peer_lag_seconds{peer}`: how long ago (by the wall clocks) the newest notice or
  heartbeat received from a peer was sent;
- `disagg_epp_peer_notices_lost_total{peer}`: gaps in a peer's sequence;
- `disagg_epp_pick_agreement_ratio`: one pick in `sample_every` carries its prompt's token ids,
  and the receiver asks its own scheduler what it would pick for them (`would_pick`, no booking):
  the share of sampled picks whose decode both replicas chose.
Peers are found by a `PeerDiscovery` (a fixed list, a file the gateway rewrites, or the EPP's
pods in Kubernetes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import AsyncIterator, Protocol

import msgspec
import zmq
from prometheus_client import Counter, Gauge

from disagg.routing.scheduler import Booked, PickRequest, Scheduler

log = logging.getLogger(__name__)

PEER_LAG = Gauge("disagg_epp_peer_lag_seconds", "Seconds since the newest pick notice or heartbeat from a peer replica.",
                 ["peer"])
PEER_LOST = Counter("disagg_epp_peer_notices_lost", "Pick notices from a peer replica never received.", ["peer"])
AGREEMENT = Gauge("disagg_epp_pick_agreement_ratio",
                  "Share of a peer's sampled picks for which this replica would have chosen the same decode.")
SAMPLED = Counter("disagg_epp_pick_agreement_samples", "Peers' picks compared with this replica's own choice.",
                  ["agreed"])


class SharedPick(msgspec.Struct, array_like=True):
    engine_ids: list[str]  # booked: decode, then prefill when disaggregating
    booked_at: float  # the sender's wall clock
    hashes: list[int]  # the prompt's blocks
    model: str = ""
    prompt_token_ids: list[int] | None = None  # a sampled pick, for the agreement check


class PickNotice(msgspec.Struct, array_like=True):
    """One replica's picks since its previous notice (an empty list: a heartbeat)."""

    replica: str
    seq: int
    sent_at: float  # the sender's wall clock
    picks: list[SharedPick]

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(PickNotice).decode


class PeerDiscovery(Protocol):
    """Yields the peers' notice endpoints (`tcp://host:port`), the whole list each time it changes."""

    def watch(self) -> AsyncIterator[list[str]]: ...


class StaticPeers:
    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = endpoints

    async def watch(self) -> AsyncIterator[list[str]]:
        yield list(self.endpoints)
        await asyncio.Event().wait()


class PeersFile:
    """A file listing one endpoint per line, re-read when it changes (how `disagg serve
    --gateway --epp-replicas N` tells each replica where the others are)."""

    def __init__(self, path: Path, interval_s: float = 0.2) -> None:
        self.path = path
        self.interval_s = interval_s

    async def watch(self) -> AsyncIterator[list[str]]:
        last: list[str] | None = None
        while True:
            try:
                current = [line.strip() for line in self.path.read_text().splitlines() if line.strip()]
            except OSError:
                current = []
            if current != last:
                last = current
                yield current
            await asyncio.sleep(self.interval_s)


class PeerSync:
    """One replica's side. `endpoint` is where it publishes (bound on `host`, port `port`, 0: a
    free one); `run(peers)` follows the peers until cancelled."""

    def __init__(self, scheduler: Scheduler, replica: str, *, host: str = "127.0.0.1", port: int = 0,
                 sample_every: int = 8, heartbeat_s: float = 0.5) -> None:
        self.scheduler = scheduler
        self.replica = replica
        self.sample_every = sample_every
        self.heartbeat_s = heartbeat_s
        ctx = zmq.Context.instance()
        self._pub = ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 10_000)
        port = self._pub.bind_to_random_port(f"tcp://{host}") if port == 0 else self._bind(host, port)
        self.endpoint = f"tcp://{host}:{port}"
        self._sub = ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._peers: set[str] = set()
        self._seq = 0
        self._picks = 0
        self._outbox: list[SharedPick] = []
        self._newest: dict[str, float] = {}  # peer replica -> when its newest notice was sent
        self._next_seq: dict[str, int] = {}
        self._agreed = self._sampled = 0
        AGREEMENT.set_function(lambda: self.agreement if self.agreement is not None else float("nan"))
        scheduler.on_booked(self._share)
        scheduler.before_pick(self.drain)

    def _bind(self, host: str, port: int) -> int:
        self._pub.bind(f"tcp://{host}:{port}")
        return port

    # -- sending ----------------------------------------------------------------------------

    def _share(self, booked: list[Booked]) -> None:
        for pick in booked:
            self._picks += 1
            sampled = self._picks % self.sample_every == 0
            self._outbox.append(SharedPick(pick.engine_ids, pick.at[0], pick.hashes, pick.request.model,
                                           pick.request.prompt_token_ids if sampled else None))
        self.send()

    def send(self) -> None:
        """Publish what the replica booked since the last notice (or a heartbeat)."""
        notice = PickNotice(self.replica, self._seq, time.time(), self._outbox)
        try:
            self._pub.send(_encode(notice), zmq.NOBLOCK)
        except zmq.Again:
            pass  # dropped: the peers count the gap, the next load signals repair the loads
        self._seq += 1
        self._outbox = []

    # -- receiving --------------------------------------------------------------------------

    def apply(self, payload: bytes) -> None:
        try:
            notice = _decode(payload)
        except msgspec.DecodeError as exc:
            log.warning("undecodable pick notice: %s", exc)
            return
        if notice.replica == self.replica:
            return
        expected = self._next_seq.get(notice.replica)
        if expected is not None and notice.seq > expected:
            PEER_LOST.labels(notice.replica).inc(notice.seq - expected)
        self._next_seq[notice.replica] = notice.seq + 1
        self._newest[notice.replica] = notice.sent_at
        PEER_LAG.labels(notice.replica).set(max(0.0, time.time() - notice.sent_at))
        pool, index = self.scheduler.pool, self.scheduler.index
        for pick in notice.picks:
            if pick.prompt_token_ids is not None and pick.engine_ids:
                self._compare(pick)
            present = [e for e in map(pool.get, pick.engine_ids) if e is not None]
            for endpoint in present:
                endpoint.book(pick.booked_at)
            if present and pick.hashes and self.scheduler.config.approximate_prefix:
                index.record_pick([e.engine_id for e in present], pick.hashes)

    def drain(self) -> None:
        """Apply every notice that has arrived."""
        if self._sub.closed:
            return
        while self._sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.apply(self._sub.recv(zmq.NOBLOCK))

    def _compare(self, pick: SharedPick) -> None:
        mine = self.scheduler.would_pick(PickRequest(model=pick.model, prompt_token_ids=pick.prompt_token_ids or []))
        agreed = mine is not None and mine.decode[0].engine_id == pick.engine_ids[0]
        self._sampled += 1
        self._agreed += agreed
        SAMPLED.labels(str(agreed).lower()).inc()

    @property
    def agreement(self) -> float | None:
        return self._agreed / self._sampled if self._sampled else None

    def lag(self) -> dict[str, float]:
        """Per peer, how long ago its newest notice received was sent."""
        now = time.time()
        return {peer: max(0.0, now - sent) for peer, sent in self._newest.items()}

    # -- running ----------------------------------------------------------------------------

    async def run(self, peers: PeerDiscovery) -> None:
        """Follow `peers`, apply their notices and heartbeat, until cancelled."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        fd = self._sub.getsockopt(zmq.FD)
        loop.add_reader(fd, ready.set)
        tasks = [asyncio.create_task(self._follow(peers)), asyncio.create_task(self._heartbeat())]
        try:
            while True:
                ready.clear()
                self.drain()
                await ready.wait()
        finally:
            loop.remove_reader(fd)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._sub.close(linger=0)
            self._pub.close(linger=0)

    async def _follow(self, peers: PeerDiscovery) -> None:
        async for endpoints in peers.watch():
            wanted = {e for e in endpoints if e != self.endpoint}
            for endpoint in wanted - self._peers:
                self._sub.connect(endpoint)
            for endpoint in self._peers - wanted:
                self._sub.disconnect(endpoint)
            self._peers = wanted
            log.info("picker peers: %s", sorted(wanted))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self.send()
            for peer, lag in self.lag().items():
                PEER_LAG.labels(peer).set(lag)
