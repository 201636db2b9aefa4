"""Flow control: while every decode is saturated, requests wait in the EPP instead of being shed.

A request that cannot be picked now (the scheduler's `OverloadedError`: every decode reports
`max_waiting_per_worker` or more waiting requests) waits in the queue of its priority band. While
anyone waits, new arrivals queue behind them. A waiting request leaves the queue when

- capacity frees: it is picked like any request (dispatched);
- its time is up, `ttl_s` or the client's own deadline if sooner: 503, `ttl-expired`;
- a higher-priority arrival needs its place and it is sheddable: 429, `evicted`;
- its client goes away (the ext_proc stream is reset, the HTTP client disconnects): no answer.

Priority is `x-disagg-priority` (an integer), else the priority `FlowControlConfig.objectives`
gives the `x-gateway-inference-objective` named (an unknown one is 0); a negative priority is
sheddable. Bands dispatch highest first; within a band the tenants (`x-gateway-inference-fairness-id`)
take turns, and each tenant's requests go first come, first served.

The queue holds at most `max_requests` requests and `max_bytes` of their bodies, all bands
together. An arrival that does not fit takes the places of the newest sheddable requests of lower
priority (lowest band first), or is refused: 429, `queue-full`, whatever its own priority. That is
llm-d's answer to a full queue (its flow control rejects for capacity with 429 and keeps 503 for a
pool without endpoints and for a TTL that ran out): a full queue is backpressure, and a client may
retry later; a 503 says that nothing could serve.

Dispatch runs each `poll_interval_s` while anyone waits, or at once on `notify()`. It releases as
many requests as the decodes have room for: `max_waiting_per_worker` minus what each reports
waiting minus the picks sent its way since that report, so one report does not release the whole
queue onto one worker. `ttl_s` 0 turns flow control off: a saturated pick is a 429 `shed` at once.

The queue is this EPP replica's own: replicas do not share it, so limits, priorities and fairness
hold per replica (N replicas hold up to N x `max_requests`), and it is lost with the replica.

Every refusal names its reason in the `x-disagg-dropped-reason` response header and counts in
`disagg_epp_flow_control_dropped_total{reason,band}`; the queue's length and bytes per band and the
time requests waited are exported too. All of it runs on the EPP's event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
import weakref
from bisect import insort
from collections import OrderedDict, deque
from typing import Callable, Generic, Iterable, Iterator, Mapping, NamedTuple, TypeVar

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from disagg.config import FlowControlConfig
from disagg.routing import OverloadedError, PickRequest

log = logging.getLogger(__name__)

# Request headers that place a request in the queue, and the response header naming a refusal.
PRIORITY_HEADER = "x-disagg-priority"
OBJECTIVE_HEADER = "x-gateway-inference-objective"
FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
FLOW_HEADERS = (PRIORITY_HEADER, OBJECTIVE_HEADER, FAIRNESS_HEADER)
DROPPED_REASON_HEADER = "x-disagg-dropped-reason"

# Why a request was refused or left the queue unanswered.
SHED = "shed"  # saturated, flow control off: 429
QUEUE_FULL = "queue-full"  # no room in the queue: 429
EVICTED = "evicted"  # a sheddable request whose place a higher priority took: 429
TTL_EXPIRED = "ttl-expired"  # waited as long as it may: 503
NO_ENDPOINT = "no-endpoint"  # nothing can serve it: 503
CANCELLED = "cancelled"  # the client went away while it waited: no answer
INTERNAL = "internal"  # dispatching failed (a bug): 500

# Priorities are clamped to this range: each one is a band and a metric label.
MAX_PRIORITY = 1000
# Answer a request this long before its client's deadline, so the answer arrives in time.
DEADLINE_MARGIN_S = 0.1

DROPPED = Counter("disagg_epp_flow_control_dropped",
                  "Requests refused for capacity, or that left the EPP's queue unanswered, by reason and band.",
                  ["reason", "band"])
WAIT = Histogram("disagg_epp_flow_control_wait_seconds",
                 "Time requests waited in the EPP's queue, by how they left it (dispatched or a drop reason) and band.",
                 ["outcome", "band"], buckets=(1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

T = TypeVar("T")


class FlowKey(NamedTuple):
    """Where a request waits: its priority band and its tenant."""

    priority: int = 0
    tenant: str = ""

    @property
    def sheddable(self) -> bool:
        return self.priority < 0

    @property
    def band(self) -> str:
        return str(self.priority)


class Dropped(NamedTuple):
    """A refusal: the HTTP status, the reason (header value and metric label), a message."""

    status: int
    reason: str
    message: str


def record_drop(reason: str, key: FlowKey) -> None:
    DROPPED.labels(reason, key.band).inc()


DEFAULT_KEY = FlowKey()


def flow_key(headers: Mapping[str, str], objectives: Mapping[str, int]) -> FlowKey:
    """The key of a request from its headers (lower-case names). Raises ValueError for an
    `x-disagg-priority` that is not an integer."""
    if not headers:
        return DEFAULT_KEY
    tenant = headers.get(FAIRNESS_HEADER, "")
    raw = headers.get(PRIORITY_HEADER)
    if raw is not None:
        try:
            priority = int(raw.strip())
        except ValueError:
            raise ValueError(f"{PRIORITY_HEADER}: expected an integer, got {raw[:40]!r}") from None
    else:
        priority = objectives.get(headers.get(OBJECTIVE_HEADER, ""), 0)
    return FlowKey(max(-MAX_PRIORITY, min(MAX_PRIORITY, priority)), tenant)


class Waiting(Generic[T]):
    """A request in the queue. Its outcome (what the picker answers: a pick or a refusal) goes to
    the callback given to `then`; `cancel()` takes it out of the queue without an answer."""

    __slots__ = ("request", "key", "size", "seq", "enqueued_at", "deadline", "_flow", "_callback", "_outcome", "queued")

    def __init__(self, flow: FlowControl[T], request: PickRequest, key: FlowKey, size: int, seq: int,
                 enqueued_at: float, deadline: float) -> None:
        self.request = request
        self.key = key
        self.size = size
        self.seq = seq  # arrival order
        self.enqueued_at = enqueued_at
        self.deadline = deadline
        self._flow = flow
        self._callback: Callable[[T], None] | None = None
        self._outcome: tuple[T] | None = None
        self.queued = True

    def then(self, callback: Callable[[T], None]) -> None:
        """Call `callback(outcome)` once the request leaves the queue with an answer."""
        self._callback = callback
        if self._outcome is not None:
            callback(self._outcome[0])

    def cancel(self) -> None:
        """The client went away: leave the queue (nothing is answered)."""
        if self.queued:
            self._flow._leave(self, None, CANCELLED)

    def _settle(self, outcome: T) -> None:
        self._outcome = (outcome,)
        if self._callback is not None:
            try:
                self._callback(outcome)
            except Exception:
                log.exception("answering a request that left the queue failed")

    def __repr__(self) -> str:
        return f"Waiting(#{self.seq} priority {self.key.priority} tenant {self.key.tenant!r})"


class _Band:
    """One priority's requests: a FIFO per tenant, the tenants in turn order."""

    __slots__ = ("tenants",)

    def __init__(self) -> None:
        self.tenants: OrderedDict[str, deque[Waiting]] = OrderedDict()

    def newest_first(self) -> list[Waiting]:
        return sorted((w for fifo in self.tenants.values() for w in fifo), key=lambda w: -w.seq)


class FlowQueue(Generic[T]):
    """The waiting requests: bands by priority, round robin between a band's tenants, FIFO within
    a tenant. Counts requests and bytes; knows nothing of time or of picks."""

    def __init__(self) -> None:
        self._bands: dict[int, _Band] = {}
        self._priorities: list[int] = []  # ascending
        self.count = 0
        self.bytes = 0

    def __len__(self) -> int:
        return self.count

    def push(self, waiting: Waiting[T], *, front: bool = False) -> None:
        """Queue `waiting` behind its tenant's requests (`front`: ahead of them, and its tenant
        next in turn: a request put back after a failed dispatch)."""
        priority, tenant = waiting.key
        band = self._bands.get(priority)
        if band is None:
            band = self._bands[priority] = _Band()
            insort(self._priorities, priority)
        fifo = band.tenants.get(tenant)
        if fifo is None:
            fifo = band.tenants[tenant] = deque()
        if front:
            fifo.appendleft(waiting)
            band.tenants.move_to_end(tenant, last=False)
        else:
            fifo.append(waiting)
        self.count += 1
        self.bytes += waiting.size

    def pop(self) -> Waiting[T] | None:
        """The next request to dispatch: the highest band's next tenant's oldest."""
        if not self._priorities:
            return None
        priority = self._priorities[-1]
        band = self._bands[priority]
        tenant, fifo = next(iter(band.tenants.items()))
        waiting = fifo.popleft()
        if fifo:
            band.tenants.move_to_end(tenant)  # its next request waits for the others' turns
        else:
            del band.tenants[tenant]
            if not band.tenants:
                self._drop_band(priority)
        self.count -= 1
        self.bytes -= waiting.size
        return waiting

    def remove(self, waiting: Waiting[T]) -> None:
        priority, tenant = waiting.key
        band = self._bands[priority]
        fifo = band.tenants[tenant]
        fifo.remove(waiting)
        if not fifo:
            del band.tenants[tenant]
            if not band.tenants:
                self._drop_band(priority)
        self.count -= 1
        self.bytes -= waiting.size

    def evictable(self, below: int) -> Iterator[Waiting[T]]:
        """Sheddable requests of priority lower than `below`, in eviction order: lowest band
        first, newest first within a band."""
        for priority in list(self._priorities):
            if priority >= min(below, 0):
                return
            yield from self._bands[priority].newest_first()

    def bands(self) -> Iterable[tuple[int, int, int]]:
        """(priority, requests, bytes) of each band."""
        for priority in self._priorities:
            fifos = self._bands[priority].tenants.values()
            yield priority, sum(map(len, fifos)), sum(w.size for fifo in fifos for w in fifo)

    def _drop_band(self, priority: int) -> None:
        del self._bands[priority]
        self._priorities.remove(priority)


class FlowControl(Generic[T]):
    """Admission of requests to the picker (see the module docstring).

    `pick(request, key)` answers a request now (a pick, or a refusal such as 503) or raises
    `OverloadedError` to say that it must wait; `refuse(dropped, key)` is the answer for a
    refusal of flow control's own; `headroom(want)` says how many waiting requests the decodes
    can take now (at most `want`). Its outcomes are whatever those return."""

    def __init__(self, config: FlowControlConfig, *, pick: Callable[[PickRequest, FlowKey], T],
                 refuse: Callable[[Dropped, FlowKey], T], headroom: Callable[[int], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._pick = pick
        self._refuse = refuse
        self._headroom = headroom
        self.clock = clock
        self.queue: FlowQueue[T] = FlowQueue()
        self._deadlines: list[tuple[float, int, Waiting[T]]] = []  # a heap; left entries skipped
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._soon = False  # the timer is a call_soon (notify)
        _collector.flows.add(self)

    @property
    def enabled(self) -> bool:
        return self.config.ttl_s > 0

    def key(self, headers: Mapping[str, str]) -> FlowKey:
        """The request's place from its headers; ValueError for a malformed priority."""
        return flow_key(headers, self.config.objectives)

    def admit(self, request: PickRequest, key: FlowKey = DEFAULT_KEY, *, size: int = 0,
              deadline: float | None = None) -> T | Waiting[T]:
        """Pick now, or queue the request (`size`: the bytes it holds while it waits; `deadline`,
        monotonic seconds: when its client gives up)."""
        if not self.queue.count:
            try:
                return self._pick(request, key)
            except OverloadedError as exc:
                if not self.enabled or not self._on_loop():
                    return self._drop_now(Dropped(429, SHED, str(exc)), key)
        elif not self._on_loop():
            return self._drop_now(Dropped(429, SHED, "requests are waiting for capacity"), key)
        return self._enqueue(request, key, size, deadline)

    def notify(self) -> None:
        """Capacity may have freed (a load report arrived): dispatch on the loop's next turn."""
        if not self.queue or self._loop is None or self._soon:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._soon = True
        self._timer = self._loop.call_soon(self._tick)

    # -- the queue --------------------------------------------------------------------------

    def _enqueue(self, request: PickRequest, key: FlowKey, size: int, deadline: float | None) -> T | Waiting[T]:
        now = self.clock()
        expires = now + self.config.ttl_s
        if deadline is not None:
            expires = min(expires, deadline - DEADLINE_MARGIN_S)
        if expires <= now:
            return self._drop_now(Dropped(503, TTL_EXPIRED, "no time left to wait for capacity"), key)
        if not self._make_room(key, size):
            return self._drop_now(Dropped(429, QUEUE_FULL, f"the queue is full ({self.queue.count} requests, "
                                                           f"{self.queue.bytes} bytes waiting)"), key)
        waiting = Waiting(self, request, key, size, next(self._seq), now, expires)
        self.queue.push(waiting)
        heapq.heappush(self._deadlines, (expires, waiting.seq, waiting))
        if self._timer is None:
            self._timer = self._loop.call_later(self.config.poll_interval_s, self._tick)  # type: ignore[union-attr]
        return waiting

    def _make_room(self, key: FlowKey, size: int) -> bool:
        """Evict what must go for a request of `key` and `size` to fit; False (nothing evicted)
        when it cannot."""
        config, queue = self.config, self.queue
        if size > config.max_bytes:
            return False
        count_over = queue.count + 1 - config.max_requests
        bytes_over = queue.bytes + size - config.max_bytes
        if count_over <= 0 and bytes_over <= 0:
            return True
        victims = []
        for waiting in queue.evictable(below=key.priority):
            victims.append(waiting)
            count_over -= 1
            bytes_over -= waiting.size
            if count_over <= 0 and bytes_over <= 0:
                break
        else:
            return False
        for waiting in victims:
            self._leave(waiting, self._refuse(Dropped(429, EVICTED, "a request of higher priority took its place"),
                                              waiting.key), EVICTED)
        return True

    def _leave(self, waiting: Waiting[T], outcome: T | None, how: str) -> None:
        """`waiting` leaves the queue: dispatched, dropped for `how`, or cancelled (no outcome)."""
        if waiting.queued:  # not yet popped (a dispatch pops it first)
            self.queue.remove(waiting)
        waiting.queued = False
        WAIT.labels(how, waiting.key.band).observe(self.clock() - waiting.enqueued_at)
        if how != "dispatched":
            record_drop(how, waiting.key)
        waiting.request = None  # type: ignore[assignment]  # its memory goes now, not at the last reference
        if outcome is not None:
            waiting._settle(outcome)

    def _drop_now(self, dropped: Dropped, key: FlowKey) -> T:
        record_drop(dropped.reason, key)
        return self._refuse(dropped, key)

    def _on_loop(self) -> bool:
        """Waiting needs the event loop that will dispatch (a synchronous caller has none)."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    # -- dispatch ---------------------------------------------------------------------------

    def _tick(self) -> None:
        self._timer, self._soon = None, False
        try:
            self._expire(self.clock())
            self._dispatch()
        finally:
            if self.queue and self._loop is not None and not self._loop.is_closed():
                delay = self.config.poll_interval_s
                if self._deadlines:
                    delay = min(delay, max(0.0, self._deadlines[0][0] - self.clock()))
                self._timer = self._loop.call_later(delay, self._tick)

    def _expire(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, waiting = heapq.heappop(deadlines)
            if waiting.queued:
                dropped = Dropped(503, TTL_EXPIRED, "waited for capacity until its time was up")
                self._leave(waiting, self._refuse(dropped, waiting.key), TTL_EXPIRED)
        if not self.queue:
            deadlines.clear()  # only entries of requests that already left

    def _dispatch(self) -> None:
        """Release the next requests, as many as there is room for. A request that still cannot
        be picked (its subset hint's decodes are saturated) goes back to the front of its line."""
        queue = self.queue
        room = self._headroom(len(queue)) if queue else 0
        put_back: list[Waiting[T]] = []
        attempts = len(queue)
        while room > 0 and attempts > 0 and (waiting := queue.pop()) is not None:
            attempts -= 1
            waiting.queued = False
            try:
                outcome = self._pick(waiting.request, waiting.key)
            except OverloadedError:
                put_back.append(waiting)
                continue
            except Exception as exc:  # a bug: answer it rather than leave it hanging
                log.exception("dispatching %s failed", waiting)
                outcome = self._refuse(Dropped(500, INTERNAL, f"{type(exc).__name__}: {exc}"), waiting.key)
                self._leave(waiting, outcome, INTERNAL)
                continue
            room -= 1
            self._leave(waiting, outcome, "dispatched")
        for waiting in reversed(put_back):
            waiting.queued = True
            queue.push(waiting, front=True)


class _FlowCollector(Collector):
    def __init__(self) -> None:
        self.flows: weakref.WeakSet[FlowControl] = weakref.WeakSet()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        length = GaugeMetricFamily("disagg_epp_flow_control_queue_length",
                                   "Requests waiting in the EPP's queue, by band.", labels=["band"])
        size = GaugeMetricFamily("disagg_epp_flow_control_queue_bytes", "Body bytes of the requests waiting, by band.",
                                 labels=["band"])
        totals: dict[int, list[int]] = {}
        for flow in list(self.flows):
            for priority, count, nbytes in flow.queue.bands():
                total = totals.setdefault(priority, [0, 0])
                total[0] += count
                total[1] += nbytes
        for priority, (count, nbytes) in sorted(totals.items()):
            length.add_metric([str(priority)], count)
            size.add_metric([str(priority)], nbytes)
        return [length, size]


_collector = _FlowCollector()
REGISTRY.register(_collector)
