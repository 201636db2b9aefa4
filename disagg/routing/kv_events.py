"""vLLM's KV cache events, received over ZMQ and applied to the prefix index.

Wire format (vLLM's ZmqEventPublisher): PUB frames [topic, seq (8 bytes, big-endian), payload];
payload is msgpack `[ts, [event, ...], data_parallel_rank]`, each event a map tagged by "type":
BlockStored {block_hashes, parent_block_hash, token_ids, block_size, medium, ...},
BlockRemoved {block_hashes, medium, ...} or AllBlocksCleared. Fields left at their default are
omitted. A ROUTER replay socket answers [b"", start_seq] with [b"", topic, seq, payload]...
and ends with [b"", b"", -1, b""].

Who binds: vLLM's publisher binds only for `*`, `::`, ipc:// and inproc:// endpoints and
otherwise connects, silently. A worker that advertises `kv_events_endpoint` publishes on a
bound socket (`tcp://*:PORT`, advertised as `tcp://HOST:PORT`), so any number of schedulers can
connect. A subscriber can also bind (`bind=True`) for a publisher configured to connect to it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Union

import msgspec
import zmq
import zmq.asyncio

from disagg.routing import metrics
from disagg.routing.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

BlockHash = Union[int, bytes]
_END_SEQ = -1


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None = None
    token_ids: list[int] = []
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[object] | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True):
    pass


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def decode_batch(payload: bytes) -> KVEventBatch:
    return _decoder.decode(payload)


def subscriber_endpoint(advertised: str, worker_host: str) -> str:
    """Where to connect for a worker's advertised endpoint: a wildcard host means the worker's."""
    for wildcard in ("*", "0.0.0.0", "[::]"):
        prefix = f"tcp://{wildcard}:"
        if advertised.startswith(prefix):
            return f"tcp://{worker_host}:{advertised[len(prefix):]}"
    return advertised


BatchHandler = Callable[[KVEventBatch], None]


class KVEventSubscriber:
    """Follows one engine's event stream, in sequence order, without gaps when a replay socket
    exists: it replays from 0 on start and from the first missing number on every gap.

    Lifecycle: `await run()` until cancelled; `on_batch` is called for each batch, in order."""

    def __init__(
        self,
        endpoint: str,
        on_batch: BatchHandler,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        bind: bool = False,
        replay_timeout_s: float = 2.0,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.on_batch = on_batch
        self.topic = topic
        self.bind = bind
        self.replay_timeout_s = replay_timeout_s
        self.next_seq: int | None = None
        self.batches = 0

    async def run(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        try:
            if self.bind:
                sub.bind(self.endpoint)
            else:
                sub.connect(self.endpoint)
            if self.replay_endpoint:
                await self._replay(ctx, 0)
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    continue
                _, seq_bytes, payload = frames
                seq = int.from_bytes(seq_bytes, "big")
                if self.next_seq is not None and seq > self.next_seq:
                    metrics.KV_EVENT_GAPS.inc()
                    log.warning("KV events %s: gap %d..%d", self.endpoint, self.next_seq, seq - 1)
                    if self.replay_endpoint:
                        await self._replay(ctx, self.next_seq)
                self._apply(seq, payload)
        finally:
            sub.close(linger=0)

    async def _replay(self, ctx: zmq.asyncio.Context, start: int) -> None:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(self.replay_endpoint)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), self.replay_timeout_s)
                if len(frames) != 4:
                    continue
                _, _, seq_bytes, payload = frames
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if seq == _END_SEQ:
                    return
                self._apply(seq, payload)
        except asyncio.TimeoutError:
            log.warning("KV events %s: replay from %d timed out", self.replay_endpoint, start)
        finally:
            dealer.close(linger=0)

    def _apply(self, seq: int, payload: bytes) -> None:
        if self.next_seq is not None and seq < self.next_seq:
            return  # seen already (live and replay overlap)
        try:
            batch = decode_batch(payload)
        except msgspec.DecodeError as exc:
            log.warning("KV events %s: undecodable batch %d: %s", self.endpoint, seq, exc)
        else:
            self.on_batch(batch)
            self.batches += 1
        self.next_seq = seq + 1


def apply_batch(index: PrefixIndex, engine_id: str, batch: KVEventBatch) -> None:
    """Apply one engine's batch to the index. Blocks in other tiers than the engine's own
    (medium CPU/STORAGE of an offloading connector), other KV cache groups, or keyed by more
    than their tokens (LoRA, multimodal, cache salt) are not what a plain prompt can hit."""
    for event in batch.events:
        if isinstance(event, BlockStored):
            if (event.medium not in (None, "GPU") or event.group_idx not in (None, 0)
                    or event.lora_name or event.lora_id or any(event.extra_keys or ())):
                continue
            if event.block_size and event.block_size != index.block_size:
                log.error("engine %s stores %d-token blocks; the index expects %d",
                          engine_id, event.block_size, index.block_size)
                continue
            index.store(engine_id, event.block_hashes, event.token_ids, event.parent_block_hash)
            metrics.KV_EVENTS.labels("BlockStored").inc()
        elif isinstance(event, BlockRemoved):
            if event.medium not in (None, "GPU") or event.group_idx not in (None, 0):
                continue
            index.remove_engine_blocks(engine_id, event.block_hashes)
            metrics.KV_EVENTS.labels("BlockRemoved").inc()
        elif isinstance(event, AllBlocksCleared):
            index.clear(engine_id)
            metrics.KV_EVENTS.labels("AllBlocksCleared").inc()



