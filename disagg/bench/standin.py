"""Stand-in workers: the load targets of `disagg bench epp` (and of routing tests), without an
engine.

`StandInWorker` serves a worker's descriptor (`/v1/worker`), vLLM-named `/metrics` and `/health`
from a thread, and answers every POST at once with who served it; `hang()` makes it stop
answering, as a stuck process would.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec

from disagg.messages import EngineLoad, LoadReport, Role, WorkerInfo
from kv_transfer.layout import KVLayout


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


class StandInWorker:
    def __init__(self, role: Role, *, model: str = "tiny", block_size: int = 32, node_id: str = "",
                 port: int = 0, engine_id: str | None = None, **info_extra: Any) -> None:
        self.port = port  # 0: the server binds a free one (read back at start)
        self.role, self.model, self.block_size, self.node_id = role, model, block_size, node_id
        self.engine_id, self.info_extra = engine_id, info_extra
        self.load = EngineLoad(num_blocks=1000)
        self.hung = threading.Event()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "StandInWorker":
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
        self.port = self._server.server_address[1]
        self.info = make_info(self.role, self.address, model=self.model, block_size=self.block_size,
                              engine_id=self.engine_id, node_id=self.node_id, **self.info_extra)
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


class StandInFleet:
    """Stand-in workers in one process sharing one load channel, as a multi-engine model server
    would: each worker's `load` goes out as a `LoadReport` when it changes and every second
    (`publish=False`: no channel, the workers are scraped). `mute(worker)` stops a worker's
    reports, as a hung publisher would."""

    def __init__(self, roles: list[Role], *, publish: bool = True, **worker_options: Any) -> None:
        from disagg.routing.load_channel import LoadPublisher

        self.publisher = LoadPublisher("127.0.0.1", self._reports) if publish else None
        extra = {"load_endpoint": self.publisher.endpoint} if self.publisher else {}
        self.workers = [StandInWorker(role, **worker_options, **extra) for role in roles]
        self.muted: set[str] = set()
        self._stop = threading.Event()

    def start(self) -> "StandInFleet":
        for worker in self.workers:
            worker.start()
        if self.publisher is not None:
            threading.Thread(target=self._publish, daemon=True, name="standin-loads").start()
        return self

    def mute(self, worker: StandInWorker) -> None:
        self.muted.add(worker.info.engine_id)

    def _reports(self) -> list[LoadReport]:
        return [LoadReport(w.info.engine_id, 0, 0.0, w.load.waiting, w.load.running, w.load.kv_usage, w.load.num_blocks)
                for w in self.workers if w.info.engine_id not in self.muted]

    def _publish(self) -> None:
        assert self.publisher is not None
        while not self._stop.wait(self.publisher.min_interval_s):
            self.publisher.publish_due(time.monotonic())
        self.publisher.close()

    def stop(self) -> None:
        self._stop.set()
        for worker in self.workers:
            worker.stop()
