"""Region checks and leases: the two safety rules of every transfer."""

from __future__ import annotations

import threading
import time

import pytest

from kv_transfer.descriptors import DescList
from kv_transfer.errors import AccessError
from kv_transfer.lease import LeaseStatus, LeaseTable, LeaseToken
from kv_transfer.regions import Region, RegionTable


def table(*spans: tuple[int, int]) -> RegionTable:
    t = RegionTable("T")
    for i, (addr, n) in enumerate(spans):
        t.add(Region(i + 1, addr, n))
    return t


def test_access_inside_a_region_passes() -> None:
    table((1000, 100), (5000, 10)).check(DescList.from_descs([(1000, 100), (1050, 10), (5000, 10)]))


@pytest.mark.parametrize("span", [(990, 20), (1090, 20), (1100, 1), (0, 1), (5005, 10)])
def test_access_outside_every_region_is_refused(span: tuple[int, int]) -> None:
    with pytest.raises(AccessError, match="outside every region"):
        table((1000, 100), (5000, 10)).check(DescList.from_descs([(1000, 4), span]))


def test_access_spanning_two_adjacent_regions_is_refused() -> None:
    # Each descriptor must lie in one registration (as NIXL requires), not across two.
    with pytest.raises(AccessError):
        table((1000, 100), (1100, 100)).check(DescList.from_descs([(1050, 100)]))


def test_overlapping_registrations_cover_their_union() -> None:
    t = table((1000, 100), (1010, 10), (1050, 200))
    t.check(DescList.from_descs([(1060, 150), (1000, 60)]))


def test_deregistered_region_is_refused_and_named() -> None:
    t = table((1000, 100))
    t.remove(1)
    with pytest.raises(AccessError, match="deregistered"):
        t.check(DescList.from_descs([(1000, 10)]))


def test_devices_are_checked_separately() -> None:
    t = RegionTable("T")
    t.add(Region(1, 1000, 100, dev_id=1, mem_type="VRAM"))
    t.check(DescList.from_descs([(1000, 10, 1)], "VRAM"))
    with pytest.raises(AccessError):
        t.check(DescList.from_descs([(1000, 10, 0)], "VRAM"))
    with pytest.raises(AccessError):
        t.check(DescList.from_descs([(1000, 10, 1)], "DRAM"))


def test_deregistration_waits_for_accesses_being_served() -> None:
    t = table((1000, 100))
    removed = threading.Event()
    with t.access(DescList.from_descs([(1000, 10)])):
        thread = threading.Thread(target=lambda: (t.remove(1), removed.set()))
        thread.start()
        time.sleep(0.05)
        assert not removed.is_set()
    thread.join(2)
    assert removed.is_set()


def test_replace_ignores_older_generations_and_reports_removed_regions() -> None:
    t = table((1000, 100), (2000, 100))
    gone = t.replace([Region(2, 2000, 100)], generation=10)
    assert [r.region_id for r in gone] == [1]
    assert t.replace([], generation=3) == [] and len(t) == 1


def test_lease_held_then_released_by_acknowledgement() -> None:
    leases = LeaseTable(30)
    lease = leases.grant()
    assert leases.check(lease.token) is LeaseStatus.HELD
    assert leases.release(lease.token) is LeaseStatus.RELEASED
    assert leases.check(lease.token) is LeaseStatus.RELEASED
    assert [(e.lease.lease_id, e.status) for e in leases.take_events()] == [(lease.lease_id, LeaseStatus.RELEASED)]
    assert leases.take_events() == []


def test_lease_expires() -> None:
    leases = LeaseTable(0.05)
    lease = leases.grant()
    time.sleep(0.1)
    assert leases.check(lease.token, release=True) is LeaseStatus.EXPIRED
    assert [e.status for e in leases.take_events()] == [LeaseStatus.EXPIRED]


def test_lease_renewal_extends_expiry() -> None:
    leases = LeaseTable(0.2)
    lease = leases.grant()
    status, renewed = leases.renew(lease.token, ttl_s=5)
    assert status is LeaseStatus.HELD and renewed is not None and renewed.expires_at > lease.expires_at
    time.sleep(0.3)
    assert leases.check(lease.token) is LeaseStatus.HELD


def test_older_generation_of_a_lease_id_is_refused() -> None:
    leases = LeaseTable(30)
    leases.hold(LeaseToken("req-1", 1))
    leases.hold(LeaseToken("req-1", 2))  # the same blocks handed out again
    assert leases.check(LeaseToken("req-1", 1), release=True) is LeaseStatus.EXPIRED
    assert leases.check(LeaseToken("req-1", 2)) is LeaseStatus.HELD
    with pytest.raises(ValueError):
        leases.hold(LeaseToken("req-1", 1))


def test_unknown_lease_can_wait_for_a_racing_grant() -> None:
    leases = LeaseTable(30)
    token = LeaseToken("late", 1)
    threading.Timer(0.05, lambda: leases.hold(token)).start()
    assert leases.check(token, release=True, wait_s=2) is LeaseStatus.RELEASED
    assert leases.check(LeaseToken("never", 1), wait_s=0.05) is LeaseStatus.UNKNOWN


def test_revoked_lease_queues_no_event() -> None:
    leases = LeaseTable(30)
    lease = leases.grant()
    assert leases.revoke(lease.lease_id) is not None
    assert leases.take_events() == []
