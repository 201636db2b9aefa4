"""The endpoint pool: every live worker of one model and one KV layout, with freshness.

Registration checks compatibility (rule 2 of ARCHITECTURE.md): a worker of another model or
another KV layout is refused with `IncompatibleWorkerError`. A worker that comes back at the same
address with a new engine id is a restarted engine and replaces its old entry.

Liveness: a worker that has not answered for `dead_after_s` is dead: `endpoints()` no longer
returns it, so no pick chooses it. It stays known (`dead_endpoints()`) until `forget_after_s`, when
`sweep()` removes it: if every live endpoint is gone at once, more likely our side stalled than
all of them, and the scheduler may still route to the most recently seen (panic mode). An engine
removed as dead and listed again by discovery comes back dead until a scrape hears from it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import msgspec

from disagg.routing.endpoint import Endpoint, LoadOrder
from disagg.routing.errors import IncompatibleWorkerError
from disagg.messages import EngineLoad, Role, WorkerInfo

log = logging.getLogger(__name__)

RemovalListener = Callable[[Endpoint, str], None]


class EndpointPool:
    def __init__(
        self,
        *,
        model: str,
        block_size: int,
        stale_after_s: float = 0.5,
        dead_after_s: float = 2.0,
        forget_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.stale_after_s = stale_after_s
        self.dead_after_s = dead_after_s
        self.forget_after_s = forget_after_s if forget_after_s is not None else 5 * dead_after_s
        self.clock = clock
        self.wall = wall  # when picks are booked and load reports sent: comparable between processes
        # The first worker sets the pool's layout; it resets when the pool empties.
        self.layout_fingerprint: str | None = None
        self._by_engine: dict[str, Endpoint] = {}
        self._by_address: dict[str, str] = {}
        # Per role, the members and their load order (rebuilt on membership changes only).
        self._by_role: dict[str, list[Endpoint]] = {"prefill": [], "decode": []}
        self._orders: dict[str, LoadOrder] = {"prefill": LoadOrder([]), "decode": LoadOrder([])}
        self._batching = False
        self._listeners: list[RemovalListener] = []
        self._load_listeners: list[Callable[[Endpoint], None]] = []
        # engine ids removed as dead (bounded), so rediscovery is no revival.
        self._tombstones: dict[str, float] = {}

    # -- membership -------------------------------------------------------------------------

    def upsert(self, info: WorkerInfo) -> Endpoint:
        """Add a worker or refresh its descriptor. Raises `IncompatibleWorkerError` for a worker
        this pool cannot pair. Keeps the load and `seen_at` of an engine already known: being
        listed by discovery is not proof that a worker answers."""
        self._check_compatible(info)
        known = self._by_engine.get(info.engine_id)
        if known is not None:
            if known.address == info.address and known.role == info.role:
                known.info = info  # the usual rediscovery: nothing moves
                return known
            self._by_address.pop(known.address, None)
            known.info = info
        else:
            now = self.clock()
            # An engine forgotten as dead comes back dead (not pickable) but not due for another
            # sweep before its scrapes have had forget_after_s - dead_after_s to revive it.
            seen = now - self.dead_after_s - 1e-3 if self._tombstones.pop(info.engine_id, None) is not None else now
            known = Endpoint(info, EngineLoad(num_blocks=info.num_blocks), load_at=seen, seen_at=seen)
            self._by_engine[info.engine_id] = known
            if self.layout_fingerprint is None:
                self.layout_fingerprint = known.fingerprint
            log.info("endpoint added: %s %s engine %s", info.role, info.address, info.engine_id)
        previous = self._by_address.get(info.address)
        if previous is not None and previous != info.engine_id:
            self.remove(previous, reason="replaced")
        self._by_address[info.address] = info.engine_id
        self._rebuild_roles()
        return known

    def remove(self, engine_id: str, *, reason: str = "deregistered") -> Endpoint | None:
        endpoint = self._by_engine.pop(engine_id, None)
        if endpoint is None:
            return None
        if self._by_address.get(endpoint.address) == engine_id:
            del self._by_address[endpoint.address]
        if not self._by_engine:
            self.layout_fingerprint = None
        if reason == "dead":
            self._tombstones[engine_id] = endpoint.seen_at
            if len(self._tombstones) > 4096:
                del self._tombstones[next(iter(self._tombstones))]
        self._rebuild_roles()
        log.info("endpoint removed (%s): %s %s engine %s", reason, endpoint.role, endpoint.address, engine_id)
        for listener in self._listeners:
            listener(endpoint, reason)
        return endpoint

    def replace_all(self, infos: Iterable[WorkerInfo]) -> list[IncompatibleWorkerError]:
        """Make the pool equal to a discovery snapshot. Incompatible workers are left out and
        their errors returned, so one bad worker does not stop the others from registering."""
        errors: list[IncompatibleWorkerError] = []
        listed: set[str] = set()
        self._batching = True  # one rebuild of the roles for the whole snapshot
        try:
            for info in infos:
                try:
                    self.upsert(info)
                except IncompatibleWorkerError as exc:
                    log.error("%s", exc)
                    errors.append(exc)
                    continue
                listed.add(info.engine_id)
        finally:
            self._batching = False
            self._rebuild_roles()
        for engine_id in [e for e in self._by_engine if e not in listed]:
            self.remove(engine_id, reason="gone from discovery")
        return errors

    def on_load(self, listener: Callable[[Endpoint], None]) -> None:
        """Call `listener(endpoint)` after every load signal (flow control dispatches on it)."""
        self._load_listeners.append(listener)

    def on_remove(self, listener: RemovalListener) -> None:
        """Call `listener(endpoint, reason)` whenever an endpoint leaves the pool."""
        self._listeners.append(listener)

    # -- signals ----------------------------------------------------------------------------

    def update_load(self, engine_id: str, load: EngineLoad, *, at: float | None = None,
                    as_of: float | None = None) -> None:
        """A fresh load signal, received at `at` (default: now), describing the worker as of
        wall-clock time `as_of` (a report's send time; default: now): the picks booked before
        then are counted in it."""
        endpoint = self._by_engine.get(engine_id)
        if endpoint is None:
            return
        if not 0.0 <= load.kv_usage <= 1.0:
            load = msgspec.structs.replace(load, kv_usage=min(max(load.kv_usage, 0.0), 1.0))
        endpoint.signal(load, self.clock() if at is None else at, self.wall() if as_of is None else as_of)
        for listener in self._load_listeners:
            listener(endpoint)

    def touch(self, engine_id: str) -> None:
        """The worker answered something (a KV event, a health check) without a load signal."""
        endpoint = self._by_engine.get(engine_id)
        if endpoint is not None:
            endpoint.seen_at = self.clock()

    def sweep(self) -> list[Endpoint]:
        """Remove every endpoint silent for `forget_after_s`; return them."""
        now = self.clock()
        dead = [e for e in self._by_engine.values() if e.silence(now) > self.forget_after_s]
        for endpoint in dead:
            self.remove(endpoint.engine_id, reason="dead")
        return dead

    # -- queries ----------------------------------------------------------------------------

    def endpoints(self, role: Role | None = None, *, include_dead: bool = False) -> list[Endpoint]:
        members = list(self._by_engine.values()) if role is None else self._by_role[role]
        if include_dead:
            return list(members)
        oldest = self.clock() - self.dead_after_s
        return [e for e in members if e.seen_at >= oldest]

    def live(self, role: Role, now: float) -> list[Endpoint]:
        """The live endpoints of one role, for a pick."""
        oldest = now - self.dead_after_s
        return [e for e in self._by_role[role] if e.seen_at >= oldest]

    def dead_endpoints(self, role: Role) -> list[Endpoint]:
        """Endpoints silent past `dead_after_s` but not yet forgotten, most recently seen first."""
        oldest = self.clock() - self.dead_after_s
        return sorted((e for e in self._by_role[role] if e.seen_at < oldest), key=lambda e: -e.seen_at)

    def order(self, role: Role) -> LoadOrder:
        """The role's endpoints by queue length (dead ones included: callers check liveness)."""
        return self._orders[role]

    def alive(self, endpoint: Endpoint, now: float) -> bool:
        return endpoint.seen_at >= now - self.dead_after_s

    def _rebuild_roles(self) -> None:
        if self._batching:
            return
        self._by_role = {"prefill": [], "decode": []}
        for e in self._by_engine.values():
            self._by_role.setdefault(e.role, []).append(e)
        for order in self._orders.values():
            order.release()
        self._orders = {role: LoadOrder(members) for role, members in self._by_role.items()}

    def get(self, engine_id: str) -> Endpoint | None:
        return self._by_engine.get(engine_id)

    def by_address(self, address: str) -> Endpoint | None:
        engine_id = self._by_address.get(address)
        return self._by_engine.get(engine_id) if engine_id else None

    def freshness(self, endpoint: Endpoint, now: float) -> float:
        """1.0 while the load signal is younger than `stale_after_s`, then falling linearly to
        0.0 at `dead_after_s`: a stale endpoint loses score before it leaves the pool."""
        age = endpoint.signal_age(now)
        if age <= self.stale_after_s:
            return 1.0
        span = self.dead_after_s - self.stale_after_s
        if span <= 0:
            return 0.0
        return max(0.0, 1.0 - (age - self.stale_after_s) / span)

    def snapshot(self, now: float | None = None) -> list[dict]:
        """Every live endpoint with its load and how fresh that knowledge is (`GET /v1/pool`)."""
        now = self.clock() if now is None else now
        return [
            {"role": e.role, "address": e.address, "engine_id": e.engine_id, **msgspec.structs.asdict(e.load),
             "signal_age_s": round(e.signal_age(now), 3), "silence_s": round(e.silence(now), 3)}
            for e in self.endpoints()
        ]

    def __len__(self) -> int:
        return len(self._by_engine)

    def __contains__(self, engine_id: object) -> bool:
        return engine_id in self._by_engine

    # -- compatibility ----------------------------------------------------------------------

    def _check_compatible(self, info: WorkerInfo) -> None:
        if info.model != self.model:
            raise IncompatibleWorkerError(
                f"worker {info.address} (engine {info.engine_id}) serves model {info.model!r}, "
                f"but this pool serves {self.model!r}"
            )
        if info.layout.block_size != self.block_size:
            raise IncompatibleWorkerError(
                f"worker {info.address} (engine {info.engine_id}) has KV block size "
                f"{info.layout.block_size}, but this pool hashes prompts in blocks of {self.block_size}"
            )
        fingerprint = info.layout.fingerprint()
        if self.layout_fingerprint is not None and fingerprint != self.layout_fingerprint:
            reference = next(iter(self._by_engine.values()), None)
            theirs = reference.info.layout.model_dump() if reference else {}
            raise IncompatibleWorkerError(
                f"worker {info.address} (engine {info.engine_id}) has KV layout {fingerprint} "
                f"{info.layout.model_dump()}, but this pool's layout is {self.layout_fingerprint} {theirs}: "
                "prefill and decode must agree on model, dtype, block size, heads, head dim and TP"
            )
