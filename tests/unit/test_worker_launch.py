"""The worker's HTTP port is bound when the worker starts, before its engine: nothing else can
take it during the engine's start, and a port already taken is a clear error at once."""

from __future__ import annotations

import socket

import pytest

from disagg.worker.launch import listen


def test_the_port_is_held_from_the_start() -> None:
    sock = listen("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # already accepting connections
            pass
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} for the worker's HTTP endpoint"):
            listen("127.0.0.1", port)
    finally:
        sock.close()
