"""disagg.routing.http1, the scrape loops' HTTP/1.1 GET: body framings, keep-alive and reconnects,
and failures that end as HttpError (never a hang)."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from disagg.routing.http1 import Http1Clients, Http1Connection, HttpError
from disagg.routing.fakes import FakeWorker
from disagg.routing.scraper import scrape
from disagg.worker.protocol import EngineLoad


class Server:
    """Answers each request with the next canned reply (raw bytes); counts connections."""

    def __init__(self, replies: list[bytes]) -> None:
        self.replies = replies
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                request = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(request)
                reply = self.replies.pop(0)
                if reply == b"HANG":
                    await asyncio.sleep(30)
                for i in range(0, len(reply), 7):  # in small pieces: a reader must wait for the rest
                    writer.write(reply[i:i + 7])
                    await writer.drain()
                    await asyncio.sleep(0.001)
                if reply.endswith(b"CLOSE"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest_asyncio.fixture(loop_scope="function")
async def serve():
    servers = []

    async def start(replies: list[bytes]) -> tuple[Server, str]:
        server = Server(replies)
        s = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        servers.append(s)
        return server, f"127.0.0.1:{s.sockets[0].getsockname()[1]}"

    yield start
    for s in servers:
        s.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_keep_alive_serves_many_gets_on_one_connection(serve) -> None:
    server, address = await serve([ok(b"one"), ok(b"two"), ok(b"three")])
    connection = Http1Connection(address, timeout_s=5)
    assert [await connection.get(p) for p in ("/a", "/b?x=1", "/c")] == [(200, b"one"), (200, b"two"), (200, b"three")]
    assert server.connections == 1
    assert server.requests[1].startswith(b"GET /b?x=1 HTTP/1.1\r\nHost: " + address.encode())
    connection.close()


async def test_chunked_body_with_extensions_and_trailers(serve) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n")
    _, address = await serve([chunked, ok(b"after")])
    connection = Http1Connection(address, timeout_s=5)
    assert await connection.get("/") == (200, b"hello, world")
    assert await connection.get("/") == (200, b"after")  # the trailers were read to the end


async def test_connection_close_and_a_body_to_the_end_reconnect_for_the_next_get(serve) -> None:
    server, address = await serve([
        b"HTTP/1.1 204 No Content\r\n\r\n",  # no body, and the connection stays open
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end CLOSE",
        ok(b"fresh"),
    ])
    connection = Http1Connection(address, timeout_s=5)
    assert await connection.get("/") == (204, b"")
    assert await connection.get("/") == (404, b"nope")
    assert await connection.get("/") == (200, b"until the end CLOSE")
    assert await connection.get("/") == (200, b"fresh")
    assert server.connections == 3


async def test_failures_are_http_errors_and_the_next_get_starts_over(serve) -> None:
    server, address = await serve([b"SSH-2.0-OpenSSH\r\n", b"HANG", ok(b"back")])
    connection = Http1Connection(address, timeout_s=0.5)
    with pytest.raises(HttpError, match="not an HTTP"):
        await connection.get("/")
    with pytest.raises(HttpError, match="TimeoutError"):
        await connection.get("/")
    assert await connection.get("/") == (200, b"back")
    with pytest.raises(HttpError):
        await Http1Connection("127.0.0.1:1", timeout_s=1).get("/")  # refused


async def test_clients_keep_one_connection_per_address_and_drop_the_gone(serve) -> None:
    _, a = await serve([ok(b"a")])
    _, b = await serve([ok(b"b")])
    clients = Http1Clients(timeout_s=5)
    assert await asyncio.gather(clients(a).get("/"), clients(b).get("/")) == [(200, b"a"), (200, b"b")]
    first, second = clients(a), clients(b)
    clients.retain({a})
    assert clients(a) is first  # kept
    assert second._writer is None and clients(b) is not second  # closed, and a new one on demand
    clients.close()


async def test_scrape_reads_a_workers_load_through_its_metrics_endpoint() -> None:
    worker = FakeWorker("decode").start()
    try:
        worker.load = EngineLoad(waiting=3, running=2, kv_usage=0.25)
        connection = Http1Connection(worker.address, timeout_s=5)
        load = await scrape(connection)
        assert (load.waiting, load.running, load.kv_usage) == (3, 2, 0.25)
        assert (await scrape(connection)).waiting == 3  # again, on the same connection
        connection.close()
    finally:
        worker.stop()
