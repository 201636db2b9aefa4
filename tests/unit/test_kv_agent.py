"""The Agent's NIXL vocabulary, checks and leases, in one process over the tcp backend (no UCX)."""

from __future__ import annotations

import asyncio
import time

import msgspec
import numpy as np
import pytest

from kv_transfer import Agent, XferState
from kv_transfer.descriptors import DescList
from kv_transfer.errors import AccessError, LeaseError, PeerError
from kv_transfer.lease import LeaseStatus, LeaseToken
from kv_transfer.messages import AgentMetadata
from kv_transfer.metrics import TransferMetrics, TransferStats


@pytest.fixture
def agents():
    target, initiator = Agent("target", "tcp"), Agent("initiator", "tcp")
    src = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.zeros(1 << 20, np.uint8)
    target.register_memory(src)
    initiator.register_memory(dst)
    assert initiator.fetch_remote_metadata(*target.address) == "target"
    yield target, initiator, src, dst
    initiator.close()
    target.close()


def read(initiator: Agent, dst: np.ndarray, src: np.ndarray, **kw) -> XferState:
    h = initiator.initialize_xfer("READ", initiator.get_xfer_descs(dst), initiator.get_xfer_descs(src), "target", **kw)
    initiator.transfer(h)
    try:
        initiator.wait_xfer_sync(h, 10)
    except Exception:
        pass
    return h.state


def test_read_with_notification(agents) -> None:
    target, initiator, src, dst = agents
    h = initiator.initialize_xfer("READ", initiator.get_xfer_descs(dst), initiator.get_xfer_descs(src), "target", b"n1")
    assert initiator.transfer(h) in (XferState.PROC, XferState.DONE)
    asyncio.run(initiator.wait_xfer(h, 10))
    assert np.array_equal(dst, src)
    deadline = time.monotonic() + 5
    notifs: dict = {}
    while not notifs and time.monotonic() < deadline:
        notifs = target.get_new_notifs()
    assert notifs == {"initiator": [b"n1"]}


def test_metadata_bytes_round_trip_through_add_remote_agent(agents) -> None:
    target, _, src, dst = agents
    other = Agent("other", "tcp")
    try:
        other.register_memory(dst)
        assert other.add_remote_agent(target.get_agent_metadata()) == "target"
        assert read(other, dst, src) is XferState.DONE
    finally:
        other.close()


def test_length_mismatch_is_a_usage_error(agents) -> None:
    _, initiator, src, dst = agents
    with pytest.raises(ValueError):
        initiator.initialize_xfer("READ", DescList.from_descs([(dst.ctypes.data, 10)]),
                                  DescList.from_descs([(src.ctypes.data, 11)]), "target")


def test_unknown_remote_is_refused(agents) -> None:
    _, initiator, src, dst = agents
    with pytest.raises(PeerError):
        initiator.initialize_xfer("READ", initiator.get_xfer_descs(dst), initiator.get_xfer_descs(src), "nobody")


def test_backend_mismatch_is_refused() -> None:
    a, b = Agent("a", "tcp"), None
    try:
        md = a.get_agent_metadata()
        forged = msgspec.structs.replace(msgspec.msgpack.decode(md, type=AgentMetadata), backend="nixl")
        b = Agent("b", "tcp")
        with pytest.raises(PeerError, match="backend"):
            b.add_remote_agent(msgspec.msgpack.encode(forged))
    finally:
        a.close()
        if b is not None:
            b.close()


def test_deregistration_reaches_peers_before_it_returns(agents) -> None:
    target, initiator, _, dst = agents
    extra = np.ones(4096, np.uint8)
    reg = target.register_memory(extra)
    assert read(initiator, dst[:4096], extra) is XferState.DONE
    target.deregister_memory(reg)
    with pytest.raises(AccessError, match="deregistered"):
        initiator.initialize_xfer("READ", initiator.get_xfer_descs(dst[:4096]), initiator.get_xfer_descs(extra), "target")


def test_lease_released_by_acknowledging_read(agents) -> None:
    target, initiator, src, dst = agents
    lease = target.grant_lease(30)
    assert read(initiator, dst, src, lease=lease, release_lease=True) is XferState.DONE
    assert [e.status for e in target.take_lease_events()] == [LeaseStatus.RELEASED]


def test_read_after_expiry_fails_even_when_posted(agents) -> None:
    target, initiator, src, dst = agents
    lease = target.grant_lease(0.05)
    time.sleep(0.1)
    h = initiator.initialize_xfer("READ", initiator.get_xfer_descs(dst), initiator.get_xfer_descs(src), "target",
                                  lease=lease.token)  # expiry unknown to the initiator: it posts
    initiator.transfer(h)
    with pytest.raises(LeaseError, match="expired"):
        initiator.wait_xfer_sync(h, 10)
    assert target.take_lease_events()[0].status is LeaseStatus.EXPIRED


def test_remote_lease_renewal(agents) -> None:
    target, initiator, _, _ = agents
    lease = target.grant_lease(0.3)
    new_expiry = initiator.renew_remote_lease("target", lease.token, ttl_s=10)
    assert new_expiry > lease.expires_at + 5
    time.sleep(0.4)
    assert initiator.confirm_lease("target", lease.token) is LeaseStatus.HELD
    assert initiator.confirm_lease("target", lease.token, release=True) is LeaseStatus.RELEASED
    with pytest.raises(LeaseError):
        initiator.renew_remote_lease("target", lease.token)


def test_wait_xfer_does_not_spin_a_core(agents) -> None:
    target, initiator, src, dst = agents
    # A lease the target has never heard of: it waits ~2 s for a racing grant before saying so,
    # and the transfer sits in PROC meanwhile.
    h = initiator.initialize_xfer("READ", initiator.get_xfer_descs(dst), initiator.get_xfer_descs(src), "target",
                                  lease=LeaseToken("not-yet", 1))
    initiator.transfer(h)
    # This thread's CPU, where wait_xfer polls (the process's would count what other tests of this
    # pytest process left running).
    cpu0, wall0 = time.thread_time(), time.monotonic()
    with pytest.raises(LeaseError):
        asyncio.run(initiator.wait_xfer(h, 10))
    wall, cpu = time.monotonic() - wall0, time.thread_time() - cpu0
    assert wall > 1.0
    assert cpu < 0.3 * wall, (cpu, wall)


def test_restarted_peer_replaces_the_old_incarnation(agents) -> None:
    target, initiator, src, dst = agents
    old = initiator.remote_incarnation("target")
    target.close()
    reborn = Agent("target", "tcp")
    try:
        reborn.register_memory(src)
        initiator.fetch_remote_metadata(*reborn.address)
        assert initiator.remote_incarnation("target") not in (None, old)
        assert read(initiator, dst, src) is XferState.DONE
    finally:
        reborn.close()


def test_transfers_are_counted(agents) -> None:
    _, initiator, src, dst = agents
    initiator.stats.take()
    read(initiator, dst, src)
    with pytest.raises(AccessError):
        initiator.initialize_xfer("READ", initiator.get_xfer_descs(dst), DescList.from_descs([(8, 1 << 20)]), "target")
    snap = initiator.stats.take()
    assert snap["count"] == {"tcp|READ": 1} and snap["bytes"] == {"tcp|READ": 1 << 20}
    metrics = TransferMetrics()
    metrics.observe(snap)
    assert not TransferStats.is_empty(snap)
