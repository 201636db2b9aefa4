"""The reference backend: two-sided transfers over asyncio TCP sockets.

The initiator sends a request naming the target's descriptors; the target checks them against
its live region table before touching memory, then streams the bytes (READ) or receives them
(WRITE; a refused WRITE's payload is drained into nothing, so the stream stays in step).
Notifications ride on the request and are queued on the target after the data moved.

Wire: frame = 4-byte big-endian length + msgpack header; payload bytes follow raw.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections import defaultdict
from concurrent.futures import Future
from typing import Any

import msgspec

from kv_transfer.backends.base import AccessGuard, Backend, Op, XferState
from kv_transfer.backends.loop_thread import LoopThread
from kv_transfer.descriptors import DescList, span_view
from kv_transfer.errors import AccessError, PeerError, TransferError

_LEN = struct.Struct(">I")
_MAX_HEADER = 64 << 20
_DRAIN_CHUNK = 1 << 20


class TcpBackend(Backend):
    name = "tcp"
    one_sided = False

    def start(self, access: AccessGuard) -> None:
        self._access = access
        self._loop_thread = LoopThread(f"kv-tcp-{self.agent_name}")
        self._loop = self._loop_thread.loop
        self._listener = socket.create_server((self.host, 0))
        self._listener.setblocking(False)
        self._port = int(self._listener.getsockname()[1])
        self._peers: dict[str, tuple[str, int]] = {}
        self._idle: dict[str, list[socket.socket]] = defaultdict(list)  # loop thread only
        self._notifs: dict[str, list[bytes]] = defaultdict(list)
        self._notif_lock = threading.Lock()
        self._serving: set[asyncio.Task[None]] = set()
        self._accept_task = self._loop_thread.run(self._start_accepting())

    async def _start_accepting(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._accept_loop())

    def metadata(self) -> bytes:
        return msgspec.msgpack.encode({"host": self.host, "port": self._port})

    def register(self, descs: DescList) -> Any:
        return None  # the target serves accesses itself: nothing to pin or export

    def deregister(self, handle: Any) -> None:
        return None

    def add_peer(self, name: str, metadata: bytes) -> None:
        info = msgspec.msgpack.decode(metadata)
        self._peers[name] = (str(info["host"]), int(info["port"]))
        self._loop.call_soon_threadsafe(self._drop_idle, name)

    def remove_peer(self, name: str) -> None:
        self._peers.pop(name, None)
        self._loop.call_soon_threadsafe(self._drop_idle, name)

    def post(self, op: Op, local: DescList, remote: DescList, peer: str, notif: bytes) -> Future[None]:
        address = self._peers.get(peer)
        if address is None:
            raise PeerError(f"unknown peer {peer!r}")
        return self._loop_thread.submit(self._transfer(op, local, remote, peer, address, notif))

    def state(self, handle: Future[None]) -> tuple[XferState, str | None]:
        if not handle.done():
            return XferState.PROC, None
        if handle.cancelled():
            return XferState.ERR, "cancelled"
        exc = handle.exception()
        if exc is not None:
            return XferState.ERR, str(exc)
        return XferState.DONE, None

    def release(self, handle: Future[None]) -> None:
        if not handle.done():
            handle.cancel()

    def send_notif(self, peer: str, msg: bytes) -> None:
        address = self._peers.get(peer)
        if address is None:
            raise PeerError(f"unknown peer {peer!r}")
        self._loop_thread.run(self._notify(peer, address, msg), timeout_s=10)

    def take_notifs(self) -> dict[str, list[bytes]]:
        with self._notif_lock:
            out, self._notifs = dict(self._notifs), defaultdict(list)
        return out

    def close(self) -> None:
        async def shutdown() -> None:
            self._accept_task.cancel()
            for task in list(self._serving):
                task.cancel()
            for socks in self._idle.values():
                for s in socks:
                    s.close()
            self._idle.clear()
            self._listener.close()
        try:
            self._loop_thread.run(shutdown(), timeout_s=5)
        finally:
            self._loop_thread.stop()

    # -- initiator side (loop thread) --

    async def _checkout(self, peer: str, address: tuple[str, int]) -> socket.socket:
        idle = self._idle[peer]
        if idle:
            return idle.pop()
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as e:
            sock.close()
            raise PeerError(f"cannot reach peer {peer!r} at {address[0]}:{address[1]}: {e}") from e
        return sock

    def _drop_idle(self, peer: str) -> None:
        for s in self._idle.pop(peer, []):
            s.close()

    async def _transfer(self, op: Op, local: DescList, remote: DescList, peer: str,
                        address: tuple[str, int], notif: bytes) -> None:
        loop = asyncio.get_running_loop()
        sock = await self._checkout(peer, address)
        in_step = False
        try:
            await _send_frame(loop, sock, {"op": op, "from": self.agent_name, "descs": remote.to_wire(),
                                           "mem": remote.mem_type, "notif": notif,
                                           "nbytes": local.total_bytes})
            if op == "WRITE":
                for addr, length, _ in local.array.tolist():
                    await loop.sock_sendall(sock, span_view(addr, length))
                reply = await _recv_frame(loop, sock)
            else:
                reply = await _recv_frame(loop, sock)
                if reply.get("ok"):
                    for addr, length, _ in local.array.tolist():
                        await _recv_exact(loop, sock, span_view(addr, length))
            in_step = True
            if not reply.get("ok"):
                raise AccessError(f"peer {peer!r} refused: {reply.get('error')}")
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            raise PeerError(f"transfer with peer {peer!r} broke: {e}") from e
        finally:
            if in_step and self._peers.get(peer) == address:
                self._idle[peer].append(sock)
            else:
                sock.close()

    async def _notify(self, peer: str, address: tuple[str, int], msg: bytes) -> None:
        loop = asyncio.get_running_loop()
        sock = await self._checkout(peer, address)
        try:
            await _send_frame(loop, sock, {"op": "NOTIF", "from": self.agent_name, "notif": msg})
            reply = await _recv_frame(loop, sock)
            if not reply.get("ok"):
                raise TransferError(f"peer {peer!r} refused a notification: {reply.get('error')}")
            self._idle[peer].append(sock)
        except BaseException:
            sock.close()
            raise

    # -- target side (loop thread) --

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            task = loop.create_task(self._serve(sock))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    header = await _recv_frame(loop, sock)
                except (asyncio.IncompleteReadError, ConnectionError, OSError):
                    return
                await self._serve_one(loop, sock, header)
        finally:
            sock.close()

    async def _serve_one(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                         header: dict[str, Any]) -> None:
        op, peer, notif = header.get("op"), str(header.get("from", "")), header.get("notif") or b""
        if op == "NOTIF":
            self._queue_notif(peer, notif)
            await _send_frame(loop, sock, {"ok": True})
            return
        descs = DescList.from_wire(header.get("descs") or [], header.get("mem", "DRAM"))
        nbytes = int(header.get("nbytes", 0))
        try:
            access = self._access(descs)
            access.__enter__()
        except AccessError as e:
            if op == "WRITE":
                await _drain(loop, sock, nbytes)
            await _send_frame(loop, sock, {"ok": False, "error": str(e)})
            return
        try:
            if descs.total_bytes != nbytes:
                raise AccessError(f"request moves {nbytes} bytes but names {descs.total_bytes}")
            if op == "READ":
                await _send_frame(loop, sock, {"ok": True})
                for addr, length, _ in descs.array.tolist():
                    await loop.sock_sendall(sock, span_view(addr, length))
            elif op == "WRITE":
                for addr, length, _ in descs.array.tolist():
                    await _recv_exact(loop, sock, span_view(addr, length))
                await _send_frame(loop, sock, {"ok": True})
            else:
                await _send_frame(loop, sock, {"ok": False, "error": f"unknown op {op!r}"})
                return
        finally:
            access.__exit__(None, None, None)
        if notif:
            self._queue_notif(peer, notif)

    def _queue_notif(self, peer: str, msg: bytes) -> None:
        with self._notif_lock:
            self._notifs[peer].append(bytes(msg))


async def _send_frame(loop: asyncio.AbstractEventLoop, sock: socket.socket, header: dict[str, Any]) -> None:
    data = msgspec.msgpack.encode(header)
    await loop.sock_sendall(sock, _LEN.pack(len(data)) + data)


async def _recv_frame(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> dict[str, Any]:
    head = bytearray(_LEN.size)
    await _recv_exact(loop, sock, memoryview(head))
    (n,) = _LEN.unpack(head)
    if n > _MAX_HEADER:
        raise ConnectionError(f"header of {n} bytes refused")
    body = bytearray(n)
    await _recv_exact(loop, sock, memoryview(body))
    return msgspec.msgpack.decode(body)


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise asyncio.IncompleteReadError(b"", n - got)
        got += k


async def _drain(loop: asyncio.AbstractEventLoop, sock: socket.socket, nbytes: int) -> None:
    scratch = memoryview(bytearray(min(nbytes, _DRAIN_CHUNK) or 1))
    left = nbytes
    while left > 0:
        k = await loop.sock_recv_into(sock, scratch[: min(left, len(scratch))])
        if k == 0:
            raise asyncio.IncompleteReadError(b"", left)
        left -= k
