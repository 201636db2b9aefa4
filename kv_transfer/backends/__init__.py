"""Transfer backends, chosen by name; `auto` prefers nixl, then ucxx, then tcp."""

from __future__ import annotations

import importlib.util
import sys

from kv_transfer.backends.base import Backend, Op, XferState

PREFERENCE = ("nixl", "ucxx", "tcp")
_MODULES = {"nixl": "nixl_cu12", "ucxx": "ucxx"}


def available_backends() -> list[str]:
    """Backends whose transport library is installed, in preference order."""
    out = []
    for name in PREFERENCE:
        module = _MODULES.get(name)
        if module is None or importlib.util.find_spec(module) is not None:
            out.append(name)
    return out


def resolve_backend_name(name: str) -> str:
    """`auto` -> the preferred installed backend. NIXL bundles its own UCX and ucxx links
    libucx-cu12: a process that already loaded one keeps to it (two UCX copies do not mix)."""
    if name != "auto":
        if name not in PREFERENCE:
            raise ValueError(f"unknown KV transfer backend {name!r}; choose from auto, {', '.join(PREFERENCE)}")
        return name
    if "ucxx" in sys.modules and "nixl_cu12" not in sys.modules and "ucxx" in available_backends():
        return "ucxx"
    return available_backends()[0]


def create_backend(name: str, agent_name: str, host: str = "127.0.0.1") -> Backend:
    name = resolve_backend_name(name)
    if name == "nixl":
        from kv_transfer.backends.nixl import NixlBackend
        return NixlBackend(agent_name, host)
    if name == "ucxx":
        from kv_transfer.backends.ucxx import UcxxBackend
        return UcxxBackend(agent_name, host)
    from kv_transfer.backends.tcp import TcpBackend
    return TcpBackend(agent_name, host)


__all__ = ["Backend", "Op", "XferState", "PREFERENCE", "available_backends", "create_backend",
           "resolve_backend_name"]
