"""A lean HTTP/1.1 GET over one keep-alive connection: what each scrape loop uses.

A scheduler scrapes every worker every `scrape_interval_s` (0.2 s): at 64 workers, 320 GETs a
second on the event loop that also answers picks. Through httpx each cost about 5 ms of CPU here
(its URL, header and transport layers), enough to take most of a core; this costs a tenth of it.
It does only what a scrape needs: GET, a status, a body by Content-Length, chunks or the end of
the connection; any failure closes the connection and the next GET opens a new one.
"""

from __future__ import annotations

import asyncio


class HttpError(Exception):
    """The GET failed: refused, reset, timed out, or an answer that is not HTTP/1.x."""


MAX_BODY_BYTES = 16 * 1024 * 1024


class Http1Connection:
    """GETs to one `host:port`, one at a time, on a connection kept open between them."""

    def __init__(self, address: str, *, timeout_s: float) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.timeout_s = timeout_s
        self._host_header = address.encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, target: str) -> tuple[int, bytes]:
        """GET `target` (path and query): the status and the body. Raises HttpError."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._get(target)
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise HttpError(f"GET http://{self.host}:{self.port}{target}: {type(exc).__name__}: {exc}") from None

    async def _get(self, target: str) -> tuple[int, bytes]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nAccept: */*\r\n\r\n" % (target.encode(), self._host_header))
        status_line = await reader.readuntil(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x answer: {status_line[:60]!r}")
        status = int(rest[:3])
        length: int | None = None
        chunked = False
        keep_alive = version == b"HTTP/1.1"
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                keep_alive = b"close" not in value.lower()
        if status in (204, 304):  # never a body
            body = b""
        elif chunked:
            body = await self._read_chunks(reader)
        elif length is not None:
            if length > MAX_BODY_BYTES:
                raise ValueError(f"a body of {length} bytes")
            body = await reader.readexactly(length)
        else:  # the body runs to the end of the connection
            body = await self._read_to_end(reader)
            keep_alive = False
        if not keep_alive:
            self.close()
        return status, body

    @staticmethod
    async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while data := await reader.read(65536):
            body += data
            if len(body) > MAX_BODY_BYTES:
                raise ValueError("a body over the limit")
        return bytes(body)

    @staticmethod
    async def _read_chunks(reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY_BYTES:
                raise ValueError("a chunked body over the limit")
            body += await reader.readexactly(size)
            await reader.readexactly(2)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class Http1Clients:
    """One `Http1Connection` per address, kept between polls: GETs to different workers run
    concurrently, GETs to one worker one after another."""

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._connections: dict[str, Http1Connection] = {}

    def __call__(self, address: str) -> Http1Connection:
        connection = self._connections.get(address)
        if connection is None:
            connection = self._connections[address] = Http1Connection(address, timeout_s=self.timeout_s)
        return connection

    def retain(self, addresses: set[str]) -> None:
        """Close the connections to every other address (workers that went away)."""
        for address in [a for a in self._connections if a not in addresses]:
            self._connections.pop(address).close()

    def close(self) -> None:
        self.retain(set())
