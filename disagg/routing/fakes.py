"""Stand-ins for workers, for tests and benchmarks of routing without an engine.

`FakeWorker` serves a worker's descriptor (`/v1/worker`), vLLM-named `/metrics` and `/health`
from a thread; `hang()` makes it stop answering, as a stuck process would. `FakeKVPublisher`
speaks vLLM's KV event wire protocol (PUB + ROUTER replay) from a thread.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
import zmq

from disagg.worker.protocol import EngineLoad, Role, WorkerInfo
from kv_transfer.layout import KVLayout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_layout(model: str = "tiny", block_size: int = 32, dtype: str = "float32") -> KVLayout:
    return KVLayout(model=model, dtype=dtype, block_size=block_size, num_layers=2, num_kv_heads=2, head_dim=64)


def make_info(role: Role, address: str, *, model: str = "tiny", block_size: int = 32,
              engine_id: str | None = None, node_id: str = "", **extra: Any) -> WorkerInfo:
    return WorkerInfo(
        role=role, model=model, engine_id=engine_id or f"{role}-{uuid.uuid4().hex[:8]}",
        address=address, layout=make_layout(model, block_size), node_id=node_id, num_blocks=1000, **extra,
    )


def metrics_text(load: EngineLoad, block_size: int = 32) -> str:
    labels = 'engine="0",model_name="tiny"'
    return (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{{{labels}}} {float(load.running)}\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting{{{labels}}} {float(load.waiting)}\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f"vllm:kv_cache_usage_perc{{{labels}}} {load.kv_usage}\n"
        "# TYPE vllm:cache_config_info gauge\n"
        f'vllm:cache_config_info{{block_size="{block_size}",cache_dtype="auto",engine="0",'
        f'num_gpu_blocks="{load.num_blocks}",prefix_caching_hash_algo="sha256"}} 1.0\n'
        "# TYPE vllm:prompt_tokens_total counter\n"
        f"vllm:prompt_tokens_total{{{labels}}} 123.0\n"
    )


class FakeWorker:
    def __init__(self, role: Role, *, model: str = "tiny", block_size: int = 32, node_id: str = "",
                 port: int | None = None, engine_id: str | None = None, **info_extra: Any) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.info = make_info(role, self.address, model=model, block_size=block_size,
                              engine_id=engine_id, node_id=node_id, **info_extra)
        self.load = EngineLoad(num_blocks=1000)
        self.hung = threading.Event()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()

    def start(self) -> "FakeWorker":
        worker = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                worker._connections.add(self.connection)

            def finish(self) -> None:
                worker._connections.discard(self.connection)
                super().finish()

            def _reply(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if worker.hung.is_set():
                    time.sleep(30)
                    return
                path = self.path.split("?", 1)[0]  # the scraper asks for its series by `name[]`
                if path == "/v1/worker":
                    self._reply(200, worker.info.model_dump_json().encode())
                elif path == "/metrics":
                    self._reply(200, metrics_text(worker.load, worker.info.layout.block_size).encode(), "text/plain")
                elif path == "/health":
                    self._reply(200, b"{}")
                else:
                    self._reply(404, b"{}")

            def _read_body(self) -> bytes:
                if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("content-length") or 0)
                return self.rfile.read(length) if length else b""

            def do_POST(self) -> None:
                if worker.hung.is_set():
                    time.sleep(30)
                    return
                body = self._read_body()
                worker.requests.append(("POST", self.path, dict(self.headers.items()), body))
                answer = msgspec.json.encode({"served_by": worker.address, "engine_id": worker.info.engine_id,
                                              "prefiller": self.headers.get("x-prefiller-host-port")})
                self._reply(200, answer)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def hang(self) -> None:
        self.hung.set()

    def stop(self) -> None:
        """Stop like a dead process: the listener and every open connection close."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FakeKVPublisher:
    """vLLM's ZmqEventPublisher wire protocol: PUB binds `endpoint`, ROUTER binds
    `replay_endpoint`; every published batch is kept for replay."""

    def __init__(self, *, port: int | None = None, replay_port: int | None = None, topic: str = "") -> None:
        self.port = port or free_port()
        self.replay_port = replay_port or free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.replay_endpoint = f"tcp://127.0.0.1:{self.replay_port}"
        self.topic = topic.encode()
        self._seq = itertools.count()
        self._buffer: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(f"tcp://127.0.0.1:{self.port}")
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(f"tcp://127.0.0.1:{self.replay_port}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_replay, daemon=True)
        self._thread.start()

    def publish(self, events: list[dict[str, Any]], *, send: bool = True) -> int:
        """Publish one batch (each event a dict with "type"); `send=False` only buffers it, as if
        the live message were lost. Returns its sequence number."""
        payload = msgspec.msgpack.encode([time.time(), events, None])
        with self._lock:
            seq = next(self._seq)
            self._buffer.append((seq, payload))
            if send:
                self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def _serve_replay(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            client, _, start = self._router.recv_multipart()
            first = int.from_bytes(start, "big")
            with self._lock:
                for seq, payload in self._buffer:
                    if seq >= first:
                        self._router.send_multipart([client, b"", self.topic, seq.to_bytes(8, "big"), payload])
                self._router.send_multipart([client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pub.close()
        self._router.close()
        self._ctx.term()


def block_stored(block_hashes: list[int], token_ids: list[int], block_size: int,
                 parent: int | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "BlockStored", "block_hashes": block_hashes, "token_ids": token_ids,
                             "block_size": block_size, "medium": "GPU"}
    if parent is not None:
        event["parent_block_hash"] = parent
    return event


def block_removed(block_hashes: list[int]) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": block_hashes, "medium": "GPU"}
