"""Why a pick or a registration was refused. The EPP maps each to an HTTP status."""

from __future__ import annotations


class RoutingError(Exception):
    """Base of every error the scheduler raises on purpose."""


class NoEndpointError(RoutingError):
    """Nothing in the pool can serve this request (none alive, none in the subset hint,
    or the model is not served here). The gateway answers 503."""


class OverloadedError(RoutingError):
    """Candidates exist but every one is saturated: shed the request. The gateway answers 429."""


class IncompatibleWorkerError(RoutingError, ValueError):
    """A worker's model or KV layout differs from its pool's: its blocks would mean something
    else to its peers, so it is refused at registration."""
