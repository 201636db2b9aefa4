"""An Agent in a child process, driven over a pipe: the transfer benchmark's process harness
(`disagg bench transfer`), which the cross-process conformance tests use too. It puts two agents
in two real processes and keeps each process to one UCX copy.

The parent calls `AgentProcess.call(method, *args)`; the child runs `AgentOps.<method>` and sends
back the result, or the exception's type name and message.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from kv_transfer.agent import Agent, XferHandle
from kv_transfer.descriptors import DescList, paired_coalesce
from kv_transfer.backends import XferState
from kv_transfer.lease import LeaseToken


class PeerCallError(RuntimeError):
    """A call failed in the child; `kind` is the exception's class name there."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def pattern(nbytes: int, seed: int) -> np.ndarray:
    """Deterministic bytes both processes can compute, for bit-exact checks."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


class AgentOps:
    """What the child can do: own buffers, an Agent, and timed transfer loops."""

    def __init__(self, name: str, backend: str, lease_ttl_s: float) -> None:
        self.agent = Agent(name, backend, lease_ttl_s=lease_ttl_s)
        self.buffers: dict[str, np.ndarray] = {}
        self.registrations: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        return {"name": self.agent.name, "backend": self.agent.backend_name, "address": self.agent.address,
                "pid": os.getpid()}

    def alloc(self, key: str, nbytes: int, seed: int | None = None, register: bool = True) -> int:
        buf = pattern(nbytes, seed) if seed is not None else np.zeros(nbytes, dtype=np.uint8)
        buf[:] = buf  # touch every page now, not during a timed transfer
        self.buffers[key] = buf
        if register:
            self.registrations[key] = self.agent.register_memory(buf)
        return int(buf.ctypes.data)

    def deregister(self, key: str) -> None:
        self.agent.deregister_memory(self.registrations.pop(key))

    def fill(self, key: str, value: int) -> None:
        self.buffers[key][:] = value

    def digest(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        buf = self.buffers[key]
        end = len(buf) if length is None else offset + length
        return buf[offset:end].tobytes()

    def fetch(self, host: str, port: int) -> str:
        return self.agent.fetch_remote_metadata(host, port)

    def grant_lease(self, ttl_s: float) -> tuple[str, int, float]:
        lease = self.agent.grant_lease(ttl_s)
        return lease.lease_id, lease.generation, lease.expires_at

    def lease_events(self) -> list[tuple[str, str]]:
        return [(e.lease.lease_id, e.status.value) for e in self.agent.take_lease_events()]

    def notifs(self, wait_s: float = 2.0, want: int = 1) -> dict[str, list[bytes]]:
        got: dict[str, list[bytes]] = {}
        deadline = time.monotonic() + wait_s
        while True:
            for k, v in self.agent.get_new_notifs().items():
                got.setdefault(k, []).extend(v)
            if sum(len(v) for v in got.values()) >= want or time.monotonic() > deadline:
                return got
            time.sleep(0.001)

    def send_notif(self, remote: str, msg: bytes) -> None:
        self.agent.send_notif(remote, msg)

    def _descs(self, key: str, spans: list[tuple[int, int]] | None) -> DescList:
        base = int(self.buffers[key].ctypes.data)
        if spans is None:
            return DescList.from_descs([(base, self.buffers[key].nbytes)])
        return DescList.from_descs([(base + off, n) for off, n in spans])

    def transfer(self, op: str, local_key: str, local_spans: list[tuple[int, int]] | None,
                 remote: str, remote_rows: list[tuple[int, int]], notif: bytes = b"",
                 lease: tuple[str, int, float] | None = None, release_lease: bool = False,
                 timeout_s: float = 30.0, coalesce: bool = False) -> dict[str, Any]:
        """One transfer, waited for. Returns {"state", "error_kind", "error"} instead of raising."""
        local = self._descs(local_key, local_spans)
        remote_descs = DescList.from_descs(remote_rows)
        if coalesce:
            local, remote_descs = paired_coalesce(local, remote_descs)
        token = None if lease is None else LeaseToken(lease[0], lease[1])
        try:
            h = self.agent.initialize_xfer(op, local, remote_descs, remote, notif, lease=token,  # type: ignore[arg-type]
                                           lease_expires_at=None if lease is None else lease[2],
                                           release_lease=release_lease)
        except Exception as e:
            return {"state": "REFUSED", "error_kind": type(e).__name__, "error": str(e)}
        self.agent.transfer(h)
        try:
            self.agent.wait_xfer_sync(h, timeout_s)
            out = {"state": "DONE", "error_kind": None, "error": None}
        except Exception as e:
            out = {"state": h.state.value, "error_kind": type(e).__name__, "error": str(e)}
        self.agent.release_xfer_handle(h)
        return out

    def raw_post(self, op: str, local_key: str, local_spans: list[tuple[int, int]] | None, remote: str,
                 remote_rows: list[tuple[int, int]], timeout_s: float = 10.0) -> dict[str, Any]:
        """Post straight to the backend, skipping every check the Agent makes on this side: what
        a buggy or hostile peer could do. Only the target (or NIXL itself) can refuse it."""
        backend = self.agent._backend  # noqa: SLF001 - deliberately bypassing the Agent
        local = self._descs(local_key, local_spans)
        try:
            handle = backend.post(op, local, DescList.from_descs(remote_rows), remote, b"")  # type: ignore[arg-type]
        except Exception as e:
            return {"state": "ERR", "error": f"{type(e).__name__}: {e}"}
        deadline = time.monotonic() + timeout_s
        while True:
            state, reason = backend.state(handle)
            if state is not XferState.PROC or time.monotonic() > deadline:
                backend.release(handle)
                return {"state": state.value, "error": reason}
            time.sleep(0.0005)

    def timed(self, op: str, local_key: str, local_spans: list[tuple[int, int]] | None, remote: str,
              remote_rows: list[tuple[int, int]], iters: int, coalesce: bool = False) -> list[float]:
        """Seconds per transfer, each built, posted, waited and released like a caller would."""
        local = self._descs(local_key, local_spans)
        remote_descs = DescList.from_descs(remote_rows)
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            lo, ro = (local, remote_descs)
            if coalesce:
                lo, ro = paired_coalesce(local, remote_descs)
            h = self.agent.initialize_xfer(op, lo, ro, remote)  # type: ignore[arg-type]
            self.agent.transfer(h)
            self.agent.wait_xfer_sync(h, 60)
            self.agent.release_xfer_handle(h)
            out.append(time.perf_counter() - t0)
        return out

    def close(self) -> None:
        self.agent.close()


def _serve(conn: Connection, name: str, backend: str, lease_ttl_s: float, env: dict[str, str],
           ops_factory: Any) -> None:
    os.environ.update(env)
    try:
        ops = ops_factory(name, backend, lease_ttl_s)
        conn.send(("ok", ops.info()))
    except Exception as e:
        conn.send(("err", (type(e).__name__, f"{e}\n{traceback.format_exc()}")))
        return
    while True:
        try:
            method, args, kwargs = conn.recv()
        except EOFError:
            break
        if method == "__exit__":
            ops.close()
            conn.send(("ok", None))
            break
        try:
            conn.send(("ok", getattr(ops, method)(*args, **kwargs)))
        except Exception as e:
            conn.send(("err", (type(e).__name__, f"{e}\n{traceback.format_exc()}")))


class AgentProcess:
    """Start an Agent in a fresh (spawned) process and call it."""

    def __init__(self, name: str, backend: str, *, lease_ttl_s: float = 30.0, env: dict[str, str] | None = None,
                 ops_factory: Any = AgentOps, start_timeout_s: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, name, backend, lease_ttl_s, dict(env or {}),
                                                        ops_factory), daemon=True, name=f"agent-{name}")
        self.process.start()
        child.close()
        if not self._conn.poll(start_timeout_s):
            self.kill()
            raise TimeoutError(f"agent process {name} did not start in {start_timeout_s} s")
        status, value = self._conn.recv()
        if status != "ok":
            self.kill()
            raise PeerCallError(*value)
        self.info: dict[str, Any] = value
        self.name: str = value["name"]
        self.address: tuple[str, int] = tuple(value["address"])  # type: ignore[assignment]

    @property
    def pid(self) -> int:
        return int(self.process.pid or 0)

    def call(self, method: str, *args: Any, timeout_s: float = 120.0, **kwargs: Any) -> Any:
        self._conn.send((method, args, kwargs))
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"{self.name}.{method} did not answer in {timeout_s} s")
        status, value = self._conn.recv()
        if status != "ok":
            raise PeerCallError(*value)
        return value

    def close(self, timeout_s: float = 10.0) -> None:
        if self.process.is_alive():
            try:
                self.call("__exit__", timeout_s=timeout_s)
            except Exception:
                pass
            self.process.join(timeout_s)
        self.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def __enter__(self) -> "AgentProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
