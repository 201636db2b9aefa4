"""One worker as the scheduler sees it: who it is, its load, and how old that knowledge is."""

from __future__ import annotations

from disagg.worker.protocol import EngineLoad, Role, WorkerInfo


class Endpoint:
    """A registered worker. Times are `time.monotonic()` seconds.

    `seen_at` moves when the worker answers (registration, a scrape, a KV event); `load_at`
    moves when a new load signal arrives. `pending` counts picks sent its way since that signal,
    so a burst between two scrapes does not pile onto the endpoint that looked idlest.

    What a pick reads of every candidate (`queue`, `backlog`, `kv_free`, `engine_id`) is kept in
    plain attributes, recomputed when `load` or `pending` is set, and copied into the endpoint's
    slot of its role's `RoleSignals`: a pick reads them for each of hundreds of endpoints, a
    signal sets them once.
    """

    __slots__ = ("info", "engine_id", "fingerprint", "load_at", "seen_at", "_load", "_pending",
                 "queue", "backlog", "kv_free", "_signals", "_slot")

    def __init__(self, info: WorkerInfo, load: EngineLoad | None = None, *, load_at: float = 0.0,
                 seen_at: float = 0.0, pending: int = 0, fingerprint: str = "") -> None:
        self.info = info
        self.engine_id: str = info.engine_id
        self.fingerprint = fingerprint or info.layout.fingerprint()
        self.load_at = load_at
        self.seen_at = seen_at
        self._load = load if load is not None else EngineLoad()
        self._pending = pending
        self._signals: RoleSignals | None = None
        self._slot = 0
        self._derive()

    @property
    def load(self) -> EngineLoad:
        return self._load

    @load.setter
    def load(self, load: EngineLoad) -> None:
        self._load = load
        self._derive()

    @property
    def pending(self) -> int:
        return self._pending

    @pending.setter
    def pending(self, n: int) -> None:
        self._pending = n
        self._derive()

    def signal(self, load: EngineLoad, at: float) -> None:
        """A fresh load signal at `at`: the worker answered, and picks before it are in it."""
        self._load = load
        self._pending = 0
        self.load_at = at
        if at > self.seen_at:
            self.seen_at = at
        self._derive()

    def _derive(self) -> None:
        load = self._load
        # Requests ahead of a new one, as far as we know.
        self.queue: int = load.waiting + load.running + self._pending
        # What the saturation filter limits: the requests the worker itself says are waiting. Not
        # our pending picks: they are a guess (a fast worker has finished them long before the
        # next scrape), good for spreading load, too loose to refuse a request on (GIE's
        # saturation detector likewise reads only the scraped queue).
        self.backlog: int = load.waiting
        self.kv_free: float = 1.0 - load.kv_usage
        signals = self._signals
        if signals is not None:
            slot = self._slot
            signals.queues[slot] = self.queue
            signals.backlogs[slot] = self.backlog
            signals.kv_free[slot] = self.kv_free

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


class RoleSignals:
    """What a pick reads of every endpoint of one role, as lists parallel to `endpoints`. Each
    endpoint writes its own slot whenever its load or pending count changes, so a pick over the
    whole role takes these lists as they are instead of walking the endpoints to build them.
    The pool makes a new one whenever the role's membership changes; readers must not modify it."""

    __slots__ = ("endpoints", "slot_of", "queues", "backlogs", "kv_free")

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.endpoints = endpoints
        self.slot_of: dict[str, int] = {e.engine_id: i for i, e in enumerate(endpoints)}
        self.queues: list[int] = [e.queue for e in endpoints]
        self.backlogs: list[int] = [e.backlog for e in endpoints]
        self.kv_free: list[float] = [e.kv_free for e in endpoints]
        for slot, endpoint in enumerate(endpoints):
            endpoint._signals, endpoint._slot = self, slot

    def release(self) -> None:
        """The role's membership changed: its endpoints stop writing here."""
        for endpoint in self.endpoints:
            if endpoint._signals is self:
                endpoint._signals = None
