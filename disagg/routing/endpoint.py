"""One worker as the scheduler sees it: who it is, its load, and how old that knowledge is."""

from __future__ import annotations

from bisect import insort
from collections import deque
from typing import Iterator

from disagg.messages import EngineLoad, Role, WorkerInfo


class Endpoint:
    """A registered worker. Times are `time.monotonic()` seconds.

    `seen_at` moves when the worker answers (registration, a load report or scrape, a KV event);
    `load_at` moves when a new load signal arrives. `pending` counts the picks sent its way that
    its newest load signal does not count yet (by this scheduler or, reported, by its peers), so a
    burst between two signals does not pile onto the endpoint that looked idlest. Each pick is
    booked with its wall-clock time and a signal drops those older than the state it describes:
    every replica of the picker counts the same picks, whatever order their news arrives in. A
    change of `queue` moves the endpoint in its role's `LoadOrder`.
    """

    __slots__ = ("info", "fingerprint", "_load", "load_at", "seen_at", "_booked", "queue", "order")

    def __init__(self, info: WorkerInfo, load: EngineLoad | None = None, *, load_at: float = 0.0,
                 seen_at: float = 0.0) -> None:
        self.info = info
        self.fingerprint = info.layout.fingerprint()
        self._load = load if load is not None else EngineLoad()
        self.load_at = load_at
        self.seen_at = seen_at
        self._booked: deque[float] = deque()  # wall-clock times of the pending picks, oldest first
        # Requests ahead of a new one, as far as we know: waiting + running + pending.
        self.queue = self._load.waiting + self._load.running
        self.order: LoadOrder | None = None

    @property
    def load(self) -> EngineLoad:
        return self._load

    @load.setter
    def load(self, load: EngineLoad) -> None:
        self._load = load
        self._requeue()

    @property
    def pending(self) -> int:
        return len(self._booked)

    def book(self, at: float) -> None:
        """A pick sent here at wall-clock time `at` (picks arrive about in time order)."""
        booked = self._booked
        if booked and at < booked[-1]:
            insort(booked, at)  # a peer's notice, overtaken by a later pick
        else:
            booked.append(at)
        self._requeue()

    def signal(self, load: EngineLoad, at: float, as_of: float) -> None:
        """A fresh load signal received at `at` (the pool's clock), describing the worker as of
        wall-clock time `as_of`: the picks booked before then are in it."""
        self._load = load
        booked = self._booked
        while booked and booked[0] <= as_of:
            booked.popleft()
        self.load_at = at
        self.seen_at = max(self.seen_at, at)
        self._requeue()

    def _requeue(self) -> None:
        queue = self._load.waiting + self._load.running + len(self._booked)
        if queue != self.queue:
            if self.order is not None:
                self.order.move(self, self.queue, queue)
            self.queue = queue

    @property
    def backlog(self) -> int:
        """What the saturation filter limits: the requests the worker itself says are waiting.
        Not our pending picks: they are a guess (a fast worker has finished them long before the
        next scrape), good for spreading load, too loose to refuse a request on (GIE's saturation
        detector likewise reads only the scraped queue)."""
        return self.load.waiting

    @property
    def kv_free(self) -> float:
        return 1.0 - self.load.kv_usage

    @property
    def engine_id(self) -> str:
        return self.info.engine_id

    @property
    def address(self) -> str:
        return self.info.address

    @property
    def role(self) -> Role:
        return self.info.role

    @property
    def node_id(self) -> str:
        return self.info.node_id

    def signal_age(self, now: float) -> float:
        """Seconds since the newest load signal."""
        return now - self.load_at

    def silence(self, now: float) -> float:
        """Seconds since the worker last answered."""
        return now - self.seen_at

    def __repr__(self) -> str:
        return f"Endpoint({self.role} {self.address} {self.engine_id})"


class LoadOrder:
    """One role's endpoints bucketed by queue length, kept as their loads change, so that a pick
    finds the least-loaded few without a walk over the role (1,000 endpoints: a walk alone costs
    more than the pick's budget). Endpoints move themselves (`Endpoint._requeue`)."""

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self._buckets: dict[int, dict[str, Endpoint]] = {}
        self._keys: list[int] = []  # the buckets' queue lengths, ascending
        for endpoint in endpoints:
            endpoint.order = self
            self._add(endpoint, endpoint.queue)

    def move(self, endpoint: Endpoint, old: int, new: int) -> None:
        bucket = self._buckets[old]
        del bucket[endpoint.engine_id]
        if not bucket:
            del self._buckets[old]
            self._keys.remove(old)
        self._add(endpoint, new)

    def _add(self, endpoint: Endpoint, queue: int) -> None:
        bucket = self._buckets.get(queue)
        if bucket is None:
            bucket = self._buckets[queue] = {}
            insort(self._keys, queue)
        bucket[endpoint.engine_id] = endpoint

    def ascending(self) -> Iterator[Endpoint]:
        """Every endpoint, shortest queue first (equal queues in the order they joined the bucket).
        The caller must not change queues while it iterates."""
        for queue in self._keys:
            yield from self._buckets[queue].values()

    def queue_range(self) -> tuple[int, int]:
        """The shortest and longest queue of the role."""
        return (self._keys[0], self._keys[-1]) if self._keys else (0, 0)

    def release(self) -> None:
        """The role's membership changed: its endpoints stop moving here."""
        for bucket in self._buckets.values():
            for endpoint in bucket.values():
                if endpoint.order is self:
                    endpoint.order = None
