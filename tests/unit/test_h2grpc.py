"""disagg.epp.h2grpc, our HTTP/2 gRPC server: through grpcio's client (interoperation, flow control, statuses, cancellation,
answers sent later), and frame by frame over a raw socket for what a client library never sends
on purpose (padding, CONTINUATION, a bad preface, compressed messages)."""

from __future__ import annotations

import asyncio
import struct
import time

import grpc
import hpack
import pytest
import pytest_asyncio

from disagg.epp import h2grpc, h2wire
from disagg.epp.h2grpc import LATER, GrpcError, GrpcServer, Reply
from disagg.epp.h2wire import keeps_table

ECHO = "/test.Echo/Stream"
FAIL = "/test.Echo/Fail"
CRASH = "/test.Echo/Crash"
FIRST = "/test.Echo/First"
LATER_PATH = "/test.Echo/Later"


class Echo:
    """Echoes every message; on end, sends one more message: the count it saw."""

    finished = False

    def __init__(self) -> None:
        self.seen = 0

    def message(self, payload: bytes) -> list[bytes]:
        self.seen += 1
        return [payload]

    def end(self) -> list[bytes]:
        return [str(self.seen).encode()]


class Fail:
    finished = False

    def message(self, payload: bytes) -> list[bytes]:
        raise GrpcError(9, "précondition: 100% failed")  # FAILED_PRECONDITION

    def end(self) -> list[bytes]:
        return []


class Crash:
    finished = False

    def message(self, payload: bytes) -> list[bytes]:
        raise ValueError("boom")

    def end(self) -> list[bytes]:
        return []


class First:
    """Answers the first message and is done: the stream ends there, whatever else comes."""

    finished = False

    def message(self, payload: bytes) -> list[bytes]:
        self.finished = True
        return [b"first:" + payload]

    def end(self) -> list[bytes]:
        raise AssertionError("a finished stream gets no end()")


class Later:
    """Answers nothing at once: the test answers through the stream's Reply. Each stream's
    handler is in `made`, in order."""

    made: list["Later"] = []

    def __init__(self) -> None:
        self.reply: Reply | None = None
        self.got: list[bytes] = []
        self.cancelled = 0
        self.finished = False
        Later.made.append(self)

    def bind(self, reply: Reply) -> None:
        self.reply = reply
        reply.on_cancel(self._cancelled)

    def _cancelled(self) -> None:
        self.cancelled += 1

    def message(self, payload: bytes):
        self.got.append(payload)
        return LATER

    def end(self) -> list[bytes]:
        return []


@pytest_asyncio.fixture(loop_scope="function")
async def server():
    Later.made = []
    s = GrpcServer({ECHO: Echo, FAIL: Fail, CRASH: Crash, FIRST: First, LATER_PATH: Later})
    s.port = await s.listen("127.0.0.1", 0)
    yield s
    await s.stop()


def _identity(b: bytes) -> bytes:
    return b


async def call(server: GrpcServer, path: str, messages: list[bytes], **options) -> list[bytes]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=list(options.items())) as channel:
        stream = channel.stream_stream(path, request_serializer=_identity, response_deserializer=_identity)
        return [m async for m in stream(iter(messages))]


async def test_bidi_stream_echoes_every_message_then_ends_ok(server) -> None:
    messages = [b"", b"a", bytes(range(256)) * 3, b"last"]
    assert await call(server, ECHO, messages) == [*messages, b"4"]


async def test_a_finished_handler_ends_the_stream_ok_before_the_client_is_done(server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = channel.stream_stream(FIRST, request_serializer=_identity, response_deserializer=_identity)()
        await stream.write(b"a")
        assert await stream.read() == b"first:a"
        assert await stream.read() is grpc.aio.EOF
        assert await stream.code() == grpc.StatusCode.OK
    # The connection and the server carry on: the next stream is served as usual.
    assert await call(server, ECHO, [b"x"]) == [b"x", b"1"]


async def test_large_messages_both_ways_respect_the_client_flow_control_window(server) -> None:
    # 3 MB each way through a client whose windows start at 64 KiB (BDP probing off): our sends
    # must wait for its WINDOW_UPDATEs, and its sends rely on ours.
    big = [bytes([i]) * 1_000_000 for i in range(3)]
    out = await call(server, ECHO, big, **{"grpc.http2.bdp_probe": 0, "grpc.max_receive_message_length": 2**24})
    assert out == [*big, b"3"]


async def test_many_concurrent_streams_on_one_connection(server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = channel.stream_stream(ECHO, request_serializer=_identity, response_deserializer=_identity)

        async def one(i: int) -> list[bytes]:
            return [m async for m in stream(iter([f"{i}-{j}".encode() for j in range(5)]))]

        results = await asyncio.gather(*(one(i) for i in range(60)))
    assert results == [[f"{i}-{j}".encode() for j in range(5)] + [b"5"] for i in range(60)]
    assert len(server.connections) == 0 or all(not c.open_streams for c in server.connections)


async def test_unknown_method_is_unimplemented(server) -> None:
    # A unary call: the server answers an unknown method on its headers, and grpcio's streaming
    # client reports that answer racing its own pending send as INTERNAL (against grpcio's
    # server too, now and then); a unary call sends its message and half-close in one batch.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        unary = channel.unary_unary("/test.Echo/Nope", request_serializer=_identity, response_deserializer=_identity)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(b"x")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/test.Echo/Nope" in err.value.details()
    client = await RawClient.connect(server.port)  # and a stream still open: trailers-only at once
    client.send(h2wire.HEADERS, h2wire.END_HEADERS, 1, client.headers_block("/test.Echo/Nope"))
    messages, fields = await client.response(1)
    assert messages == [] and fields["grpc-status"] == str(h2wire.UNIMPLEMENTED)
    await client.close()


async def test_handler_error_status_and_percent_encoded_message_reach_the_client(server) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(server, FAIL, [b"x"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "précondition: 100% failed"


async def test_handler_exception_is_internal_and_the_connection_serves_on(server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        crash = channel.stream_stream(CRASH, request_serializer=_identity, response_deserializer=_identity)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [m async for m in crash(iter([b"x"]))]
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "ValueError: boom" in err.value.details()
        echo = channel.stream_stream(ECHO, request_serializer=_identity, response_deserializer=_identity)
        assert [m async for m in echo(iter([b"y"]))] == [b"y", b"1"]


async def test_oversized_message_is_resource_exhausted(server, monkeypatch) -> None:
    monkeypatch.setattr(h2grpc, "MAX_MESSAGE_BYTES", 1000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(server, ECHO, [b"x" * 1001])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def open_echo(channel: grpc.aio.Channel, first: bytes):
    """An echo stream that stays open after its first message (echoed back before returning)."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def requests():
        while (item := await queue.get()) is not None:
            yield item

    rpc = channel.stream_stream(ECHO, request_serializer=_identity, response_deserializer=_identity)(requests())
    await queue.put(first)
    assert await rpc.read() == first
    return rpc


async def test_cancelled_stream_leaves_no_state_behind(server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        rpc = await open_echo(channel, b"first")
        assert sum(c.open_streams for c in server.connections) == 1
        rpc.cancel()
        for _ in range(100):
            if sum(c.open_streams for c in server.connections) == 0:
                break
            await asyncio.sleep(0.01)
        assert sum(c.open_streams for c in server.connections) == 0


async def test_stop_ends_open_streams_and_closes_connections(server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        rpc = await open_echo(channel, b"a")
        await asyncio.wait_for(server.stop(grace_s=0.2), 5)
        assert not server.connections
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(rpc.read(), 5)


async def made(n: int) -> list[Later]:
    """The first `n` Later handlers, once each has its request message."""
    for _ in range(500):
        if len(Later.made) >= n and all(h.got for h in Later.made[:n]):
            return Later.made[:n]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(Later.made)} streams")


async def test_a_handler_answers_later_through_its_reply(server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = channel.stream_stream(LATER_PATH, request_serializer=_identity, response_deserializer=_identity)
        calls = [stream(iter([f"q{i}".encode()])) for i in range(2)]  # each half-closes after its message
        reads = [asyncio.ensure_future(call.read()) for call in calls]
        handlers = await made(2)
        await asyncio.sleep(0.05)
        assert not any(r.done() for r in reads)  # nothing answered yet, the client done sending
        second = next(h for h in handlers if h.got == [b"q1"])
        second.reply.send([b"later:" + second.got[0]])  # the second stream first
        assert await asyncio.wait_for(reads[1], 5) == b"later:q1"
        assert await calls[1].read() is grpc.aio.EOF and await calls[1].code() == grpc.StatusCode.OK
        assert not reads[0].done()
        first = next(h for h in handlers if h is not second)
        first.reply.finish(9, "refused later")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(reads[0], 5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and err.value.details() == "refused later"
        assert not first.reply.open and not second.reply.open
        first.reply.send([b"too late"])  # a stream that is over: nothing happens
        assert [h.cancelled for h in handlers] == [0, 0]
    assert all(not c.open_streams for c in server.connections)


async def test_a_stream_the_client_cancels_while_it_waits_tells_its_handler_at_once(server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = channel.stream_stream(LATER_PATH, request_serializer=_identity, response_deserializer=_identity)
        call = stream(iter([b"q"]))
        (handler,) = await made(1)
        call.cancel()  # RST_STREAM
        for _ in range(200):
            if handler.cancelled:
                break
            await asyncio.sleep(0.01)
        assert handler.cancelled == 1 and not handler.reply.open
        assert sum(c.open_streams for c in server.connections) == 0
        handler.reply.send([b"late"])  # nothing to send it on: ignored
        assert handler.cancelled == 1


async def test_a_lost_connection_cancels_every_waiting_stream(server) -> None:
    client = await RawClient.connect(server.port)
    for stream in (1, 3, 5):
        client.send(h2wire.HEADERS, h2wire.END_HEADERS, stream, client.headers_block(LATER_PATH))
        client.send(h2wire.DATA, 0, stream, h2wire.grpc_frame(b"q"))
    handlers = await made(3)
    client.writer.transport.abort()  # no RST_STREAM, no GOAWAY: the connection is just gone
    for _ in range(200):
        if not server.connections:
            break
        await asyncio.sleep(0.01)
    assert [h.cancelled for h in handlers] == [1, 1, 1]
    assert not server.connections


async def test_the_clients_grpc_timeout_is_the_replys_deadline(server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = channel.stream_stream(LATER_PATH, request_serializer=_identity, response_deserializer=_identity)
        started = time.monotonic()
        call = stream(iter([b"q"]), timeout=30)
        (handler,) = await made(1)
        assert started + 29 < handler.reply.deadline < time.monotonic() + 30.5
        handler.reply.send([b"a"])
        assert await call.read() == b"a"
        untimed = stream(iter([b"r"]))
        handlers = await made(2)
        assert handlers[1].reply.deadline is None
        untimed.cancel()


def test_grpc_timeout_values() -> None:
    assert h2grpc._timeout(b"5000m") == 5.0
    assert h2grpc._timeout(b"2S") == 2.0 and h2grpc._timeout(b"1H") == 3600.0 and h2grpc._timeout(b"7u") == 7e-6
    for bad in (b"", b"m", b"5", b"5x", b"123456789S", b"-1S"):
        assert h2grpc._timeout(bad) is None


# -- raw frames -------------------------------------------------------------------------------


class RawClient:
    """Speaks HTTP/2 frames to the server directly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    @classmethod
    async def connect(cls, port: int, preface: bytes = h2wire.PREFACE) -> "RawClient":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(preface + h2wire.frame(h2wire.SETTINGS, 0, 0))
        return cls(reader, writer)

    def send(self, kind: int, flags: int, stream: int, payload: bytes = b"") -> None:
        self.writer.write(h2wire.frame(kind, flags, stream, payload))

    def headers_block(self, path: str) -> bytes:
        return self.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                    (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")])

    async def frame(self) -> tuple[int, int, int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(9), 5)
        word, flags, stream = struct.unpack(">IBI", head)
        return word & 0xFF, flags, stream, await self.reader.readexactly(word >> 8)

    async def until(self, kind: int, stream: int | None = None) -> tuple[int, bytes, list]:
        """Frames until one of `kind` (on `stream`); returns its flags, payload and what came before."""
        before = []
        while True:
            k, flags, s, payload = await self.frame()
            if k == kind and (stream is None or s == stream):
                return flags, payload, before
            before.append((k, flags, s, payload))

    async def response(self, stream: int) -> tuple[list[bytes], dict[str, str]]:
        """The messages and the trailers of one stream's response."""
        data, fields = b"", {}
        while True:
            k, flags, s, payload = await self.frame()
            if s != stream:
                continue
            if k == h2wire.DATA:
                data += payload
            elif k == h2wire.HEADERS:
                fields.update({n: v for n, v in self.decoder.decode(payload)})
                if flags & h2wire.END_STREAM:
                    break
        messages = []
        while data:
            n = int.from_bytes(data[1:5], "big")
            messages.append(data[5:5 + n])
            data = data[5 + n:]
        return messages, fields

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def test_settings_are_acknowledged_and_ping_is_echoed(server) -> None:
    client = await RawClient.connect(server.port)
    flags, _, _ = await client.until(h2wire.SETTINGS)  # the server's own settings come first
    assert not flags & h2wire.ACK
    flags, _, _ = await client.until(h2wire.SETTINGS)
    assert flags & h2wire.ACK
    client.send(h2wire.PING, 0, 0, b"12345678")
    flags, payload, _ = await client.until(h2wire.PING)
    assert flags & h2wire.ACK and payload == b"12345678"
    await client.close()


async def test_padding_priority_continuation_and_split_or_packed_messages(server) -> None:
    client = await RawClient.connect(server.port)
    block = client.headers_block(ECHO)
    # HEADERS padded and with a priority section, the block split over two CONTINUATIONs.
    head = bytes([3]) + struct.pack(">IB", 0, 16) + block[:5] + b"\0\0\0"
    client.send(h2wire.HEADERS, h2wire.PADDED | h2wire.PRIORITY_FLAG, 1, head)
    client.send(h2wire.CONTINUATION, 0, 1, block[5:9])
    client.send(h2wire.CONTINUATION, h2wire.END_HEADERS, 1, block[9:])
    one, two, three = (h2wire.grpc_frame(m) for m in (b"one", b"two" * 10, b"three"))
    client.send(h2wire.DATA, 0, 1, one[:3])  # a message split over frames...
    client.send(h2wire.DATA, h2wire.PADDED, 1, bytes([4]) + one[3:] + b"\0" * 4)  # ...one padded
    client.send(h2wire.DATA, h2wire.END_STREAM, 1, two + three)  # two messages in one frame
    messages, fields = await client.response(1)
    assert messages == [b"one", b"two" * 10, b"three", b"3"]
    assert fields[":status"] == "200" and fields["grpc-status"] == "0"
    await client.close()


async def test_compressed_message_is_unimplemented(server) -> None:
    client = await RawClient.connect(server.port)
    client.send(h2wire.HEADERS, h2wire.END_HEADERS, 1, client.headers_block(ECHO))
    client.send(h2wire.DATA, h2wire.END_STREAM, 1, b"\x01" + (3).to_bytes(4, "big") + b"abc")
    messages, fields = await client.response(1)
    assert messages == [] and fields["grpc-status"] == str(h2wire.UNIMPLEMENTED)
    await client.close()


async def test_bad_preface_gets_goaway_and_the_connection_closes(server) -> None:
    client = await RawClient.connect(server.port, preface=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    _, payload, _ = await client.until(h2wire.GOAWAY)
    assert struct.unpack(">II", payload[:8])[1] == h2wire.PROTOCOL_ERROR
    assert await asyncio.wait_for(client.reader.read(), 5) == b""  # closed by the server
    await client.close()


async def test_oversized_frame_is_a_connection_error(server) -> None:
    client = await RawClient.connect(server.port)
    client.writer.write(struct.pack(">HBBBI", (20_000 >> 8), 20_000 & 0xFF, h2wire.DATA, 0, 1) + b"\0" * 20_000)
    _, payload, _ = await client.until(h2wire.GOAWAY)
    assert struct.unpack(">II", payload[:8])[1] == h2wire.FRAME_SIZE_ERROR
    await client.close()


def test_keeps_table_tells_apart_blocks_that_change_the_dynamic_table() -> None:
    encoder = hpack.Encoder()
    first = encoder.encode([(":path", "/a.B/C"), ("x-custom", "v")])  # new names: indexed into the table
    again = encoder.encode([(":path", "/a.B/C"), ("x-custom", "v")])  # now only references
    assert not keeps_table(first)
    assert keeps_table(again)
    unindexed = encoder.encode([("x-secret", "s")], huffman=True)
    assert not keeps_table(unindexed)  # hpack's encoder indexes new fields by default
    assert keeps_table(h2wire.RESPONSE_HEADERS + h2wire.trailers(3, "bad % thing"))  # our literals
    assert not keeps_table(b"\xff")  # truncated integer


async def test_a_repeated_header_block_is_decoded_once(server, monkeypatch) -> None:
    decoded = []
    original = hpack.Decoder.decode

    def counting(self, data, raw=False):
        decoded.append((self, data))
        return original(self, data, raw=raw)

    monkeypatch.setattr(hpack.Decoder, "decode", counting)
    client = await RawClient.connect(server.port)
    for stream in (1, 3, 5, 7):
        client.send(h2wire.HEADERS, h2wire.END_HEADERS, stream, client.headers_block(ECHO))
        client.send(h2wire.DATA, h2wire.END_STREAM, stream, h2wire.grpc_frame(b"hi"))
        assert await client.response(stream) == ([b"hi", b"1"], {":status": "200", "content-type": "application/grpc",
                                                                 "grpc-status": "0"})
    # The first block indexes its fields; the second is all references; the rest are the same bytes.
    assert len([data for decoder, data in decoded if decoder is not client.decoder]) == 2
    await client.close()
