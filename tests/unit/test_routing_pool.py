"""EndpointPool: compatibility at registration, restarts, freshness and death."""

from __future__ import annotations

import pytest

from disagg.routing import EndpointPool, IncompatibleWorkerError
from disagg.bench.standin import make_info, make_layout
from disagg.messages import EngineLoad


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pool(clock: Clock) -> EndpointPool:
    return EndpointPool(model="tiny", block_size=32, stale_after_s=0.5, dead_after_s=2.0, clock=clock)


def test_upsert_adds_endpoint_by_role(pool: EndpointPool) -> None:
    pool.upsert(make_info("decode", "10.0.0.1:8000"))
    pool.upsert(make_info("prefill", "10.0.0.2:8000"))
    assert [e.address for e in pool.endpoints("decode")] == ["10.0.0.1:8000"]
    assert [e.address for e in pool.endpoints("prefill")] == ["10.0.0.2:8000"]


def test_worker_of_another_model_is_refused(pool: EndpointPool) -> None:
    with pytest.raises(IncompatibleWorkerError, match="serves model 'other'"):
        pool.upsert(make_info("decode", "10.0.0.1:8000", model="other"))


def test_worker_with_another_block_size_is_refused(pool: EndpointPool) -> None:
    with pytest.raises(IncompatibleWorkerError, match="block size 64"):
        pool.upsert(make_info("decode", "10.0.0.1:8000", block_size=64))


def test_worker_with_another_layout_is_refused_with_both_layouts_named(pool: EndpointPool) -> None:
    pool.upsert(make_info("decode", "10.0.0.1:8000"))
    odd = make_info("prefill", "10.0.0.2:8000").model_copy(update={"layout": make_layout(dtype="bfloat16")})
    with pytest.raises(IncompatibleWorkerError, match="bfloat16.*float32|float32.*bfloat16"):
        pool.upsert(odd)
    assert len(pool) == 1


def test_layout_resets_when_pool_empties(pool: EndpointPool) -> None:
    first = pool.upsert(make_info("decode", "10.0.0.1:8000"))
    pool.remove(first.engine_id)
    odd = make_info("decode", "10.0.0.1:8000").model_copy(update={"layout": make_layout(dtype="bfloat16")})
    pool.upsert(odd)
    assert pool.layout_fingerprint == odd.layout.fingerprint()


def test_restarted_worker_replaces_its_old_engine(pool: EndpointPool) -> None:
    removed = []
    pool.on_remove(lambda e, reason: removed.append((e.engine_id, reason)))
    pool.upsert(make_info("decode", "10.0.0.1:8000", engine_id="old"))
    pool.upsert(make_info("decode", "10.0.0.1:8000", engine_id="new"))
    assert [e.engine_id for e in pool.endpoints()] == ["new"]
    assert removed == [("old", "replaced")]


def test_silent_endpoint_is_dead_at_once_and_forgotten_later(pool: EndpointPool, clock: Clock) -> None:
    a = pool.upsert(make_info("decode", "10.0.0.1:8000"))
    b = pool.upsert(make_info("decode", "10.0.0.2:8000"))
    clock.now += 1.5
    pool.update_load(b.engine_id, EngineLoad())
    clock.now += 0.6  # a: silent 2.1 s, b: 0.6 s
    assert pool.endpoints("decode") == [b]
    assert pool.dead_endpoints("decode") == [a]
    assert pool.sweep() == []
    pool.update_load(b.engine_id, EngineLoad())
    clock.now += 8  # a: silent 10.1 s, past forget_after_s
    assert pool.sweep() == [a]
    assert a.engine_id not in pool


def test_rediscovery_does_not_revive_a_silent_endpoint(pool: EndpointPool, clock: Clock) -> None:
    info = make_info("decode", "10.0.0.1:8000")
    pool.upsert(info)
    clock.now += 3
    pool.upsert(info)
    assert pool.endpoints("decode") == []


def test_forgotten_endpoint_listed_again_comes_back_dead(pool: EndpointPool, clock: Clock) -> None:
    info = make_info("decode", "10.0.0.1:8000")
    pool.upsert(info)
    clock.now += 11
    pool.sweep()
    assert len(pool) == 0
    pool.upsert(info)  # a discovery source still lists it
    assert pool.endpoints("decode") == []
    pool.update_load(info.engine_id, EngineLoad())  # it answered a scrape: alive again
    assert [e.engine_id for e in pool.endpoints("decode")] == [info.engine_id]


def test_freshness_falls_from_stale_to_dead(pool: EndpointPool, clock: Clock) -> None:
    e = pool.upsert(make_info("decode", "10.0.0.1:8000"))
    assert pool.freshness(e, clock.now + 0.4) == 1.0
    assert pool.freshness(e, clock.now + 1.25) == pytest.approx(0.5)
    assert pool.freshness(e, clock.now + 2.5) == 0.0


def test_load_signal_clears_pending_picks(pool: EndpointPool) -> None:
    e = pool.upsert(make_info("decode", "10.0.0.1:8000"))
    for at in (10.0, 11.0, 12.0):
        e.book(at)
    pool.update_load(e.engine_id, EngineLoad(waiting=1, running=2))  # as of now: counts them all
    assert e.pending == 0 and e.queue == 3


def test_a_load_signal_keeps_the_picks_it_cannot_know_of_yet(pool: EndpointPool) -> None:
    # A report sent at 11.5 counts the picks booked before it, not the one at 12 (nor a peer's
    # pick booked at 11.8 whose notice arrives after that one).
    e = pool.upsert(make_info("decode", "10.0.0.1:8000"))
    for at in (10.0, 11.0, 12.0, 11.8):
        e.book(at)
    assert e.pending == 4 and e.queue == 4
    pool.update_load(e.engine_id, EngineLoad(running=2), as_of=11.5)
    assert e.pending == 2 and e.queue == 4


def test_replace_all_adds_compatible_and_reports_incompatible(pool: EndpointPool) -> None:
    pool.upsert(make_info("decode", "10.0.0.9:8000"))
    errors = pool.replace_all([make_info("decode", "10.0.0.1:8000"), make_info("decode", "10.0.0.2:8000", model="x")])
    assert [e.address for e in pool.endpoints()] == ["10.0.0.1:8000"]
    assert len(errors) == 1
