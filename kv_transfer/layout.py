"""The KV cache layout both sides of a transfer must share, and its fingerprint."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict


class KVLayout(BaseModel):
    """What decides whether one engine's KV blocks mean the same thing in another engine."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_size: int = 1

    def fingerprint(self) -> str:
        """A short stable id: equal fingerprints mean blocks can move between the two engines."""
        text = "|".join(
            str(v) for v in (self.model, self.dtype, self.block_size, self.num_layers,
                             self.num_kv_heads, self.head_dim, self.tp_size)
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]
