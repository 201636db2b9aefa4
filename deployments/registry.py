"""Registry: the Ray-native discovery. Workers register their descriptor and heartbeat; the
router and the decode workers (for their prefill allowlist) read the live list."""

from __future__ import annotations

import time

from ray import serve

from disagg.messages import WorkerInfo

# A worker that missed this many seconds of heartbeats is dropped from the list.
HEARTBEAT_TTL_S = 5.0


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                  logging_config={"enable_access_log": False})
class Registry:
    def __init__(self) -> None:
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}

    def register(self, info: WorkerInfo) -> None:
        """Add or refresh a worker. A new engine id at a known address replaces the old entry."""
        for engine_id, (old, _) in list(self._workers.items()):
            if old.address == info.address and engine_id != info.engine_id:
                del self._workers[engine_id]
        self._workers[info.engine_id] = (info, time.monotonic())

    def deregister(self, engine_id: str) -> None:
        self._workers.pop(engine_id, None)

    def list(self) -> list[WorkerInfo]:
        now = time.monotonic()
        for engine_id, (_, seen) in list(self._workers.items()):
            if now - seen > HEARTBEAT_TTL_S:
                del self._workers[engine_id]
        return [info for info, _ in self._workers.values()]
