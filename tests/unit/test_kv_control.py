"""The control channel on its own: typed calls, pushes acknowledged or the peer cut off, a lost peer noticed."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from kv_transfer.control import Connection, ControlClient, ControlServer
from kv_transfer.errors import PeerError
from kv_transfer.lease import LeaseStatus
from kv_transfer.messages import (ErrorReply, Hello, LeaseCheck, LeaseReply, RegionsAck, RegionsUpdate, Reply,
                                  Request)

UPDATE = RegionsUpdate(name="target", incarnation="i1", regions=[[1, 4096, 64, 0, "DRAM"]], regions_generation=3)


class Target:
    """A server that subscribes every hello, and answers other requests once `answering` is set."""

    def __init__(self) -> None:
        self.answering = threading.Event()
        self.answering.set()
        self.server = ControlServer("127.0.0.1", 0, self.handle)

    def handle(self, conn: Connection, request: Request) -> Reply:
        if isinstance(request, Hello):
            conn.peer_name = request.requester
            self.server.subscribe(conn)
        else:
            self.answering.wait(10)
        return LeaseReply(status=LeaseStatus.HELD)


@pytest.fixture
def target():
    t = Target()
    yield t
    t.answering.set()
    t.server.close()


def ack(update: RegionsUpdate) -> RegionsAck:
    return RegionsAck(regions_generation=update.regions_generation)


def subscribe(target: Target, name: str, on_push=ack, on_lost=None) -> ControlClient:
    client = ControlClient("127.0.0.1", target.server.port, on_push=on_push, on_lost=on_lost)
    client.call(Hello(requester=name))
    return client


def test_calls_are_answered_with_typed_replies(target) -> None:
    client = ControlClient("127.0.0.1", target.server.port)
    try:
        check = LeaseCheck(lease_id="l", generation=1)
        assert client.call(check, expect=LeaseReply) == LeaseReply(status=LeaseStatus.HELD)
        assert client.call_async(check).result(5) == LeaseReply(status=LeaseStatus.HELD)
        with pytest.raises(PeerError, match="answered LeaseReply, not ErrorReply"):
            client.call(check, expect=ErrorReply)
    finally:
        client.close()


def test_a_call_not_answered_in_time_is_a_peer_error(target) -> None:
    client = ControlClient("127.0.0.1", target.server.port)
    target.answering.clear()
    try:
        with pytest.raises(PeerError, match="did not answer in 0.2 s"):
            client.call(LeaseCheck(lease_id="l", generation=1), timeout_s=0.2)
    finally:
        client.close()


def test_an_unreachable_peer_is_a_peer_error() -> None:
    server = ControlServer("127.0.0.1", 0, lambda conn, request: LeaseReply(status=LeaseStatus.HELD))
    port = server.port
    server.close()
    with pytest.raises(PeerError, match="cannot reach"):
        ControlClient("127.0.0.1", port, timeout_s=1.0)


def test_a_push_reaches_every_subscriber_before_it_returns(target) -> None:
    got: list[RegionsUpdate] = []

    def apply(update: RegionsUpdate) -> RegionsAck:
        got.append(update)
        return ack(update)
    clients = [subscribe(target, f"peer{i}", on_push=apply) for i in range(2)]
    try:
        assert target.server.push(UPDATE, timeout_s=5.0) == []
        assert got == [UPDATE, UPDATE]
        assert all(c.alive for c in clients)
    finally:
        for c in clients:
            c.close()


def test_a_subscriber_that_does_not_acknowledge_is_cut_off(target) -> None:
    unstuck, lost = threading.Event(), threading.Event()

    def hang(update: RegionsUpdate) -> RegionsAck:
        unstuck.wait(10)
        return ack(update)
    good = subscribe(target, "good")
    silent = subscribe(target, "silent", on_push=hang, on_lost=lambda c: lost.set())
    try:
        assert target.server.push(UPDATE, timeout_s=0.3) == ["silent"]
        unstuck.set()
        assert lost.wait(5) and not silent.alive
        with pytest.raises(PeerError):
            silent.call(LeaseCheck(lease_id="l", generation=1))
        assert good.alive and target.server.push(UPDATE, timeout_s=5.0) == []
    finally:
        unstuck.set()
        good.close()
        silent.close()


_SERVE = """
import threading
from kv_transfer.control import ControlServer
gate = threading.Event()


def never_answer(conn, request):
    gate.wait()


server = ControlServer("127.0.0.1", 0, never_answer)
print(server.port, flush=True)
threading.Event().wait()
"""


def test_a_killed_peer_fails_pending_calls_and_fires_on_lost() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SERVE], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        lost = threading.Event()
        client = ControlClient("127.0.0.1", port, on_lost=lambda c: lost.set())
        pending = client.call_async(LeaseCheck(lease_id="l", generation=1))  # the peer never answers it
        proc.kill()
        assert lost.wait(5) and not client.alive
        with pytest.raises(PeerError, match="lost"):
            pending.result(5)
    finally:
        proc.kill()
        proc.wait(10)
