"""Every transfer backend passes the same suite, between two real processes.

The initiator (I) and the target (T) each run an Agent in their own spawned process (one UCX
copy per process); the test drives both over pipes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest

from kv_transfer.backends import available_backends
from disagg.bench.agent_process import AgentProcess, pattern

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 4 * MiB
SRC_SEED, WSRC_SEED = 1, 2
BLOCK = 4096
SENTINEL = 0xAB


@dataclass
class Pair:
    backend: str
    initiator: AgentProcess
    target: AgentProcess
    src: int   # target's base addresses
    wdst: int

    def i(self, method: str, *args, **kwargs):
        return self.initiator.call(method, *args, **kwargs)

    def t(self, method: str, *args, **kwargs):
        return self.target.call(method, *args, **kwargs)


@pytest.fixture(scope="module", params=available_backends())
def pair(request):
    target = AgentProcess("T", request.param)
    initiator = AgentProcess("I", request.param)
    try:
        src = target.call("alloc", "src", SIZE, SRC_SEED)
        wdst = target.call("alloc", "wdst", SIZE)
        initiator.call("alloc", "dst", SIZE)
        initiator.call("alloc", "wsrc", SIZE, WSRC_SEED)
        assert initiator.call("fetch", *target.address) == "T"
        assert target.call("fetch", *initiator.address) == "I"
        yield Pair(request.param, initiator, target, src, wdst)
    finally:
        initiator.close()
        target.close()


@pytest.fixture
def p(pair: Pair) -> Pair:
    pair.i("fill", "dst", SENTINEL)
    pair.t("fill", "wdst", 0)
    pair.t("notifs", 0.0, 1 << 30)  # drop what earlier tests left
    return pair


def expected(seed: int) -> np.ndarray:
    return pattern(SIZE, seed)


def dst(p: Pair) -> np.ndarray:
    return np.frombuffer(p.i("digest", "dst"), np.uint8)


def test_contiguous_read_is_bit_exact(p: Pair) -> None:
    r = p.i("transfer", "READ", "dst", None, "T", [(p.src, SIZE)])
    assert r["state"] == "DONE", r
    assert np.array_equal(dst(p), expected(SRC_SEED))


def test_contiguous_write_is_bit_exact(p: Pair) -> None:
    r = p.i("transfer", "WRITE", "wsrc", None, "T", [(p.wdst, SIZE)])
    assert r["state"] == "DONE", r
    assert np.array_equal(np.frombuffer(p.t("digest", "wdst"), np.uint8), expected(WSRC_SEED))


def test_scattered_read_is_bit_exact(p: Pair) -> None:
    rng = np.random.default_rng(7)
    remote_blocks = rng.permutation(SIZE // BLOCK)[:256]
    r = p.i("transfer", "READ", "dst", [(i * BLOCK, BLOCK) for i in range(len(remote_blocks))], "T",
            [(p.src + int(b) * BLOCK, BLOCK) for b in remote_blocks])
    assert r["state"] == "DONE", r
    got, want = dst(p), expected(SRC_SEED)
    for i, b in enumerate(remote_blocks):
        assert np.array_equal(got[i * BLOCK:(i + 1) * BLOCK], want[b * BLOCK:(b + 1) * BLOCK]), f"block {i}"
    assert (got[len(remote_blocks) * BLOCK:] == SENTINEL).all()


def test_coalesced_read_is_bit_exact(p: Pair) -> None:
    # Runs of 16 consecutive blocks on both sides, coalesced into one descriptor per run.
    runs = [3, 40, 17, 60]
    local = [(k * 16 * BLOCK + j * BLOCK, BLOCK) for k in range(len(runs)) for j in range(16)]
    remote = [(p.src + (r * 16 + j) * BLOCK, BLOCK) for r in runs for j in range(16)]
    r = p.i("transfer", "READ", "dst", local, "T", remote, coalesce=True)
    assert r["state"] == "DONE", r
    got, want = dst(p), expected(SRC_SEED)
    for k, run in enumerate(runs):
        span = 16 * BLOCK
        assert np.array_equal(got[k * span:(k + 1) * span], want[run * span:(run + 1) * span])


def test_scattered_write_is_bit_exact(p: Pair) -> None:
    blocks = [5, 2, 900, 17]
    r = p.i("transfer", "WRITE", "wsrc", [(i * BLOCK, BLOCK) for i in range(4)], "T",
            [(p.wdst + b * BLOCK, BLOCK) for b in blocks])
    assert r["state"] == "DONE", r
    got, want = np.frombuffer(p.t("digest", "wdst"), np.uint8), expected(WSRC_SEED)
    for i, b in enumerate(blocks):
        assert np.array_equal(got[b * BLOCK:(b + 1) * BLOCK], want[i * BLOCK:(i + 1) * BLOCK])


def test_notifications_arrive_after_read_and_write(p: Pair) -> None:
    assert p.i("transfer", "READ", "dst", [(0, BLOCK)], "T", [(p.src, BLOCK)], notif=b"read-done")["state"] == "DONE"
    assert p.i("transfer", "WRITE", "wsrc", [(0, BLOCK)], "T", [(p.wdst, BLOCK)],
               notif=b"write-done")["state"] == "DONE"
    got = p.t("notifs", 5.0, 2)
    assert sorted(got.get("I", [])) == [b"read-done", b"write-done"]


def test_standalone_notification_arrives(p: Pair) -> None:
    p.i("send_notif", "T", b"hello")
    assert p.t("notifs", 5.0, 1) == {"I": [b"hello"]}


def test_out_of_bounds_read_is_refused_and_touches_nothing(p: Pair) -> None:
    r = p.i("transfer", "READ", "dst", [(0, 2 * BLOCK)], "T", [(p.src + SIZE - BLOCK, 2 * BLOCK)])
    assert r["state"] != "DONE" and r["error_kind"] == "AccessError", r
    assert "outside every region" in r["error"]
    assert (dst(p) == SENTINEL).all()


def test_out_of_bounds_write_is_refused_and_touches_nothing(p: Pair) -> None:
    r = p.i("transfer", "WRITE", "wsrc", [(0, BLOCK)], "T", [(p.wdst - BLOCK, BLOCK)])
    assert r["error_kind"] == "AccessError", r
    assert (np.frombuffer(p.t("digest", "wdst"), np.uint8) == 0).all()


def test_unregistered_local_memory_is_refused(p: Pair) -> None:
    p.i("alloc", "unreg", BLOCK, None, False)
    r = p.i("transfer", "READ", "unreg", None, "T", [(p.src, BLOCK)])
    assert r["error_kind"] == "AccessError" and "local descriptor" in r["error"], r


def test_target_refuses_accesses_a_peer_did_not_check(p: Pair) -> None:
    """A buggy or hostile initiator that skips its own checks still cannot reach past the
    target's registrations: two-sided targets check every access, NIXL checks its metadata."""
    r = p.i("raw_post", "READ", "dst", [(0, 2 * BLOCK)], "T", [(p.src + SIZE - BLOCK, 2 * BLOCK)])
    assert r["state"] == "ERR", r
    assert (dst(p) == SENTINEL).all()
    r = p.i("raw_post", "WRITE", "wsrc", [(0, BLOCK)], "T", [(p.wdst + SIZE, BLOCK)])
    assert r["state"] == "ERR", r


def test_deregistered_memory_is_refused_and_touches_nothing(p: Pair) -> None:
    tmp = p.t("alloc", "tmp", 16 * BLOCK, 9)
    assert p.i("transfer", "READ", "dst", [(0, BLOCK)], "T", [(tmp, BLOCK)])["state"] == "DONE"
    p.i("fill", "dst", SENTINEL)
    p.t("deregister", "tmp")
    r = p.i("transfer", "READ", "dst", [(0, BLOCK)], "T", [(tmp, BLOCK)])
    assert r["error_kind"] == "AccessError" and "deregistered" in r["error"], r
    assert (dst(p) == SENTINEL).all()
    r = p.i("transfer", "WRITE", "wsrc", [(0, BLOCK)], "T", [(tmp, BLOCK)])
    assert r["error_kind"] == "AccessError", r
    assert np.array_equal(np.frombuffer(p.t("digest", "tmp"), np.uint8), pattern(16 * BLOCK, 9))


def test_two_sided_target_refuses_deregistered_memory_itself(p: Pair) -> None:
    if p.backend == "nixl":
        pytest.skip("one-sided: the target never sees the access; the region push above covers it")
    tmp = p.t("alloc", "tmp2", 4 * BLOCK, 9)
    p.t("deregister", "tmp2")
    r = p.i("raw_post", "READ", "dst", [(0, BLOCK)], "T", [(tmp, BLOCK)])
    assert r["state"] == "ERR" and "deregistered" in r["error"], r
    assert (dst(p) == SENTINEL).all()


def test_read_under_a_held_lease_succeeds_and_ack_releases_it(p: Pair) -> None:
    lease = p.t("grant_lease", 30.0)
    r = p.i("transfer", "READ", "dst", [(0, BLOCK)], "T", [(p.src, BLOCK)], lease=lease, release_lease=True)
    assert r["state"] == "DONE", r
    assert (lease[0], "released") in p.t("lease_events")


def test_read_after_lease_expiry_is_refused(p: Pair) -> None:
    lease = p.t("grant_lease", 0.2)
    time.sleep(0.3)
    r = p.i("transfer", "READ", "dst", [(0, BLOCK)], "T", [(p.src, BLOCK)], lease=lease)
    assert r["error_kind"] == "LeaseError", r
    assert (dst(p) == SENTINEL).all()  # refused before posting: the expiry time was known


def test_read_completing_after_lease_expiry_is_reported_failed(p: Pair) -> None:
    """The initiator does not know the expiry (or its clock is off): the data moves, but the
    target's confirmation finds the lease expired, so the read ends ERR (generation check)."""
    lease_id, generation, _ = p.t("grant_lease", 0.2)
    time.sleep(0.3)
    r = p.i("transfer", "READ", "dst", [(0, BLOCK)], "T", [(p.src, BLOCK)],
            lease=(lease_id, generation, float("inf")))
    assert r["state"] == "ERR" and r["error_kind"] == "LeaseError", r
    assert "expired" in r["error"]
    assert (lease_id, "expired") in p.t("lease_events")


def test_read_naming_an_older_lease_generation_fails(p: Pair) -> None:
    lease_id, generation, _ = p.t("grant_lease", 30.0)
    r = p.i("transfer", "READ", "dst", [(0, BLOCK)], "T", [(p.src, BLOCK)],
            lease=(lease_id, generation - 1, float("inf")))
    assert r["state"] == "ERR" and r["error_kind"] == "LeaseError", r


def test_dead_target_fails_the_transfer_instead_of_hanging(pair: Pair) -> None:
    victim = AgentProcess("V", pair.backend)
    try:
        addr = victim.call("alloc", "buf", SIZE, 3)
        assert pair.i("fetch", *victim.address) == "V"
        victim.kill()
        time.sleep(0.2)
        t0 = time.monotonic()
        r = pair.i("transfer", "READ", "dst", None, "V", [(addr, SIZE)], timeout_s=20)
        assert r["state"] != "DONE", r
        assert time.monotonic() - t0 < 15
    finally:
        victim.kill()
