"""Errors a transfer can end in. Each says which rule refused what, so a caller can recompute."""

from __future__ import annotations


class TransferError(RuntimeError):
    """A transfer failed or was refused; nothing the caller should use came of it."""


class AccessError(TransferError):
    """A descriptor falls outside memory the owning agent registered (or still has registered).

    Raised before anything is posted, on the initiator, and by two-sided targets before they
    touch memory.
    """


class LeaseError(TransferError):
    """The lease covering the remote blocks expired, was released, or never existed."""


class PeerError(TransferError):
    """The remote agent is unknown, unreachable, restarted, or speaks another backend."""


class LayoutMismatch(TransferError):
    """Two engines' KV layouts differ: their blocks do not mean the same thing."""
