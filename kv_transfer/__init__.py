"""A NIXL-compatible KV transfer layer over UCX; runs without Ray or vLLM."""

from kv_transfer.layout import KVLayout

__all__ = ["KVLayout"]
