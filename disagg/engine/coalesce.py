"""Merge a request's output deltas that arrive close together, so a stream that crosses process
boundaries (a Serve handle: one Ray object per item, then the proxy's hop) pays per batch of
tokens instead of per token.

The first delta, and any delta after a quiet spell of `window_s`, passes at once; deltas that
follow within the window wait until it ends and leave as one. A request's time to first token
is untouched and no delta waits longer than the window. Ray Serve LLM does the same with a fixed
50 ms interval; the window here is smaller, and a lone slow stream never waits at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from typing import AsyncIterator

from disagg.engine.base import GenerateOutput

_END = object()


def merge(first: GenerateOutput, later: GenerateOutput) -> GenerateOutput:
    """One delta saying what `first` then `later` said."""
    return replace(
        later,
        token_ids=first.token_ids + later.token_ids,
        text=first.text + later.text,
        num_prompt_tokens=later.num_prompt_tokens or first.num_prompt_tokens,
        num_cached_tokens=later.num_cached_tokens or first.num_cached_tokens,
        kv_transfer_params=later.kv_transfer_params if later.kv_transfer_params is not None
        else first.kv_transfer_params,
    )


async def coalesce(outputs: AsyncIterator[GenerateOutput], window_s: float) -> AsyncIterator[GenerateOutput]:
    """`outputs`, with deltas less than `window_s` after the previous yield merged. Closing this
    iterator closes `outputs` (so a client going away still aborts the request)."""
    if window_s <= 0:
        async for out in outputs:
            yield out
        return
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for out in outputs:
                queue.put_nowait(out)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_END)

    task = asyncio.create_task(pump())
    last_yield = float("-inf")
    try:
        while True:
            item = await queue.get()
            wait = last_yield + window_s - time.monotonic()
            if wait > 0 and item is not _END and not isinstance(item, BaseException):
                await asyncio.sleep(wait)
            # Everything that came in meanwhile leaves with it.
            merged: GenerateOutput | None = None
            while True:
                if item is _END:
                    if merged is not None:
                        yield merged
                    return
                if isinstance(item, BaseException):
                    if merged is not None:
                        yield merged
                    raise item
                assert isinstance(item, GenerateOutput)
                merged = item if merged is None else merge(merged, item)
                if merged.finished or queue.empty():
                    break
                item = queue.get_nowait()
            yield merged
            last_yield = time.monotonic()
            if merged.finished:
                return
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
