"""Leases: how long a target keeps memory it handed to a peer, and the generation check.

A target grants a lease over blocks it hands off, keeps them until the peer acknowledges or the
lease expires, and then frees them. A peer's read is only good if the lease was still held when
the read completed: the peer confirms with the target after completion, and a confirmation that
arrives after expiry (or names an older generation of the lease) fails, so the peer recomputes
instead of using KV that may have been overwritten.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from dataclasses import dataclass, replace
from enum import Enum

DEFAULT_LEASE_S = 30.0


class LeaseStatus(str, Enum):
    HELD = "held"          # valid (returned by checks and renewals)
    RELEASED = "released"  # the peer acknowledged; valid up to that moment
    EXPIRED = "expired"    # the lease ran out before the peer acknowledged
    UNKNOWN = "unknown"    # never granted here, or granted by an earlier incarnation


@dataclass(frozen=True)
class LeaseToken:
    """What a peer holds: the lease id and the generation it was granted at."""

    lease_id: str
    generation: int


@dataclass(frozen=True)
class Lease:
    """A granted lease. `expires_at` is wall-clock (time.time()) so it can cross processes."""

    token: LeaseToken
    expires_at: float
    ttl_s: float
    key: str = ""

    @property
    def lease_id(self) -> str:
        return self.token.lease_id

    @property
    def generation(self) -> int:
        return self.token.generation

    def remaining_s(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)


@dataclass(frozen=True)
class LeaseEvent:
    """A lease that ended: released by the peer, or expired."""

    lease: Lease
    status: LeaseStatus


class LeaseTable:
    """Leases one agent granted. Thread-safe: the control channel's threads acknowledge leases
    while the owner grants them and collects ended ones.

    Lifecycle: `grant` (or `hold`, with an id and generation chosen elsewhere) -> `renew`* ->
    `release` by the peer's acknowledgement, or expiry noticed by `expire_due`. Each ended lease
    is queued once for `take_events`, which is how the owner learns it may free the memory.
    """

    def __init__(self, default_ttl_s: float = DEFAULT_LEASE_S) -> None:
        self.default_ttl_s = default_ttl_s
        self._held: dict[str, Lease] = {}
        self._ended: dict[str, LeaseEvent] = {}
        self._events: list[LeaseEvent] = []
        self._cond = threading.Condition()
        self._prefix = uuid.uuid4().hex[:8]
        self._seq = itertools.count(1)

    def grant(self, ttl_s: float | None = None, key: str = "") -> Lease:
        """A new lease with a fresh id and generation."""
        n = next(self._seq)
        return self.hold(LeaseToken(f"{self._prefix}-{n}", n), ttl_s=ttl_s, key=key)

    def hold(self, token: LeaseToken, ttl_s: float | None = None, key: str = "",
             expires_at: float | None = None) -> Lease:
        """Start holding under a token chosen by someone else (e.g. vLLM's scheduler process)."""
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        lease = Lease(token, expires_at if expires_at is not None else time.time() + ttl, ttl, key)
        with self._cond:
            old = self._held.get(token.lease_id)
            if old is not None and old.generation > token.generation:
                raise ValueError(f"lease {token.lease_id} is already held at a newer generation")
            self._ended.pop(token.lease_id, None)
            self._held[token.lease_id] = lease
            self._cond.notify_all()
        return lease

    def renew(self, token: LeaseToken, ttl_s: float | None = None) -> tuple[LeaseStatus, Lease | None]:
        with self._cond:
            self._expire_locked(time.time())
            lease = self._current(token)
            if lease is None:
                return self._why_not(token), None
            ttl = lease.ttl_s if ttl_s is None else ttl_s
            lease = replace(lease, expires_at=time.time() + ttl, ttl_s=ttl)
            self._held[token.lease_id] = lease
            return LeaseStatus.HELD, lease

    def check(self, token: LeaseToken, release: bool = False, wait_s: float = 0.0) -> LeaseStatus:
        """HELD if the lease is valid now (RELEASED if `release` ended it just now), else why not.

        `wait_s` covers a grant racing the peer: the peer may learn the token before the owner's
        bookkeeping has recorded it.
        """
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                self._expire_locked(time.time())
                lease = self._current(token)
                if lease is not None:
                    if not release:
                        return LeaseStatus.HELD
                    del self._held[token.lease_id]
                    self._end_locked(lease, LeaseStatus.RELEASED)
                    return LeaseStatus.RELEASED
                status = self._why_not(token)
                left = deadline - time.monotonic()
                if status is not LeaseStatus.UNKNOWN or left <= 0:
                    return status
                self._cond.wait(left)

    def release(self, token: LeaseToken) -> LeaseStatus:
        return self.check(token, release=True)

    def revoke(self, lease_id: str) -> Lease | None:
        """The owner ends a lease itself (e.g. the request was aborted); no event is queued."""
        with self._cond:
            lease = self._held.pop(lease_id, None)
            if lease is not None:
                self._ended[lease_id] = LeaseEvent(lease, LeaseStatus.RELEASED)
            return lease

    def expire_due(self, now: float | None = None) -> list[Lease]:
        with self._cond:
            return self._expire_locked(time.time() if now is None else now)

    def take_events(self) -> list[LeaseEvent]:
        """Leases that ended since the last call, each reported once. Expires due leases first."""
        with self._cond:
            self._expire_locked(time.time())
            events, self._events = self._events, []
            return events

    def held(self) -> list[Lease]:
        with self._cond:
            return list(self._held.values())

    def _current(self, token: LeaseToken) -> Lease | None:
        lease = self._held.get(token.lease_id)
        if lease is None or lease.generation != token.generation:
            return None
        return lease

    def _why_not(self, token: LeaseToken) -> LeaseStatus:
        ended = self._ended.get(token.lease_id)
        if ended is not None and ended.lease.generation == token.generation:
            return ended.status
        held = self._held.get(token.lease_id)
        if held is not None:
            # Same id, other generation: the blocks were handed out again since.
            return LeaseStatus.EXPIRED
        return LeaseStatus.UNKNOWN

    def _expire_locked(self, now: float) -> list[Lease]:
        due = [lease for lease in self._held.values() if lease.expires_at <= now]
        for lease in due:
            del self._held[lease.lease_id]
            self._end_locked(lease, LeaseStatus.EXPIRED)
        return due

    def _end_locked(self, lease: Lease, status: LeaseStatus) -> None:
        event = LeaseEvent(lease, status)
        self._ended[lease.lease_id] = event
        self._events.append(event)
        # Remember ended leases long enough to answer late confirmations, not forever.
        if len(self._ended) > 100_000:
            for key in list(self._ended)[:50_000]:
                del self._ended[key]
