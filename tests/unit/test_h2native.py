"""The C engine of disagg.epp.h2grpc writes what the Python engine writes, byte for byte, for the
same bytes in: ext_proc streams in every body mode (the C engine answers those itself), refusals,
the other methods' handlers, flow control, and every protocol error. Each engine serves its own
EPP (a scheduler with the same endpoints), fed the same chunks."""

from __future__ import annotations

import random
import re
import struct
import uuid

import hpack
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from disagg.bench.ext_proc_replay import envoy_like_streams
from disagg.config import RoutingConfig
from disagg.epp import h2grpc
from disagg.epp.ext_proc import BUFFERED, FULL_DUPLEX_STREAMED, ExternalProcessor
from disagg.epp.h2grpc import GrpcServer
from disagg.epp.h2wire import (CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PADDED, PING, PREFACE,
                               PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM, SETTINGS, SETTINGS_INITIAL_WINDOW_SIZE,
                               SETTINGS_MAX_FRAME_SIZE, WINDOW_UPDATE, frame, grpc_frame)
from disagg.epp.picker import EndpointPicker
from disagg.epp.prompt import RawPromptReader
from disagg.epp.protocol import PROCESS_PATH, SUBSET_KEY, SUBSET_NAMESPACE
from disagg.routing import Scheduler
from disagg.routing.fakes import make_info
from disagg.worker.protocol import EngineLoad

pytestmark = pytest.mark.skipif("c" not in h2grpc.ENGINES, reason="the C engine is not built here")

MODEL = "tiny"
ECHO, FIRST, FAIL, CRASH = "/t.T/Echo", "/t.T/First", "/t.T/Fail", "/t.T/Crash"
SHUT_DOWN = None  # in a list of chunks: the server shuts the connection down there


class Echo:
    finished = False

    def message(self, payload: bytes) -> list[bytes]:
        return [payload, payload[::-1]]

    def end(self) -> list[bytes]:
        return [b"end"]


class First(Echo):
    def message(self, payload: bytes) -> list[bytes]:
        self.finished = True
        return [b"first"]


class Fail(Echo):
    def message(self, payload: bytes) -> list[bytes]:
        raise h2grpc.GrpcError(9, "précondition: 100% failed\n")


class Crash(Echo):
    def message(self, payload: bytes) -> list[bytes]:
        raise ValueError("boom")


def _server(engine: str) -> GrpcServer:
    routing = RoutingConfig(pd_threshold_tokens=64, max_waiting_per_worker=8, stale_after_s=1e6, dead_after_s=1e7)
    scheduler = Scheduler(routing, model=MODEL, block_size=32)
    for role, address in [("decode", "10.0.0.1:8000"), ("decode", "10.0.0.2:8000"), ("prefill", "10.0.0.3:8000")]:
        endpoint = scheduler.pool.upsert(make_info(role, address, model=MODEL))
        scheduler.pool.update_load(endpoint.engine_id, EngineLoad())
    processor = ExternalProcessor(EndpointPicker(scheduler, RawPromptReader(MODEL)))
    methods = {PROCESS_PATH: processor.stream, ECHO: Echo, FIRST: First, FAIL: Fail, CRASH: Crash}
    return GrpcServer(methods, native=processor.native_method(), engine=engine)  # type: ignore[arg-type]


class _Recorder:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def serve(engine: str, chunks: list[bytes | None]) -> tuple[bytes, bool, int]:
    """What the server wrote, whether it closed, and the streams it left open. Memory addresses
    (in hpack's error messages, sent in GOAWAY) are masked: they differ from run to run."""
    connection = _server(engine).protocol()
    transport = _Recorder()
    connection.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        if chunk is SHUT_DOWN:
            connection.shut_down()  # type: ignore[attr-defined]
        else:
            connection.data_received(chunk)
    written = re.sub(rb"0x[0-9a-f]+", lambda m: b"0x" + b"?" * (len(m[0]) - 2), bytes(transport.written))
    return written, transport.closed, connection.open_streams  # type: ignore[attr-defined]


# -- building client bytes -----------------------------------------------------------------------

OPENING = PREFACE + frame(SETTINGS, 0, 0)


class Client:
    def __init__(self) -> None:
        self.encoder = hpack.Encoder()

    def open(self, stream: int, path: str = PROCESS_PATH, flags: int = END_HEADERS, extra=()) -> bytes:
        block = self.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "epp"),
                                     ("content-type", "application/grpc"), ("te", "trailers"), *extra])
        return frame(HEADERS, flags, stream, block)


def msg(stream: int, *messages: pb.ProcessingRequest | bytes, end: bool = False) -> bytes:
    payload = b"".join(grpc_frame(m if isinstance(m, bytes) else m.SerializeToString()) for m in messages)
    return frame(DATA, END_STREAM if end else 0, stream, payload)


def headers_msg(path: str = "/v1/completions", *, mode: int | None = FULL_DUPLEX_STREAMED, eos: bool = False,
                subset=None, raw: bool = True) -> pb.ProcessingRequest:
    headers = [(":path", path), (":method", "POST"), ("content-type", "application/json"), ("x-name", "héllo")]
    message = pb.ProcessingRequest(request_headers=pb.HttpHeaders(end_of_stream=eos, headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) if raw else base_pb2.HeaderValue(key=k, value=v)
                 for k, v in headers])))
    if mode is not None:
        message.protocol_config.request_body_mode = mode
    if subset is not None:
        value = struct_pb2.Struct()
        value.update({SUBSET_KEY: subset})
        message.metadata_context.filter_metadata[SUBSET_NAMESPACE].CopyFrom(value)
    return message


def body_msg(body: bytes = b"", eos: bool = False, phase: str = "request_body") -> pb.ProcessingRequest:
    return pb.ProcessingRequest(**{phase: pb.HttpBody(body=body, end_of_stream=eos)})


def completion(tokens: int = 10, model: str = MODEL) -> bytes:
    return f'{{"model": "{model}", "prompt": {list(range(tokens))}, "max_tokens": 1}}'.encode()


def _cases() -> dict[str, list[bytes | None]]:
    # Each case is fed to a fresh connection, so each has its own client (its own HPACK table).
    big = completion(30_000)  # about 200 KB: several echoed chunks, many DATA frames
    wire = grpc_frame(headers_msg().SerializeToString()) + grpc_frame(body_msg(big, eos=True).SerializeToString())
    big_frames = b"".join(frame(DATA, 0, 1, wire[i:i + 16_000]) for i in range(0, len(wire), 16_000))
    pieces = b"".join(envoy_like_streams(5, completion(50))[1:])
    cuts = sorted(random.Random(7).sample(range(1, len(pieces)), 40))
    split = [pieces[a:b] for a, b in zip([0, *cuts], [*cuts, len(pieces)])]
    unusual = (headers_msg().SerializeToString() + b"\x50\x01"  # observability_mode: a field the EPP ignores
               + b"\x62\x02\x08\x01"  # an unknown length-delimited field
               + b"\x10\x07")  # request_headers with the wrong wire type: an unknown field to protobuf
    bad_utf8 = headers_msg().SerializeToString().replace("héllo".encode(), b"h\xffllo\xff")
    ping = frame(PING, 0, 0, b"\0" * 8)

    def refusals(c: Client) -> list[bytes | None]:
        return [OPENING + c.open(1) + msg(1, headers_msg(), body_msg(b"{not json", True))
                + c.open(3) + msg(3, headers_msg(), body_msg(completion(model="other"), True))
                + c.open(5) + msg(5, headers_msg(subset=["10.9.9.9:1"]), body_msg(completion(), True))
                + c.open(7) + msg(7, headers_msg(subset="10.0.0.2:8000"), body_msg(completion(), True))
                + c.open(9) + msg(9, headers_msg(subset=["10.0.0.2:8000"]), body_msg(completion(), True))]

    def phases(c: Client) -> list[bytes | None]:
        return [OPENING + c.open(1) + msg(1, headers_msg(), body_msg(completion()),
                                          pb.ProcessingRequest(response_headers=pb.HttpHeaders()),
                                          body_msg(b"out", True, phase="response_body"),
                                          pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
                                          pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
                + c.open(3) + msg(3, headers_msg(mode=BUFFERED), body_msg(b"x", phase="response_body"),
                                  pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
                + c.open(5) + msg(5, body_msg(completion(), True), pb.ProcessingRequest(), end=True)]

    def windows(c: Client) -> list[bytes | None]:
        return [PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HIHI", SETTINGS_INITIAL_WINDOW_SIZE, 1000,
                                                            SETTINGS_MAX_FRAME_SIZE, 20_000)) + c.open(1) + big_frames,
                frame(WINDOW_UPDATE, 0, 1, (50_000).to_bytes(4, "big")),
                frame(WINDOW_UPDATE, 0, 0, (10**6).to_bytes(4, "big")),
                frame(SETTINGS, 0, 0, struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, 300_000)),
                frame(WINDOW_UPDATE, 0, 1, (10**6).to_bytes(4, "big"))]

    def handlers(c: Client) -> list[bytes | None]:
        return [OPENING + c.open(1, ECHO) + msg(1, b"ab", b"") + msg(1, end=True)
                + c.open(3, FIRST) + msg(3, b"x", b"y") + c.open(5, FAIL) + msg(5, b"x")
                + c.open(7, CRASH) + msg(7, b"x") + c.open(9, "/t.T/Nope") + c.open(11, ECHO, END_HEADERS | END_STREAM)
                + c.open(13, ECHO, extra=[("grpc-encoding", "gzip")])
                + c.open(15, ECHO) + frame(DATA, 0, 15, b"\x01\0\0\0\x01a")  # compressed
                + c.open(17, ECHO) + frame(DATA, END_STREAM, 17, b"\0\0\0")  # ends inside a message
                + c.open(19, ECHO) + frame(DATA, 0, 19, b"\0\x02\0\0\0")  # 32 MiB: too large
                + c.open(21, ECHO) + frame(HEADERS, END_HEADERS | END_STREAM, 21, b"\x82")]  # client trailers

    def frames(c: Client) -> list[bytes | None]:
        one, five = c.open(1, ECHO)[9:], c.open(5, ECHO)[9:]
        return [OPENING + ping + frame(PING, 1, 0, b"ignored!")
                + frame(HEADERS, PADDED | PRIORITY_FLAG | END_HEADERS, 1, b"\x02" + b"\0" * 5 + one + b"\0\0")
                + frame(DATA, PADDED, 1, b"\x03" + grpc_frame(b"padded") + b"\0\0\0")
                + frame(2, 0, 1, b"\0" * 5) + frame(0x20, 0, 0, b"an unknown frame type")
                + frame(RST_STREAM, 0, 1, b"\0\0\0\x08") + msg(1, b"after the reset")
                + frame(HEADERS, END_HEADERS, 1, b"\x82") + frame(HEADERS, END_HEADERS, 4, b"\x82"),
                frame(HEADERS, 0, 5, five[:4]), frame(CONTINUATION, 0, 5, b""),
                frame(CONTINUATION, END_HEADERS, 5, five[4:]) + msg(5, b"x", end=True)]

    builders = {
        "envoy full duplex": lambda c: envoy_like_streams(20, completion(200)),
        "envoy, split anywhere": lambda c: [envoy_like_streams(1, b"")[0], *split],
        "buffered": lambda c: [OPENING + c.open(1) + msg(1, headers_msg(mode=BUFFERED))
                               + msg(1, body_msg(completion(), True))],
        "streamed": lambda c: [OPENING + c.open(1) + msg(1, headers_msg(mode=1), body_msg(b'{"model": "tiny", '),
                                                          body_msg(b'"prompt": [1, 2]}'), body_msg(eos=True))],
        "default mode, value not raw_value": lambda c: [OPENING + c.open(1) + msg(1, headers_msg(mode=None, raw=False),
                                                                                 body_msg(completion(), True))],
        "no body": lambda c: [OPENING + c.open(1) + msg(1, headers_msg("/v1/models", eos=True))],
        "long prompt: a prefill": lambda c: [OPENING + c.open(1) + msg(1, headers_msg(), body_msg(completion(300), True))],
        "refusals": refusals,
        "trailers and response phases": phases,
        "unusual fields": lambda c: [OPENING + c.open(1) + msg(1, unusual, body_msg(completion(), True))],
        "corrupt messages": lambda c: [OPENING + c.open(1) + msg(1, b"\x12\x05abc") + c.open(3) + msg(3, b"\x0b")
                                       + c.open(5) + msg(5, bad_utf8)],
        "big body in small windows": windows,
        "handlers": handlers,
        "frames": frames,
        "shut down": lambda c: [OPENING + c.open(1, ECHO) + msg(1, b"a"), SHUT_DOWN, c.open(3, ECHO) + msg(1, b"b", end=True)],
        "peer goaway": lambda c: [OPENING + c.open(1, ECHO) + msg(1, b"a") + frame(GOAWAY, 0, 0, b"\0" * 8),
                                  msg(1, end=True)],
        "bad preface": lambda c: [b"GET / HTTP/1.1\r\n\r\n" + b"x" * 20],
        "preface in pieces": lambda c: [PREFACE[:5], PREFACE[5:] + frame(SETTINGS, 0, 0) + ping],
        "frame too large": lambda c: [OPENING + struct.pack(">HBBBI", 20_000 >> 8, 20_000 & 0xFF, DATA, 0, 1)],
        "headers on stream 0": lambda c: [OPENING + frame(HEADERS, END_HEADERS, 0, b"\x82")],
        "interrupted header block": lambda c: [OPENING + frame(HEADERS, 0, 1, b"\x82") + ping],
        "stray continuation": lambda c: [OPENING + frame(CONTINUATION, END_HEADERS, 1, b"\x82")],
        "push promise": lambda c: [OPENING + frame(PUSH_PROMISE, 0, 1, b"\0" * 4)],
        "bad settings": lambda c: [OPENING + frame(SETTINGS, 0, 0, b"\0" * 5)],
        "window too large": lambda c: [OPENING + frame(SETTINGS, 0, 0, struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE,
                                                                                   2**31))],
        "bad padding": lambda c: [OPENING + c.open(1, ECHO) + frame(DATA, PADDED, 1, b"\x09abc")],
        "bad hpack": lambda c: [OPENING + frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff")],
    }
    return {name: build(Client()) for name, build in builders.items()}


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_the_c_engine_writes_what_the_python_engine_writes(name: str) -> None:
    chunks = CASES[name]
    python = serve("python", chunks)
    native = serve("c", chunks)
    assert native[0] == python[0]
    assert native[1:] == python[1:]
    assert len(python[0]) > 60  # every case gets an answer (the server's opening alone is 40 bytes)


def test_the_ext_proc_answers_route_to_the_picked_decode() -> None:
    """Not only alike: right. The envoy-like streams end routed (trailers OK), one per stream."""
    written, closed, open_streams = serve("c", envoy_like_streams(20, completion(200)))
    assert written.count(b"10.0.0.") >= 20 and not closed and open_streams == 0
    assert written.count(b"grpc-status\x010") == 20


def test_the_engines_agree_on_damaged_input(monkeypatch) -> None:
    """Envoy-like streams with bytes flipped, cut or repeated: whatever each engine makes of them
    (a connection error, a stream error, a refusal, a pick), the other makes the same."""
    ids = iter(range(10**6))
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=next(ids)))  # the same input every run
    rng = random.Random(11)
    opening, *streams = envoy_like_streams(8, completion(40))
    clean = b"".join(streams)
    for _ in range(1000):
        damaged = bytearray(clean)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(damaged))
            kind = rng.random()
            if kind < 0.6:
                damaged[at] = rng.randrange(256)
            elif kind < 0.8:
                del damaged[at:at + rng.randint(1, 20)]
            else:
                damaged[at:at] = damaged[at:at + rng.randint(1, 20)]
        chunks: list[bytes | None] = [opening, bytes(damaged)]
        assert serve("c", chunks) == serve("python", chunks)
