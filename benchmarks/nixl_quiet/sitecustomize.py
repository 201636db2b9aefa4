"""Put this directory on PYTHONPATH to make every NIXL agent of the process wait for UCX events
with a 1 ms poll timeout instead of 0 (NIXL's Python API hard-codes `pthrDelay = 0`).

NIXL's UCX progress thread arms its workers and then poll()s their event fds with that delay as
the timeout (the timeout is a safety net: the fds wake it when traffic arrives). With 0 the
poll returns at once and the thread spins at ~100% of a core for as long as the agent lives,
idle or not. vLLM 0.32's NixlConnector cannot change it, so each of its engines keeps a core
busy; on a 2-core machine that is the very core of the other engine. The benchmark's peer stacks
run with this. The thread must stay: on TCP, UCX emulates a remote READ with messages the target
has to progress, and an idle prefill engine never would (turning the thread off hangs the
hand-off). Our own backend instead waits on the same event fds from its asyncio loop.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

_TARGETS = ("nixl_cu12._api", "nixl_cu13._api", "nixl_rocm._api")


POLL_TIMEOUT_US = 1000


def _quiet(module: Any) -> None:
    bindings = module.nixlBind
    create_agent = bindings.nixlAgent

    def nixlAgent(name: str, config: Any) -> Any:
        config.pthrDelay = max(config.pthrDelay, POLL_TIMEOUT_US)
        return create_agent(name, config)

    bindings.nixlAgent = nixlAgent
    print(f"nixl_quiet: {module.__name__} progress threads poll with a {POLL_TIMEOUT_US} us timeout",
          file=sys.stderr, flush=True)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.inner.exec_module(module)
        _quiet(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches the NIXL API module right after it is first imported (importing it here, at
    start-up, would load NIXL into every Python process of the stack)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


sys.meta_path.insert(0, _Finder())
