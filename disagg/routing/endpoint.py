"""One worker as the scheduler sees it: who it is, its load, and how old that knowledge is."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.worker.protocol import EngineLoad, Role, WorkerInfo


@dataclass(eq=False)
class Endpoint:
    """A registered worker. Times are `time.monotonic()` seconds.

    `seen_at` moves when the worker answers (registration, a scrape, a KV event); `load_at`
    moves when a new load signal arrives. `pending` counts picks sent its way since that signal,
    so a burst between two scrapes does not pile onto the endpoint that looked idlest.
    """

    info: WorkerInfo
    load: EngineLoad = field(default_factory=EngineLoad)
    load_at: float = 0.0
    seen_at: float = 0.0
    pending: int = 0
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = self.info.layout.fingerprint()

    @property
    def address(self) -> str:
        return self.info.address

    @property
    def engine_id(self) -> str:
        return self.info.engine_id

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

    @property
    def queue(self) -> int:
        """Requests ahead of a new one, as far as we know."""
        return self.load.waiting + self.load.running + self.pending

    def __repr__(self) -> str:
        return f"Endpoint({self.role} {self.address} {self.engine_id})"
