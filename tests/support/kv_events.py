"""vLLM's KV event publisher, stood in for: its wire protocol (PUB + ROUTER replay) from a thread,
for the routing tests."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import msgspec
import zmq


class FakeKVPublisher:
    """vLLM's ZmqEventPublisher wire protocol: PUB binds `endpoint`, ROUTER binds
    `replay_endpoint`; every published batch is kept for replay."""

    def __init__(self, *, topic: str = "") -> None:
        self.topic = topic.encode()
        self._seq = itertools.count()
        self._buffer: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self.port = self._pub.bind_to_random_port("tcp://127.0.0.1")
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self.replay_port = self._router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.replay_endpoint = f"tcp://127.0.0.1:{self.replay_port}"
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
