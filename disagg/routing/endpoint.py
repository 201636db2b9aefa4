"""One worker as the scheduler sees it: who it is, its load, and how old that knowledge is."""

from __future__ import annotations

from disagg.worker.protocol import EngineLoad, Role, WorkerInfo


class Endpoint:
    """A registered worker. Times are `time.monotonic()` seconds.

    `seen_at` moves when the worker answers (registration, a scrape, a KV event); `load_at`
    moves when a new load signal arrives. `pending` counts picks sent its way since that signal,
    so a burst between two scrapes does not pile onto the endpoint that looked idlest.

    What a pick reads of every candidate (`queue`, `backlog`, `kv_free`, `engine_id`) is kept in
    plain attributes, recomputed when `load` or `pending` is set: a pick reads them for each of
    hundreds of endpoints, a signal sets them once.
    """

    __slots__ = ("info", "engine_id", "fingerprint", "load_at", "seen_at", "_load", "_pending",
                 "queue", "backlog", "kv_free")

    def __init__(self, info: WorkerInfo, load: EngineLoad | None = None, *, load_at: float = 0.0,
                 seen_at: float = 0.0, pending: int = 0, fingerprint: str = "") -> None:
        self.info = info
        self.engine_id: str = info.engine_id
        self.fingerprint = fingerprint or info.layout.fingerprint()
        self.load_at = load_at
        self.seen_at = seen_at
        self._load = load if load is not None else EngineLoad()
        self._pending = pending
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
        # Requests not yet running: what the saturation filter limits.
        self.backlog: int = load.waiting + self._pending
        self.kv_free: float = 1.0 - load.kv_usage

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
