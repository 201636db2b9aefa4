"""What answering one ext_proc stream costs the EPP itself, without Envoy, sockets or an event
loop: Envoy-like streams (the bytes Envoy writes for a small completion in FULL_DUPLEX_STREAMED
mode: the gRPC HEADERS, then the request headers, body and end-of-stream messages) are handed to
one connection of our HTTP/2 gRPC server in this process, answered by the EPP and, for
comparison, by the hop floor's constant-answer server.

Each is timed twice: back to back (caches warm), and after the core sat idle for 1 ms, as it
does between requests in a live gateway. On a shared VM the second is what the hop sees: there
the same code ran about 3x slower after a millisecond of idling (other tenants take the caches).
"""

from __future__ import annotations

import statistics
import struct
import time
import uuid
from typing import Any, Callable

import hpack
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from benchmarks.ext_proc_floor import constant_server
from disagg.config import RoutingConfig
from disagg.epp.ext_proc import FULL_DUPLEX_STREAMED, ExternalProcessor
from disagg.epp.h2grpc import GrpcServer
from disagg.epp.h2wire import (DATA, DEFAULT_WINDOW, END_HEADERS, HEADERS, PREFACE, SETTINGS,
                               SETTINGS_INITIAL_WINDOW_SIZE, WINDOW_UPDATE, frame, grpc_frame)
from disagg.epp.picker import EndpointPicker
from disagg.epp.prompt import RawPromptReader
from disagg.epp.protocol import PROCESS_PATH
from disagg.routing import Scheduler
from disagg.bench.standin import make_info
from disagg.messages import EngineLoad

WORKER = "127.0.0.1:8000"


def envoy_like_streams(count: int, body: bytes) -> list[bytes]:
    """The connection's opening, then one chunk per request (stream 1, 3, 5, ...), as Envoy's
    ext_proc client writes them: one HEADERS frame and three gRPC messages in DATA frames."""
    encoder = hpack.Encoder()
    # Envoy opens with 256 MiB windows, so answers never wait for a WINDOW_UPDATE.
    window = 256 * 1024 * 1024
    chunks = [PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, window))
              + frame(WINDOW_UPDATE, 0, 0, (window - DEFAULT_WINDOW).to_bytes(4, "big"))]
    for i in range(count):
        stream_id = 2 * i + 1
        block = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", PROCESS_PATH),
                                (":authority", "epp"), ("content-type", "application/grpc"), ("te", "trailers"),
                                ("grpc-timeout", "5000m")])
        http_headers = [(":authority", "gateway"), (":path", "/v1/completions"), (":method", "POST"), (":scheme", "http"),
                        ("content-type", "application/json"), ("content-length", str(len(body))),
                        ("x-forwarded-proto", "http"), ("x-request-id", str(uuid.uuid4()))]
        messages = [
            pb.ProcessingRequest(
                request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in http_headers])),
                protocol_config=pb.ProtocolConfiguration(request_body_mode=FULL_DUPLEX_STREAMED)),
            pb.ProcessingRequest(request_body=pb.HttpBody(body=body)),
            pb.ProcessingRequest(request_body=pb.HttpBody(end_of_stream=True)),
        ]
        chunk = frame(HEADERS, END_HEADERS, stream_id, block)
        for message in messages:
            chunk += frame(DATA, 0, stream_id, grpc_frame(message.SerializeToString()))
        chunks.append(chunk)
    return chunks


class _NullTransport:
    """Keeps the server's last write."""

    def __init__(self) -> None:
        self.last = b""

    def write(self, data: bytes) -> None:
        self.last = data

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def _time_answers(server: GrpcServer, chunks: list[bytes], idle_s: float, between: Callable[[], None]) -> list[float]:
    """Seconds per request; `between` runs untimed after each (the pick's bookkeeping). Raises
    unless the last answer routes to the worker."""
    connection = server.protocol()
    transport = _NullTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(chunks[0])
    times = []
    for chunk in chunks[1:]:
        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter()
        connection.data_received(chunk)
        times.append(time.perf_counter() - t0)
        between()
    if WORKER.encode() not in transport.last:
        raise RuntimeError(f"the last answer does not route to {WORKER}: {transport.last[:200]!r}")
    if connection.open_streams:  # type: ignore[attr-defined]
        raise RuntimeError(f"{connection.open_streams} streams left open")  # type: ignore[attr-defined]
    return times


def bench_answers(requests: int, *, body: bytes, model: str, block_size: int, idle_requests: int | None = None,
                  idle_s: float = 1e-3) -> dict[str, Any]:
    """p50 microseconds per request, back to back and after `idle_s` idle, for the EPP (one
    decode endpoint serving `model`, no tokenizer: the hop's setup) and the constant-answer
    floor ("epp", "floor"), each stream carrying completion `body`. After idle: `idle_requests`
    (default: a sixth of `requests`, at least 10)."""
    idle_requests = idle_requests or max(10, requests // 6)
    scheduler = Scheduler(RoutingConfig(), model=model, block_size=block_size)
    endpoint = scheduler.pool.upsert(make_info("decode", WORKER, model=model, block_size=block_size))

    def bookkeeping() -> None:
        scheduler.flush()
        scheduler.pool.update_load(endpoint.engine_id, EngineLoad())  # a scrape: stays alive

    bookkeeping()
    processor = ExternalProcessor(EndpointPicker(scheduler, RawPromptReader(model)))
    servers: dict[str, tuple[GrpcServer, Callable[[], None]]] = {
        "epp": (GrpcServer({PROCESS_PATH: processor.stream}), bookkeeping),
        "floor": (constant_server(WORKER), lambda: None),
    }
    result: dict[str, Any] = {"requests": requests, "idle_requests": idle_requests, "idle_ms": idle_s * 1e3}
    for name, (server, between) in servers.items():
        _time_answers(server, envoy_like_streams(50, body), 0, between)  # warm-up
        hot = _time_answers(server, envoy_like_streams(requests, body), 0, between)
        idle = _time_answers(server, envoy_like_streams(idle_requests, body), idle_s, between)
        result[name] = {"p50_us": statistics.median(hot) * 1e6, "after_idle_p50_us": statistics.median(idle) * 1e6}
    return result


if __name__ == "__main__":
    import json
    import sys

    requests, model, block_size, body = sys.argv[1:5]
    print(json.dumps(bench_answers(int(requests), body=body.encode(), model=model, block_size=int(block_size))))
