"""Merging a stream's deltas that arrive within a window (disagg.engine.coalesce)."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import pytest

from disagg.engine.base import GenerateOutput
from disagg.engine.coalesce import coalesce


def delta(i: int, *, finished: bool = False) -> GenerateOutput:
    return GenerateOutput("r", [i], f"t{i} ", finished=finished, finish_reason="length" if finished else None,
                          num_prompt_tokens=7, num_cached_tokens=5 if i == 0 else 0)


async def produce(gaps_s: list[float], log: list[str] | None = None) -> AsyncIterator[GenerateOutput]:
    """Deltas 0..len(gaps): delta i+1 comes gaps_s[i] after delta i; the last one finishes."""
    try:
        for i, gap in enumerate([0.0, *gaps_s]):
            await asyncio.sleep(gap)
            yield delta(i, finished=i == len(gaps_s))
    finally:
        if log is not None:
            log.append("closed")


async def collect(stream: AsyncIterator[GenerateOutput]) -> list[tuple[float, GenerateOutput]]:
    t0 = time.monotonic()
    return [(time.monotonic() - t0, out) async for out in stream]


async def test_zero_window_passes_every_delta_through() -> None:
    got = await collect(coalesce(produce([0.0] * 5), 0.0))
    assert [o.token_ids for _, o in got] == [[i] for i in range(6)]


async def test_a_burst_within_the_window_leaves_as_one_delta_that_says_the_same() -> None:
    got = await collect(coalesce(produce([0.001] * 9), 0.2))
    outs = [o for _, o in got]
    assert len(outs) == 2  # the first at once, the other nine together
    assert outs[0].token_ids == [0] and got[0][0] < 0.1
    assert outs[1].token_ids == list(range(1, 10)) and outs[1].text == "".join(f"t{i} " for i in range(1, 10))
    assert outs[1].finished and outs[1].finish_reason == "length"
    assert [t for o in outs for t in o.token_ids] == list(range(10))
    assert outs[0].num_cached_tokens == 5 and outs[1].num_prompt_tokens == 7


async def test_deltas_further_apart_than_the_window_are_not_delayed() -> None:
    got = await collect(coalesce(produce([0.15, 0.15]), 0.05))
    assert [o.token_ids for _, o in got] == [[0], [1], [2]]
    assert got[2][0] < 0.3 + 0.1  # no window added on top of the producer's own pace


async def test_no_delta_waits_longer_than_the_window() -> None:
    # Deltas every 10 ms for 300 ms, window 50 ms: items at most ~50 ms apart, none held longer.
    got = await collect(coalesce(produce([0.01] * 30), 0.05))
    assert [t for _, o in got for t in o.token_ids] == list(range(31))
    assert 3 <= len(got) <= 12
    gaps = [b[0] - a[0] for a, b in zip(got, got[1:])]
    assert max(gaps) < 0.05 + 0.08


async def test_closing_the_consumer_closes_the_producer() -> None:
    log: list[str] = []
    stream = coalesce(produce([0.01] * 100, log), 0.02)
    async for _ in stream:
        break
    await stream.aclose()
    await asyncio.sleep(0.05)
    assert log == ["closed"]


async def test_a_producer_error_reaches_the_consumer_after_what_came_before() -> None:
    async def failing() -> AsyncIterator[GenerateOutput]:
        yield delta(0)
        yield delta(1)
        raise RuntimeError("engine died")

    got: list[GenerateOutput] = []
    with pytest.raises(RuntimeError, match="engine died"):
        async for out in coalesce(failing(), 0.05):
            got.append(out)
    assert [t for o in got for t in o.token_ids] == [0, 1]
