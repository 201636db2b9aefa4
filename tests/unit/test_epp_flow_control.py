"""Flow control in the EPP (disagg.epp.flow_control): while every decode is saturated, requests
wait in priority bands, fair between tenants, for at most a TTL, and a full queue sheds the
sheddable first. Driven over the real gRPC path (a grpcio client against `start_epp`, plaintext)
and `POST /v1/pick`; capacity frees when a load report says fewer requests wait."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import grpc
import httpx
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import REGISTRY

from disagg.bench.standin import make_info
from disagg.config import FlowControlConfig, RoutingConfig
from disagg.epp.flow_control import FlowKey, FlowQueue, Waiting, flow_key
from disagg.epp.picker import EndpointPicker
from disagg.epp.prompt import RawPromptReader
from disagg.epp.server import start_epp
from disagg.messages import EngineLoad
from disagg.routing import Scheduler
from tests.unit.test_epp_protocol import body_msgs, completion, headers_msg, set_headers

LIMIT = 2  # max_waiting_per_worker: a decode reporting 2 waiting is saturated
DEST = "x-gateway-destination-endpoint"
REASON = "x-disagg-dropped-reason"


class EPP:
    """A running EPP with one saturated decode, and a grpcio client."""

    def __init__(self, running, scheduler: Scheduler, channel: grpc.aio.Channel) -> None:
        self.running, self.scheduler, self.channel = running, scheduler, channel
        self.stub = pb_grpc.ExternalProcessorStub(channel)
        self.decode = scheduler.pool.upsert(make_info("decode", "10.0.0.1:8000"))
        self.report(waiting=LIMIT)

    @property
    def flow(self):
        return self.running.picker.flow

    def report(self, waiting: int) -> None:
        """A load report from the decode (its pending picks are in it from now on)."""
        self.scheduler.pool.update_load(self.decode.engine_id, EngineLoad(waiting=waiting))

    def free(self, slots: int) -> None:
        """Room for `slots` more requests."""
        self.report(LIMIT - slots)

    def request(self, *, priority: int | None = None, tenant: str | None = None, objective: str | None = None,
                size: int = 10, timeout: float | None = None) -> asyncio.Task:
        """Send one request on its own stream; the task's result is its first answer (the rest
        of the stream is read too)."""
        message = headers_msg()
        extra = {"x-disagg-priority": priority, "x-gateway-inference-fairness-id": tenant,
                 "x-gateway-inference-objective": objective}
        for key, value in extra.items():
            if value is not None:
                message.request_headers.headers.headers.add(key=key, raw_value=str(value).encode())
        call = self.stub.Process(iter([message, *body_msgs(completion(size))]), timeout=timeout)

        async def first() -> pb.ProcessingResponse:
            answer = await call.read()
            while await call.read() is not grpc.aio.EOF:
                pass
            return answer

        task = asyncio.ensure_future(first())
        task.call = call  # type: ignore[attr-defined]
        return task

    async def queued(self, n: int) -> None:
        """Until `n` requests wait."""
        for _ in range(500):
            if self.flow.queue.count == n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.flow.queue.count} requests wait, not {n}")


@contextlib.asynccontextmanager
async def epp(**flow):
    defaults = {"ttl_s": 10.0, "poll_interval_s": 0.005}
    routing = RoutingConfig(max_waiting_per_worker=LIMIT, stale_after_s=60, dead_after_s=120,
                            flow_control=FlowControlConfig(**{**defaults, **flow}))
    scheduler = Scheduler(routing, model="tiny", block_size=32)
    running = await start_epp(EndpointPicker(scheduler, RawPromptReader("tiny")), host="127.0.0.1", grpc_port=0,
                              health_port=0, metrics_port=0, secure_serving=False)
    channel = grpc.aio.insecure_channel(running.grpc_address)
    try:
        yield EPP(running, scheduler, channel)
    finally:
        await channel.close()
        await running.stop()


def routed(response: pb.ProcessingResponse) -> bool:
    return response.WhichOneof("response") == "request_headers" and DEST in set_headers(
        response.request_headers.response)


def refusal(response: pb.ProcessingResponse) -> tuple[int, str]:
    immediate = response.immediate_response
    return immediate.status.code, {h.header.key: h.header.raw_value.decode()
                                   for h in immediate.headers.set_headers}.get(REASON, "")


async def dispatch_order(e: EPP, tasks: dict[str, asyncio.Task]) -> list[str]:
    """Free one slot at a time; the names of the requests in the order they are routed."""
    order = []
    pending = dict(tasks)
    while pending:
        e.free(1)
        done, _ = await asyncio.wait(pending.values(), timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, f"{len(done)} answered for one free slot"
        name = next(n for n, t in pending.items() if t in done)
        assert routed(pending.pop(name).result())
        order.append(name)
    return order


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_request_waits_while_saturated_and_is_routed_when_capacity_frees() -> None:
    async with epp() as e:
        task = e.request()
        await e.queued(1)
        await asyncio.sleep(0.05)
        assert not task.done()
        e.free(1)
        response = await asyncio.wait_for(task, 5)
        assert routed(response) and set_headers(response.request_headers.response)[DEST] == "10.0.0.1:8000"
        assert await task.call.code() == grpc.StatusCode.OK  # type: ignore[attr-defined]
        assert e.flow.queue.count == 0


async def test_higher_priority_bands_dispatch_first() -> None:
    async with epp(objectives={"premium": 10, "batch": -5}) as e:
        tasks = {}
        for name, options in [("p0", {}), ("batch", {"objective": "batch"}), ("p5", {"priority": 5}),
                              ("premium", {"objective": "premium"}), ("unknown-objective", {"objective": "nope"})]:
            tasks[name] = e.request(**options)
            await e.queued(len(tasks))
        assert await dispatch_order(e, tasks) == ["premium", "p5", "p0", "unknown-objective", "batch"]


async def test_tenants_take_turns_within_a_band_and_each_is_first_come_first_served() -> None:
    async with epp() as e:
        tasks = {}
        for name, tenant in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("b2", "b"), ("c1", "c")]:
            tasks[name] = e.request(tenant=tenant)
            await e.queued(len(tasks))
        assert await dispatch_order(e, tasks) == ["a1", "b1", "c1", "a2", "b2", "a3"]


async def test_one_load_report_releases_only_what_the_decodes_have_room_for() -> None:
    async with epp() as e:
        tasks = [e.request() for _ in range(5)]
        await e.queued(5)
        for released in (2, 4):  # room for two: the picks sent since the report count against it
            e.free(2)
            await asyncio.sleep(0.2)
            assert sum(t.done() for t in tasks) == released and e.flow.queue.count == 5 - released
        e.free(1)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert all(routed(t.result()) for t in tasks)


async def test_a_request_waits_at_most_its_ttl_then_503_ttl_expired() -> None:
    async with epp(ttl_s=0.3) as e:
        before = sample("disagg_epp_flow_control_dropped_total", reason="ttl-expired", band="0")
        waits = sample("disagg_epp_flow_control_wait_seconds_count", outcome="ttl-expired", band="0")
        started = time.monotonic()
        response = await asyncio.wait_for(e.request(), 5)
        assert 0.25 < time.monotonic() - started < 2
        assert refusal(response) == (503, "ttl-expired")
        assert json.loads(response.immediate_response.body)["error"]["code"] == "503"
        assert sample("disagg_epp_flow_control_dropped_total", reason="ttl-expired", band="0") == before + 1
        assert sample("disagg_epp_flow_control_wait_seconds_count", outcome="ttl-expired", band="0") == waits + 1


async def test_the_wait_ends_before_the_clients_deadline() -> None:
    # Envoy's ext_proc timeout reaches the EPP as the stream's grpc-timeout: the EPP answers
    # (503) before Envoy gives up on the stream, however long the TTL.
    async with epp(ttl_s=30) as e:
        started = time.monotonic()
        response = await asyncio.wait_for(e.request(timeout=0.6), 5)  # late: DEADLINE_EXCEEDED, raised
        assert refusal(response) == (503, "ttl-expired")
        assert time.monotonic() - started > 0.4  # it waited, almost to the deadline


async def test_a_full_queue_evicts_the_newest_sheddable_for_a_higher_priority_arrival() -> None:
    async with epp(max_requests=3) as e:
        evicted = sample("disagg_epp_flow_control_dropped_total", reason="evicted", band="-1")
        old = e.request(priority=-1)
        await e.queued(1)
        new = e.request(priority=-1)
        lowest = e.request(priority=-2)
        await e.queued(3)
        first = e.request(priority=0)  # takes the place of the lowest band's request
        assert refusal(await asyncio.wait_for(lowest, 5)) == (429, "evicted")
        second = e.request(priority=0)  # then of the newest of the next band
        assert refusal(await asyncio.wait_for(new, 5)) == (429, "evicted")
        assert sample("disagg_epp_flow_control_dropped_total", reason="evicted", band="-1") == evicted + 1
        await e.queued(3)
        assert not any(t.done() for t in (old, first, second))
        assert await dispatch_order(e, {"first": first, "second": second, "old": old}) == ["first", "second", "old"]


async def test_a_full_queue_refuses_an_arrival_that_displaces_nobody_with_429_queue_full() -> None:
    async with epp(max_requests=2) as e:
        waiting = [e.request(priority=-1), e.request(priority=0)]
        await e.queued(2)
        full = sample("disagg_epp_flow_control_dropped_total", reason="queue-full", band="-1")
        # A sheddable request displaces only lower priorities; a non-sheddable one only sheddables.
        assert refusal(await asyncio.wait_for(e.request(priority=-1), 5)) == (429, "queue-full")
        assert sample("disagg_epp_flow_control_dropped_total", reason="queue-full", band="-1") == full + 1
        survivor = e.request(priority=0)
        assert refusal(await asyncio.wait_for(waiting[0], 5)) == (429, "evicted")
        await e.queued(2)
        assert refusal(await asyncio.wait_for(e.request(priority=5), 5)) == (429, "queue-full")
        e.free(LIMIT)
        assert all(routed(r) for r in await asyncio.wait_for(asyncio.gather(waiting[1], survivor), 5))


async def test_the_queue_holds_at_most_max_bytes_of_bodies() -> None:
    body = len(completion(400))
    async with epp(max_bytes=2 * body + 10) as e:
        waiting = [e.request(size=400), e.request(size=400)]
        await e.queued(2)
        assert e.flow.queue.bytes == 2 * body
        assert refusal(await asyncio.wait_for(e.request(size=400), 5)) == (429, "queue-full")
        e.free(LIMIT)
        await asyncio.wait_for(asyncio.gather(*waiting), 5)


async def test_a_cancelled_waiting_stream_leaves_the_queue_at_once() -> None:
    async with epp() as e:
        cancelled = sample("disagg_epp_flow_control_dropped_total", reason="cancelled", band="3")
        task = e.request(priority=3)
        other = e.request()
        await e.queued(2)
        task.call.cancel()  # type: ignore[attr-defined]  # RST_STREAM
        await e.queued(1)
        assert sample("disagg_epp_flow_control_dropped_total", reason="cancelled", band="3") == cancelled + 1
        e.free(1)
        assert routed(await asyncio.wait_for(other, 5))  # the slot went to the one still waiting
        assert e.flow.queue.count == 0


async def test_a_lost_connection_takes_its_waiting_streams_out_of_the_queue() -> None:
    async with epp() as e:
        channel = grpc.aio.insecure_channel(e.running.grpc_address)
        stub = pb_grpc.ExternalProcessorStub(channel)
        calls = [stub.Process(iter([headers_msg(), *body_msgs(completion())])) for _ in range(3)]
        reads = [asyncio.ensure_future(c.read()) for c in calls]
        await e.queued(3)
        await channel.close()  # the connection goes
        await e.queued(0)
        await asyncio.gather(*reads, return_exceptions=True)


async def test_a_request_waiting_when_the_last_decode_leaves_is_503_at_once() -> None:
    async with epp(ttl_s=30) as e:
        task = e.request()
        await e.queued(1)
        e.scheduler.pool.remove(e.decode.engine_id)
        assert refusal(await asyncio.wait_for(task, 5)) == (503, "no-endpoint")


async def test_queue_length_and_wait_time_are_exported() -> None:
    async with epp() as e:
        dispatched = sample("disagg_epp_flow_control_wait_seconds_count", outcome="dispatched", band="7")
        tasks = [e.request(priority=7), e.request(priority=7)]
        await e.queued(2)
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{e.running.metrics_port}/metrics")).text
        assert 'disagg_epp_flow_control_queue_length{band="7"} 2.0' in text
        assert 'disagg_epp_flow_control_queue_bytes{band="7"}' in text
        e.free(LIMIT)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert sample("disagg_epp_flow_control_wait_seconds_count", outcome="dispatched", band="7") == dispatched + 2


async def test_flow_control_off_sheds_at_once_with_429() -> None:
    async with epp(ttl_s=0) as e:
        shed = sample("disagg_epp_flow_control_dropped_total", reason="shed", band="0")
        assert refusal(await asyncio.wait_for(e.request(), 5)) == (429, "shed")
        assert sample("disagg_epp_flow_control_dropped_total", reason="shed", band="0") == shed + 1


async def test_a_malformed_priority_is_400() -> None:
    async with epp() as e:
        e.free(LIMIT)
        response = await asyncio.wait_for(e.request(priority="high"), 5)  # type: ignore[arg-type]
        assert refusal(response)[0] == 400
        assert "x-disagg-priority" in json.loads(response.immediate_response.body)["error"]["message"]


async def test_http_pick_waits_too() -> None:
    async with epp(ttl_s=0.3) as e:
        url = f"http://127.0.0.1:{e.running.metrics_port}/v1/pick"
        body = {"model": "tiny", "prompt_token_ids": [1, 2, 3]}
        async with httpx.AsyncClient(timeout=5) as client:
            pick = asyncio.ensure_future(client.post(url, json=body, headers={"x-disagg-priority": "1"}))
            await e.queued(1)
            e.free(1)
            r = await pick
            assert r.status_code == 200 and r.json()["decode"] == ["10.0.0.1:8000"]
            e.report(LIMIT)
            r = await client.post(url, json=body)  # waits its TTL
            assert r.status_code == 503 and r.headers[REASON] == "ttl-expired"


async def test_an_http_client_that_disconnects_leaves_the_queue() -> None:
    async with epp(ttl_s=30) as e:
        cancelled = sample("disagg_epp_flow_control_dropped_total", reason="cancelled", band="0")
        async with httpx.AsyncClient(timeout=0.3) as client:
            with pytest.raises(httpx.TimeoutException):
                await client.post(f"http://127.0.0.1:{e.running.metrics_port}/v1/pick",
                                  json={"model": "tiny", "prompt_token_ids": [1, 2, 3]})
        started = time.monotonic()
        await e.queued(0)
        assert time.monotonic() - started < 2  # long before its TTL
        assert sample("disagg_epp_flow_control_dropped_total", reason="cancelled", band="0") == cancelled + 1


# -- the queue itself -------------------------------------------------------------------------


def test_flow_key_reads_priority_objective_and_tenant() -> None:
    objectives = {"premium": 10}
    assert flow_key({}, objectives) == FlowKey(0, "")
    assert flow_key({"x-gateway-inference-objective": "premium", "x-gateway-inference-fairness-id": "t"},
                    objectives) == FlowKey(10, "t")
    explicit = {"x-gateway-inference-objective": "premium", "x-disagg-priority": " -3 "}
    assert flow_key(explicit, objectives) == FlowKey(-3)
    assert flow_key({"x-disagg-priority": "99999"}, objectives).priority == 1000  # bands are bounded
    with pytest.raises(ValueError):
        flow_key({"x-disagg-priority": "1.5"}, objectives)


def test_eviction_order_is_lowest_band_first_newest_first() -> None:
    queue: FlowQueue = FlowQueue()
    made = [Waiting(None, None, FlowKey(p, t), 1, seq, 0.0, 1.0)  # type: ignore[arg-type]
            for seq, (p, t) in enumerate([(-1, "a"), (-2, "a"), (-1, "b"), (-2, "b"), (0, "a"), (-1, "a")])]
    for w in made:
        queue.push(w)
    assert [w.seq for w in queue.evictable(below=0)] == [3, 1, 5, 2, 0]
    assert [w.seq for w in queue.evictable(below=-1)] == [3, 1]
    assert list(queue.evictable(below=5)) == list(queue.evictable(below=0))  # never a non-sheddable
    assert [queue.pop().seq for _ in range(len(made))] == [4, 0, 2, 5, 1, 3]  # bands high to low, tenants in turn
