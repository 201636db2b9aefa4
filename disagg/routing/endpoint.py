"""One worker as the scheduler sees it: who it is, its load, and how old that knowledge is."""

from __future__ import annotations

from disagg.messages import EngineLoad, Role, WorkerInfo


class Endpoint:
    """A registered worker. Times are `time.monotonic()` seconds.

    `seen_at` moves when the worker answers (registration, a scrape, a KV event); `load_at`
    moves when a new load signal arrives. `pending` counts picks sent its way since that signal,
    so a burst between two scrapes does not pile onto the endpoint that looked idlest.
    """

    __slots__ = ("info", "fingerprint", "load", "load_at", "seen_at", "pending")

    def __init__(self, info: WorkerInfo, load: EngineLoad | None = None, *, load_at: float = 0.0,
                 seen_at: float = 0.0, pending: int = 0) -> None:
        self.info = info
        self.fingerprint = info.layout.fingerprint()
        self.load = load if load is not None else EngineLoad()
        self.load_at = load_at
        self.seen_at = seen_at
        self.pending = pending

    def signal(self, load: EngineLoad, at: float) -> None:
        """A fresh load signal at `at`: the worker answered, and picks before it are in it."""
        self.load = load
        self.pending = 0
        self.load_at = at
        self.seen_at = max(self.seen_at, at)

    @property
    def queue(self) -> int:
        """Requests ahead of a new one, as far as we know."""
        return self.load.waiting + self.load.running + self.pending

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
