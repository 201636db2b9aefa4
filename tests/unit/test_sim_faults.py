"""Injected faults in the simulated deployment: what the real stack does, and no lost request."""

from __future__ import annotations

from disagg.sim.cluster import Faults
from disagg.sim.cost import CostModel
from disagg.sim.simulate import Deployment, simulate
from disagg.sim import trace

PROFILE = CostModel.load("a100-opt-13b")


def requests(rate: float = 8.0, n: int = 320):
    return list(trace.workload("uniform", requests=n, rate=rate, seed=3, prompt=(512, 1536), answer=(16, 64)))


def run(deployment: Deployment, faults: Faults, rate: float = 8.0):
    return simulate(PROFILE, deployment, requests(rate), faults=faults, progress=False)


def test_a_prefill_death_and_failed_transfers_lose_no_request():
    result = run(Deployment(2, 2), Faults(kill_prefill_at_s=15.0, transfer_failure=0.05))
    s, f = result.summary, result.faults
    assert s["completed"] == s["requests"] == 320 and s["lost"] == 0 and s["failed"] == 0
    assert f["prefill_retries"] > 0  # requests on the dead prefill went to the next in the pick
    assert f["transfer_failures"] > 0 and f["leases_expired"] > 0  # recomputed on decode; blocks freed by lease
    assert result.roles["prefill"]["died"] == 1


def test_with_the_only_prefill_dead_decode_prefills_locally():
    result = run(Deployment(1, 2), Faults(kill_prefill_at_s=10.0))
    s, f = result.summary, result.faults
    assert s["completed"] == s["requests"] and s["lost"] == 0
    assert f["local_fallbacks"] > 0
    # once the pool has dropped the dead prefill, picks no longer disaggregate
    late = [d for d, t in zip(result.requests["decision"], result.requests["arrival_s"]) if t > 10.0 + 3.0]
    assert late and set(late) == {"local"}


def test_a_decode_death_fails_its_streams_cleanly_and_later_requests_go_elsewhere():
    result = run(Deployment(1, 2), Faults(kill_decode_at_s=10.0))
    s = result.summary
    assert s["lost"] == 0 and s["unfinished"] == 0
    assert 0 < s["failed"] < 20  # the streams it held end with an error
    assert s["completed"] + s["failed"] == s["requests"]
    failed_at = [t for t, st in zip(result.requests["arrival_s"], result.requests["status"]) if st == "failed"]
    assert max(failed_at) < 10.0 + 2.0  # nothing is sent to it once the pool knows it is dead
