"""A Serve RequestRouter that sends a request to the replica the scheduler picked.

The router passes the picked replica's id as the `pin` keyword; when that replica is gone
(restarted, scaled down), the request falls back to any replica with room."""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PIN_KWARG = "pin"


class PinnedReplicaRouter(RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        pin = _pin_of(pending_request)
        if pin is not None:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == pin:
                    return [[replica]]
        # No pin, or the pinned replica is gone: any replica; Serve probes their queues and
        # takes one with room.
        return [candidate_replicas]


def _pin_of(pending_request: PendingRequest | None) -> Any:
    if pending_request is None:
        return None
    return pending_request.kwargs.get(PIN_KWARG)
