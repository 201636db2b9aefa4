"""KV events over ZMQ (vLLM's wire protocol) feed the prefix index: live, replayed, gap-filled."""

from __future__ import annotations

import asyncio
import socket
import time

import msgspec
import pytest_asyncio

from disagg.config import RoutingConfig
from disagg.routing import PickRequest, PrefixIndex, Scheduler, StaticDiscovery, block_hashes
from disagg.bench.standin import StandInWorker
from tests.support.kv_events import FakeKVPublisher, block_removed, block_stored
from disagg.routing.kv_events import KVEventSubscriber, apply_batch, decode_batch, subscriber_endpoint

BS = 32


async def wait_for(cond, timeout: float = 5.0) -> None:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_decodes_vllm_batch_with_omitted_defaults() -> None:
    payload = msgspec.msgpack.encode([1.0, [
        {"type": "BlockStored", "block_hashes": [b"\x01" * 32], "parent_block_hash": None,
         "token_ids": [1] * BS, "block_size": BS, "lora_id": None, "medium": "GPU", "lora_name": None,
         "kv_cache_spec_kind": "full_attention", "some_future_field": 3},
        {"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU"},
        {"type": "AllBlocksCleared"},
    ]])
    batch = decode_batch(payload)
    assert [type(e).__name__ for e in batch.events] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]


def test_events_of_other_tiers_and_lora_are_ignored() -> None:
    index = PrefixIndex(BS)
    tokens = list(range(BS))
    batch = decode_batch(msgspec.msgpack.encode([0.0, [
        dict(block_stored([1], tokens, BS), medium="CPU"),
        dict(block_stored([2], tokens, BS), lora_name="adapter"),
    ]]))
    apply_batch(index, "e", batch)
    assert index.match(block_hashes(tokens, BS)) == {}


def test_wildcard_endpoint_means_the_worker_host() -> None:
    assert subscriber_endpoint("tcp://*:5557", "10.1.2.3") == "tcp://10.1.2.3:5557"
    assert subscriber_endpoint("tcp://10.0.0.9:5557", "10.1.2.3") == "tcp://10.0.0.9:5557"


@pytest_asyncio.fixture(loop_scope="function")
async def publisher():
    pub = FakeKVPublisher()
    yield pub
    pub.close()


async def run_subscriber(pub: FakeKVPublisher, index: PrefixIndex):
    sub = KVEventSubscriber(pub.endpoint, lambda b: apply_batch(index, "e1", b), replay_endpoint=pub.replay_endpoint)
    return sub, asyncio.create_task(sub.run())


async def test_events_before_subscribing_arrive_by_replay(publisher: FakeKVPublisher) -> None:
    tokens = list(range(3 * BS))
    publisher.publish([block_stored([11, 12], tokens[:2 * BS], BS)])
    index = PrefixIndex(BS)
    sub, task = await run_subscriber(publisher, index)
    try:
        await wait_for(lambda: sub.next_seq == 1)
        await asyncio.sleep(0.2)  # let the subscription settle (ZMQ slow joiner)
        publisher.publish([block_stored([13], tokens[2 * BS:], BS, parent=12)])
        await wait_for(lambda: index.match(block_hashes(tokens, BS)) == {"e1": 3})
        publisher.publish([block_removed([12])])
        await wait_for(lambda: index.match(block_hashes(tokens, BS)) == {"e1": 1})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_lost_message_is_recovered_by_replay(publisher: FakeKVPublisher) -> None:
    tokens = list(range(3 * BS))
    index = PrefixIndex(BS)
    sub, task = await run_subscriber(publisher, index)
    try:
        await asyncio.sleep(0.3)
        publisher.publish([block_stored([1], tokens[:BS], BS)])
        publisher.publish([block_stored([2], tokens[BS:2 * BS], BS, parent=1)], send=False)  # lost
        publisher.publish([block_stored([3], tokens[2 * BS:], BS, parent=2)])
        await wait_for(lambda: index.match(block_hashes(tokens, BS)) == {"e1": 3})
        assert sub.next_seq == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_replay_peer_that_never_speaks_zmq_times_out_and_live_events_still_arrive(
        publisher: FakeKVPublisher) -> None:
    """A hung worker's replay socket accepts TCP but never answers: the replay gives up after
    replay_timeout_s and the subscriber follows live events."""
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    tokens = list(range(BS))
    index = PrefixIndex(BS)
    sub = KVEventSubscriber(publisher.endpoint, lambda b: apply_batch(index, "e1", b),
                            replay_endpoint=f"tcp://127.0.0.1:{mute.getsockname()[1]}", replay_timeout_s=0.3)
    task = asyncio.create_task(sub.run())
    try:
        await asyncio.sleep(1.0)  # replay given up, subscription settled
        publisher.publish([block_stored([1], tokens, BS)])
        await wait_for(lambda: index.match(block_hashes(tokens, BS)) == {"e1": 1})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        mute.close()


async def test_scheduler_routes_to_the_decode_whose_events_hold_the_prefix(publisher: FakeKVPublisher) -> None:
    holder = StandInWorker("decode", kv_events_endpoint=publisher.endpoint,
                        kv_events_replay_endpoint=publisher.replay_endpoint).start()
    other = StandInWorker("decode").start()
    # The holder is busier, but it has the prompt's 8 blocks cached.
    holder.load.running = 3
    tokens = list(range(8 * BS))
    publisher.publish([block_stored(list(range(100, 108)), tokens, BS)])
    s = Scheduler(RoutingConfig(approximate_prefix=False), model="tiny", block_size=BS)
    task = asyncio.create_task(s.run(StaticDiscovery([holder.address, other.address], interval_s=0.2)))
    try:
        await wait_for(lambda: s.index.num_blocks(holder.info.engine_id) == 8)
        pick = s.pick(PickRequest(model="tiny", prompt_token_ids=tokens + [1, 2, 3]))
        assert pick.decode[0].address == holder.address
        assert pick.uncached_tokens == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        holder.stop()
        other.stop()
