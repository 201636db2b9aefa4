"""Decode-side P/D orchestration: have a prefill worker compute the prompt's KV, then generate
with the returned kv_transfer_params while the KV connector pulls the blocks.

Fault semantics: a prefill that errors, times out or is unreachable is skipped for the next
candidate, within `prefill_attempts`; after that decode prefills locally. The client always gets
a complete answer. Blocks a prefill handed off but that decode will not read are released at once.

Every output says where its prompt was prefilled, as it happened (`GenerateOutput.pd`): `remote`
(a prefill worker's KV was handed off), `local` (no prefill worker was named) or `local_fallback`
(every one tried failed). The HTTP layer reports it as `x-disagg-pd` and in a stream's last chunk.

Sampling is decode's alone: prefill computes the prompt's KV (its one greedy token is discarded),
and decode samples the first token again from the last prompt position, with the request's own
options (logit_bias, penalties, grammar, min_tokens, logprobs, seed), as a local prefill would.
With n > 1 choices the KV is pulled once into decode's prefix cache by a one-token request, and
the n choices start from it: a hand-off has one reader, and n readers would each pull or recompute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import aiohttp

from disagg.config import AppConfig
from disagg.engine.base import GenerateOutput, GenerateRequest, PDOutcome, SamplingOptions
from disagg.worker.protocol import PrefillRequest, PrefillResult

log = logging.getLogger(__name__)


@dataclass
class PrefillOutcome:
    address: str | None  # the prefill worker that served it; None: prefill locally
    kv_transfer_params: dict[str, Any] | None
    attempts: int
    seconds: float


class PrefillClient:
    """Calls `POST /internal/prefill` on prefill workers. Candidates are trusted here: the HTTP
    endpoint checks a gateway's header against the registry (403) before they reach this, and
    our Router's picks come over a Serve handle (its pool may know a new prefill a heartbeat
    before this decode does)."""

    def __init__(self, config: AppConfig, layout_fingerprint: str):
        self.config = config
        self.layout_fingerprint = layout_fingerprint
        self._http: aiohttp.ClientSession | None = None  # made in the serving loop, at the first prefill
        # The stack's internal token, which prefill's /internal/prefill asks for.
        token = config.internal_token
        self._headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}

    async def prefill(self, request: GenerateRequest, candidates: list[str]) -> PrefillOutcome:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.prefill_timeout_s,
                                                                             connect=2.0))
        start = time.monotonic()
        tried = 0
        for address in candidates:
            if tried >= self.config.prefill_attempts:
                break
            tried += 1
            body = PrefillRequest(
                request_id=f"{request.request_id}-p{tried}",
                prompt_token_ids=request.prompt_token_ids,
                layout_fingerprint=self.layout_fingerprint,
                kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False},
            )
            try:
                async with self._http.post(f"http://{address}/internal/prefill", json=body.model_dump(),
                                           headers=self._headers) as resp:
                    text = await resp.text()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {text[:200]}")
                result = PrefillResult.model_validate_json(text)
                if not result.kv_transfer_params:
                    raise RuntimeError("prefill returned no kv_transfer_params")
                return PrefillOutcome(address, result.kv_transfer_params, tried, time.monotonic() - start)
            except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError, ValueError) as e:
                log.warning("prefill on %s failed (%s: %s); trying the next candidate", address, type(e).__name__, e)
        return PrefillOutcome(None, None, tried, time.monotonic() - start)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()


async def generate_disaggregated(
    engine: Any,
    prefill_client: PrefillClient,
    request: GenerateRequest,
    prefill_candidates: list[str],
    on_prefill: Callable[[PrefillOutcome], None] | None = None,
) -> AsyncIterator[GenerateOutput]:
    """Decode's whole path for one request. Cancelling the iterator aborts the request here,
    and the prefill's blocks are released if decode never read them."""
    params: dict[str, Any] | None = None
    pd: PDOutcome = "local"
    if prefill_candidates:
        outcome = await prefill_client.prefill(request, prefill_candidates)
        if on_prefill is not None:
            on_prefill(outcome)
        if outcome.kv_transfer_params:
            params = dict(outcome.kv_transfer_params)
            params["do_remote_prefill"] = True
            params["do_remote_decode"] = False
            pd = "remote"
        else:
            pd = "local_fallback"
            log.warning("%s: no prefill worker answered (%d tried); prefilling on decode", request.request_id,
                        outcome.attempts)
    read = False  # decode has the prefill's blocks (or the engine gave up on them)
    try:
        if params is not None and request.sampling.n > 1:
            await _pull_kv(engine, request, params)
            read, params = True, None
        local = request.model_copy(update={"kv_transfer_params": params})
        async for out in engine.generate(local):
            read = read or bool(out.token_ids)
            out.pd = pd
            yield out
    finally:
        if params is not None and not read:
            # Cancelled (or failed) before the first token: the blocks were perhaps never read.
            try:
                await asyncio.shield(engine.release_remote_kv(f"{request.request_id}-rel", params))
            except Exception:  # noqa: BLE001 - best effort; the lease frees them anyway
                log.exception("could not release prefill blocks of %s", request.request_id)


async def _pull_kv(engine: Any, request: GenerateRequest, kv_transfer_params: dict[str, Any]) -> None:
    """Read a prefill's hand-off into this engine's prefix cache with a one-token request."""
    pull = GenerateRequest(request_id=f"{request.request_id}-pull", prompt_token_ids=request.prompt_token_ids,
                           sampling=SamplingOptions(max_tokens=1, temperature=0.0),
                           kv_transfer_params=kv_transfer_params)
    async for _ in engine.generate(pull):
        pass
