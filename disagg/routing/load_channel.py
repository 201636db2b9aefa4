"""Load pushed by workers, not scraped: `LoadReport`s over ZMQ PUB/SUB.

A worker publishes on a PUB socket it binds itself (`WorkerInfo.load_endpoint`) when its load
changes, at most every 50 ms, and every second as a heartbeat (`LoadPublisher`). A scheduler
follows every worker through one SUB socket connected to all their endpoints
(`LoadSubscriber`): one socket and one task whatever the number of workers, and a report costs
a decode and a pool update (measured in `disagg bench epp`'s `idle`). Each report is a proof of
life: a worker that stops publishing goes silent and dies as a scraped one would.

Wire: one frame, the msgpack `LoadReport` (it names its engine, so several engines may share a
channel). Lost reports are counted (per-engine sequence numbers) and need no repair: the next
report or heartbeat supersedes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Callable

import msgspec
import zmq

from disagg.messages import LoadReport
from disagg.routing import metrics
from disagg.routing.pool import EndpointPool

log = logging.getLogger(__name__)

_decode = msgspec.msgpack.Decoder(LoadReport).decode
_encode = msgspec.msgpack.Encoder().encode


class LoadSubscriber:
    """Applies the reports of every followed endpoint to `pool`. `follow(endpoint)` and
    `unfollow(endpoint)` are counted: a channel shared by several workers stays connected
    while any of them is in the pool."""

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._followers: Counter[str] = Counter()
        self._next_seq: dict[str, int] = {}
        self.reports = 0

    def follow(self, endpoint: str) -> None:
        if not self._followers[endpoint]:
            self._socket.connect(endpoint)
        self._followers[endpoint] += 1

    def unfollow(self, endpoint: str) -> None:
        self._followers[endpoint] -= 1
        if self._followers[endpoint] <= 0:
            del self._followers[endpoint]
            try:
                self._socket.disconnect(endpoint)
            except zmq.ZMQError:
                pass

    async def run(self) -> None:
        """Until cancelled; closes the socket then. Each wakeup takes every report waiting (ZMQ's
        file descriptor only says that the socket's state changed)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        fd = self._socket.getsockopt(zmq.FD)
        loop.add_reader(fd, ready.set)
        try:
            while True:
                ready.clear()
                self.drain()
                await ready.wait()
        finally:
            loop.remove_reader(fd)
            self._socket.close(linger=0)

    def drain(self) -> None:
        """Apply every report that has arrived."""
        if self._socket.closed:
            return
        while self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.apply(self._socket.recv(zmq.NOBLOCK))

    def apply(self, payload: bytes) -> None:
        try:
            report = _decode(payload)
        except msgspec.DecodeError as exc:
            log.warning("undecodable load report: %s", exc)
            return
        expected = self._next_seq.get(report.engine_id)
        if expected is not None and report.seq > expected:
            metrics.LOAD_REPORT_GAPS.inc(report.seq - expected)
        self._next_seq[report.engine_id] = report.seq + 1
        if report.engine_id in self.pool:
            self.pool.update_load(report.engine_id, report.load(), as_of=report.sent_at)
            self.reports += 1
            metrics.LOAD_REPORTS.inc()

    def forget(self, engine_id: str) -> None:
        self._next_seq.pop(engine_id, None)


class LoadPublisher:
    """A worker's side: binds a PUB socket on `host` (a free port, read back: `endpoint`) and
    publishes `LoadReport`s of the engines `read_loads()` returns, each when it changed (at most
    every `min_interval_s`) or every `heartbeat_s`. `run()` on an event loop, or `publish_due()`
    from any one thread (the socket never blocks: a report a slow subscriber cannot take is
    dropped)."""

    def __init__(self, host: str, read_loads: Callable[[], list[LoadReport]], *, min_interval_s: float = 0.05,
                 heartbeat_s: float = 1.0) -> None:
        self.read_loads = read_loads
        self.min_interval_s = min_interval_s
        self.heartbeat_s = heartbeat_s
        self._socket = zmq.Context.instance().socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 1000)  # a slow subscriber loses reports, never blocks us
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._seq: Counter[str] = Counter()
        self._last: dict[str, tuple[tuple, float]] = {}

    async def run(self) -> None:
        """Until cancelled; closes the socket then."""
        try:
            while True:
                self.publish_due(time.monotonic())
                await asyncio.sleep(self.min_interval_s)
        finally:
            self.close()

    def close(self) -> None:
        self._socket.close(linger=0)

    def publish_due(self, now: float) -> int:
        """Publish every report that changed or whose heartbeat is due; how many went out."""
        sent = 0
        for report in self.read_loads():
            state = (report.waiting, report.running, report.kv_usage, report.num_blocks)
            last = self._last.get(report.engine_id)
            if last is not None and last[0] == state and now - last[1] < self.heartbeat_s:
                continue
            seq = self._seq[report.engine_id]
            self._seq[report.engine_id] += 1
            stamped = msgspec.structs.replace(report, seq=seq, sent_at=time.time())
            try:
                self._socket.send(_encode(stamped), zmq.NOBLOCK)
            except zmq.Again:
                continue  # dropped; the subscriber sees the gap
            self._last[report.engine_id] = (state, now)
            sent += 1
        return sent
