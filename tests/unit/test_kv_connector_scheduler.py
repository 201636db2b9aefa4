"""The connector's scheduler half: which tokens a decode claims, which blocks it loads, what a
prefill hands back, and when a lease is released without a read."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from kv_transfer.connector.params import ConnectorSettings, RemotePrefill
from kv_transfer.connector.scheduler import SchedulerSide

BLOCK = 32
LAYOUT = "abc123"


@dataclass
class FakeRequest:
    request_id: str
    kv_transfer_params: dict[str, Any] | None
    num_prompt_tokens: int = 300
    num_computed_tokens: int = 0
    status: Any = None


@dataclass
class FakeBlocks:
    all_ids: list[int]
    unhashed: list[int] = field(default_factory=list)

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.all_ids,)

    def get_unhashed_block_ids(self) -> list[int]:
        return self.unhashed


@pytest.fixture
def side(monkeypatch) -> SchedulerSide:
    s = SchedulerSide("engine-p", ConnectorSettings(lease_s=30, host="10.0.0.5", port=4242), BLOCK, LAYOUT)
    s.released: list[str] = []  # type: ignore[misc]
    monkeypatch.setattr(s, "release", lambda remote: s.released.append(remote.lease_id))  # type: ignore[attr-defined]
    return s


def remote_params(**over: Any) -> dict[str, Any]:
    p = RemotePrefill(remote_engine_id="engine-p", remote_request_id="r1", remote_block_ids=list(range(100, 110)),
                      remote_host="10.0.0.5", remote_port=4242, remote_num_tokens=300, lease_id="engine-p/r1",
                      lease_generation=1, lease_expires_at=time.time() + 30, layout=LAYOUT).to_params()
    p.update(over)
    return p


def test_prefill_keeps_blocks_under_a_lease_and_returns_nixl_keys(side: SchedulerSide) -> None:
    from vllm.v1.request import RequestStatus

    req = FakeRequest("r1", {"do_remote_decode": True}, num_computed_tokens=300,
                      status=RequestStatus.FINISHED_LENGTH_CAPPED)
    delay, params = side.request_finished(req, list(range(20, 31)))  # one block more than computed
    assert delay is True and params is not None
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_block_ids"] == list(range(20, 30))
    assert (params["remote_host"], params["remote_port"], params["remote_engine_id"]) == ("10.0.0.5", 4242, "engine-p")
    assert params["layout"] == LAYOUT and params["lease_expires_at"] > time.time() + 20
    meta = side.build_connector_meta()
    assert [(h.request_id, h.lease_id, h.lease_generation) for h in meta.holds] == [("r1", params["lease_id"], 1)]
    assert side.build_connector_meta().holds == []


def test_handshake_names_the_bound_address(side: SchedulerSide) -> None:
    from vllm.v1.request import RequestStatus

    from kv_transfer.connector.messages import DisaggHandshake

    side.set_handshake({0: DisaggHandshake(host="127.0.0.1", port=5555, agent_name="a")})
    req = FakeRequest("r1", {"do_remote_decode": True}, num_computed_tokens=40, status=RequestStatus.FINISHED_STOPPED)
    _, params = side.request_finished(req, [1, 2])
    assert params is not None and (params["remote_host"], params["remote_port"]) == ("127.0.0.1", 5555)


def test_aborted_prefill_hands_nothing_off(side: SchedulerSide) -> None:
    from vllm.v1.request import RequestStatus

    req = FakeRequest("r1", {"do_remote_decode": True}, num_computed_tokens=300,
                      status=RequestStatus.FINISHED_ABORTED)
    assert side.request_finished(req, [1, 2, 3]) == (False, None)
    assert side.build_connector_meta().holds == []


def test_lease_generations_grow(side: SchedulerSide) -> None:
    from vllm.v1.request import RequestStatus

    gens = [side.request_finished(FakeRequest("same", {"do_remote_decode": True}, num_computed_tokens=10,
                                              status=RequestStatus.FINISHED_STOPPED), [1])[1]["lease_generation"]
            for _ in range(3)]
    assert gens == sorted(set(gens))


def test_decode_claims_the_prompt_as_external_and_async(side: SchedulerSide) -> None:
    req = FakeRequest("d1", remote_params())
    assert side.get_num_new_matched_tokens(req, 0) == (300, True)
    assert side.get_num_new_matched_tokens(req, 64) == (236, True)  # local prefix hit of two blocks


def test_decode_loads_the_unhashed_blocks_from_the_matching_remote_blocks(side: SchedulerSide) -> None:
    req = FakeRequest("d1", remote_params())
    side.update_state_after_alloc(req, FakeBlocks([7, 8, 50, 51, 52, 53, 54, 55, 56, 57], [50, 51, 52, 53, 54, 55, 56, 57]),
                                  236)
    (load,) = side.build_connector_meta().loads
    assert load.local_block_ids == [50, 51, 52, 53, 54, 55, 56, 57]
    assert load.remote_block_ids == list(range(102, 110))  # the first two were cached locally
    assert req.kv_transfer_params["do_remote_prefill"] is False  # one transfer per request
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)


@pytest.mark.parametrize("over", [{"layout": "other"}, {"lease_expires_at": time.time() + 0.1},
                                  {"remote_block_ids": [1, 2]}, {"lease_id": None}])
def test_decode_prefills_locally_when_the_remote_kv_is_unusable(side: SchedulerSide, over: dict) -> None:
    assert side.get_num_new_matched_tokens(FakeRequest("d1", remote_params(**over)), 0) == (0, False)


def test_nothing_to_load_releases_the_lease_at_once(side: SchedulerSide) -> None:
    req = FakeRequest("d1", remote_params())
    side.update_state_after_alloc(req, FakeBlocks([1, 2, 3]), 0)
    assert side.released == ["engine-p/r1"]  # type: ignore[attr-defined]
    assert side.build_connector_meta().loads == []


def test_rejected_decode_request_releases_the_lease(side: SchedulerSide) -> None:
    # AsyncLLM.notify_kv_transfer_request_rejected submits a pre-aborted request.
    req = FakeRequest("d1", remote_params())
    assert side.request_finished(req, []) == (False, None)
    assert side.released == ["engine-p/r1"]  # type: ignore[attr-defined]


def test_nixl_style_nested_block_ids_are_accepted() -> None:
    p = RemotePrefill.parse(remote_params(remote_block_ids=[[4, 5, 6]]))
    assert p is not None and p.remote_block_ids == [4, 5, 6]


def test_non_disagg_params_are_ignored(side: SchedulerSide) -> None:
    assert side.get_num_new_matched_tokens(FakeRequest("x", None), 0) == (0, False)
    assert side.get_num_new_matched_tokens(FakeRequest("x", {"do_remote_prefill": True}), 0) == (0, False)
    assert side.request_finished(FakeRequest("x", {}), [1]) == (False, None)
