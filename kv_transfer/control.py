"""The control channel: a small framed request/reply protocol over TCP beside the data path.

It carries what one-sided RMA cannot: metadata fetches, lease confirmations and renewals, and
region-table pushes from a target to the peers that may access it. Each connection has a reader
thread, so pushes are applied and acknowledged even while the owner is busy or idle.

Frame: 4-byte big-endian length, then msgpack {"kind": "req"|"rep"|"push"|"ack", "seq": int,
"body": {...}}.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import msgspec

from kv_transfer.errors import PeerError

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
_MAX_FRAME = 64 << 20
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode

# Handles one request body; returns the reply body.
RequestHandler = Callable[["Connection", dict[str, Any]], dict[str, Any]]
# Applies one pushed body; returns the acknowledgement body.
PushHandler = Callable[[dict[str, Any]], dict[str, Any]]


class Connection:
    """One framed TCP connection. `send` is thread-safe; `recv` belongs to the reader thread."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.peer_name = ""
        self._send_lock = threading.Lock()
        self.closed = threading.Event()

    def send(self, kind: str, seq: int, body: dict[str, Any]) -> None:
        data = _encode({"kind": kind, "seq": seq, "body": body})
        with self._send_lock:
            try:
                self.sock.sendall(_LEN.pack(len(data)) + data)
            except OSError as e:
                self.close()
                raise PeerError(f"control connection to {self.peer_name or 'peer'} lost: {e}") from e

    def recv(self) -> dict[str, Any] | None:
        head = self._read(_LEN.size)
        if head is None:
            return None
        (n,) = _LEN.unpack(head)
        if n > _MAX_FRAME:
            raise PeerError(f"control frame of {n} bytes refused")
        data = self._read(n)
        return None if data is None else _decode(data)

    def _read(self, n: int) -> bytes | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except OSError:
                return None
            if k == 0:
                return None
            got += k
        return bytes(buf)

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


class ControlServer:
    """Accepts peers and answers their requests; pushes updates to subscribed peers."""

    def __init__(self, host: str, port: int, handler: RequestHandler) -> None:
        self._handler = handler
        self._listener = socket.create_server((host, port), reuse_port=False)
        self.host = host
        self.port = int(self._listener.getsockname()[1])
        self._conns: set[Connection] = set()
        self._subscribers: set[Connection] = set()
        self._acks: dict[tuple[int, int], threading.Event] = {}
        self._lock = threading.Lock()
        self._push_seq = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="kv-control-accept", daemon=True)
        self._thread.start()

    def subscribe(self, conn: Connection) -> None:
        with self._lock:
            self._subscribers.add(conn)

    def push(self, body: dict[str, Any], timeout_s: float) -> list[str]:
        """Send `body` to every subscriber and wait for each acknowledgement.

        A subscriber that does not acknowledge in time is disconnected, which its side treats as
        losing the peer. Returns the names of the peers dropped that way.
        """
        with self._lock:
            self._push_seq += 1
            seq = self._push_seq
            targets = list(self._subscribers)
            waits = {c: self._acks.setdefault((id(c), seq), threading.Event()) for c in targets}
        dropped: list[str] = []
        for conn in targets:
            try:
                conn.send("push", seq, body)
            except PeerError:
                waits.pop(conn)
                self._forget(conn)
        for conn, event in waits.items():
            if not event.wait(timeout_s):
                log.warning("peer %s did not acknowledge a region update; disconnecting it", conn.peer_name)
                dropped.append(conn.peer_name)
                conn.close()
                self._forget(conn)
            with self._lock:
                self._acks.pop((id(conn), seq), None)
        return dropped

    def close(self) -> None:
        self._stopped.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close()

    def _forget(self, conn: Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
            self._subscribers.discard(conn)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            conn = Connection(sock)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="kv-control-conn", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        try:
            while True:
                frame = conn.recv()
                if frame is None:
                    return
                kind, seq, body = frame.get("kind"), int(frame.get("seq", 0)), frame.get("body") or {}
                if kind == "ack":
                    with self._lock:
                        event = self._acks.get((id(conn), seq))
                    if event is not None:
                        event.set()
                    continue
                try:
                    reply = self._handler(conn, body)
                except Exception as e:  # a bad request must not take the server down
                    log.debug("control request failed", exc_info=True)
                    reply = {"error": f"{type(e).__name__}: {e}"}
                conn.send("rep", seq, reply)
        except PeerError:
            pass
        finally:
            conn.close()
            self._forget(conn)


class ControlClient:
    """A connection to one peer's control server: calls with replies, and pushes applied."""

    def __init__(self, host: str, port: int, on_push: PushHandler, timeout_s: float = 5.0,
                 on_lost: Callable[["ControlClient"], None] | None = None) -> None:
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as e:
            raise PeerError(f"cannot reach agent control channel {host}:{port}: {e}") from e
        sock.settimeout(None)
        self.address = (host, port)
        self.conn = Connection(sock)
        self._on_push = on_push
        self._on_lost = on_lost
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._thread = threading.Thread(target=self._read_loop, name="kv-control-client", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self.conn.closed.is_set()

    def call_async(self, body: dict[str, Any]) -> Future[dict[str, Any]]:
        fut: Future[dict[str, Any]] = Future()
        with self._lock:
            if not self.alive:
                fut.set_exception(PeerError(f"control connection to {self.address} is closed"))
                return fut
            self._seq += 1
            seq = self._seq
            self._pending[seq] = fut
        try:
            self.conn.send("req", seq, body)
        except PeerError as e:
            with self._lock:
                self._pending.pop(seq, None)
            fut.set_exception(e)
        return fut

    def call(self, body: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
        fut = self.call_async(body)
        try:
            reply = fut.result(timeout=timeout_s)
        except TimeoutError as e:
            raise PeerError(f"agent at {self.address} did not answer in {timeout_s} s") from e
        if "error" in reply:
            raise PeerError(f"agent at {self.address} refused: {reply['error']}")
        return reply

    def close(self) -> None:
        self.conn.close()

    def _read_loop(self) -> None:
        try:
            while True:
                frame = self.conn.recv()
                if frame is None:
                    break
                kind, seq, body = frame.get("kind"), int(frame.get("seq", 0)), frame.get("body") or {}
                if kind == "rep":
                    with self._lock:
                        fut = self._pending.pop(seq, None)
                    if fut is not None:
                        fut.set_result(body)
                elif kind == "push":
                    try:
                        ack = self._on_push(body)
                    except Exception:
                        log.exception("applying a pushed update failed")
                        break  # not acknowledging makes the target drop us: safe
                    self.conn.send("ack", seq, ack)
        except PeerError:
            pass
        finally:
            self.conn.close()
            with self._lock:
                pending, self._pending = self._pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(PeerError(f"control connection to {self.address} lost"))
            if self._on_lost is not None:
                self._on_lost(self)
