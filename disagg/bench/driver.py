"""A streaming OpenAI client that drives a workload against one endpoint and measures it.

Per request: time to first token (TTFT), the gaps between streamed content events (ITL), time per
output token after the first (TPOT = (latency - TTFT) / (tokens - 1)), and whether it failed.
A failure (HTTP error, error event, broken or short stream, timeout) is counted, never dropped:
`RunResult.failed` and each `RequestResult.error` say what went wrong.

ITL is per streamed event, as a user sees it. A server that batches its stream (Ray Serve LLM
sends what it has every 50 ms by default) shows bursts of near-zero gaps and one long gap per
batch, so compare such servers by TPOT, which batching does not distort.

    run = asyncio.run(drive(url, model, workload, rate=2.0))        # open loop, Poisson
    run = asyncio.run(drive(url, model, workload, concurrency=4))   # closed loop
    run.summary()
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import httpx

from disagg.bench.workloads import BenchRequest, Workload, poisson


@dataclass
class RequestResult:
    index: int
    group: str
    prompt_tokens: int
    max_tokens: int
    sent_s: float = 0.0  # when it was sent, from the run's start
    # Time to the first event with text. None for an answer with no visible text at all (a
    # random-weight model can repeat a special token, which detokenizes to ""): such a request
    # succeeded but has no TTFT, ITL or TPOT; `summary()["no_text"]` counts them.
    ttft_s: float | None = None
    last_token_s: float | None = None  # time to the last event with text
    latency_s: float | None = None  # time to the end of the stream
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)  # gaps between content events
    status: int | None = None
    error: str | None = None
    decision: str | None = None  # our router's x-disagg-pd header, when present

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """(end of stream - TTFT) / (tokens - 1), as `vllm bench serve` defines it. Not from the
        last event with text: a random-weight model's last tokens often detokenize to nothing
        (seen: 3.2 s of a 5.4 s stream without text), which made TPOT look many times shorter."""
        if self.ttft_s is None or self.latency_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: Iterable[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


@dataclass
class RunResult:
    workload: str
    load: str  # "poisson 2/s" or "closed 4"
    duration_s: float
    results: list[RequestResult]

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.results)

    def summary(self, group: str | None = None) -> dict[str, Any]:
        """TTFT, ITL, TPOT and latency percentiles in ms, output tokens/s, requests/s, failures."""
        rs = [r for r in self.results if group is None or r.group == group]
        ok = [r for r in rs if r.ok]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        itl = [g for r in ok for g in r.itl_s]
        tpot = [t for r in ok if (t := r.tpot_s) is not None]
        latency = [r.latency_s for r in ok if r.latency_s is not None]
        tokens = sum(r.output_tokens for r in ok)
        out: dict[str, Any] = {
            "requests": len(rs), "failed": len(rs) - len(ok), "no_text": sum(r.ttft_s is None for r in ok),
            "ttft_p50_ms": _ms(percentile(ttft, 50)), "ttft_p99_ms": _ms(percentile(ttft, 99)),
            "itl_p50_ms": _ms(percentile(itl, 50)), "itl_p99_ms": _ms(percentile(itl, 99)),
            "tpot_p50_ms": _ms(percentile(tpot, 50)), "tpot_p99_ms": _ms(percentile(tpot, 99)),
            "latency_p50_ms": _ms(percentile(latency, 50)), "latency_p99_ms": _ms(percentile(latency, 99)),
            "output_tokens": tokens,
            "output_tok_s": round(tokens / self.duration_s, 2) if self.duration_s > 0 else None,
            "req_s": round(len(ok) / self.duration_s, 3) if self.duration_s > 0 else None,
        }
        errors = sorted({r.error for r in rs if r.error})
        if errors:
            out["errors"] = errors[:5]
        decisions = [r.decision for r in rs if r.decision]
        if decisions:
            out["remote_prefill_fraction"] = round(decisions.count("remote") / len(decisions), 3)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "load": self.load, "duration_s": round(self.duration_s, 3),
                "summary": self.summary(),
                "groups": {g: self.summary(g) for g in sorted({r.group for r in self.results})},
                "requests": [asdict(r) for r in self.results]}


async def send(client: httpx.AsyncClient, url: str, model: str, req: BenchRequest, started: float,
               timeout_s: float) -> RequestResult:
    """One streamed request; never raises (a failure is recorded in the result)."""
    res = RequestResult(index=req.index, group=req.group, prompt_tokens=req.prompt_tokens,
                        max_tokens=req.max_tokens)
    path = "/v1/chat/completions" if req.kind == "chat" else "/v1/completions"
    t0 = time.perf_counter()
    res.sent_s = t0 - started
    last: float | None = None
    events = 0
    usage_tokens: int | None = None
    done = False
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url + path, json=req.body(model)) as resp:
                res.status = resp.status_code
                res.decision = resp.headers.get("x-disagg-pd")
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")
                    res.error = f"HTTP {resp.status_code}: {body[:200]}"
                    return res
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        res.error = f"error event: {str(chunk['error'])[:200]}"
                        return res
                    if chunk.get("usage"):
                        usage_tokens = chunk["usage"].get("completion_tokens", usage_tokens)
                    if _has_content(chunk):
                        now = time.perf_counter()
                        if last is None:
                            res.ttft_s = now - t0
                        else:
                            res.itl_s.append(now - last)
                        last = now
                        events += 1
    except TimeoutError:
        res.error = f"timeout after {timeout_s:.0f} s"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
    if res.error is not None:
        return res
    res.latency_s = time.perf_counter() - t0
    res.last_token_s = None if last is None else last - t0
    res.output_tokens = usage_tokens if usage_tokens is not None else events
    if not done:
        res.error = "stream ended without [DONE]"
    elif res.output_tokens < req.max_tokens:
        res.error = f"short answer: {res.output_tokens} of {req.max_tokens} tokens"
    return res


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


def _client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max(concurrency, 8) * 2, max_keepalive_connections=max(concurrency, 8))
    return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits)


async def drive(url: str, model: str, workload: Workload, *, rate: float | None = None,
                concurrency: int | None = None, timeout_s: float = 180.0, seed: int = 0,
                on_result: Callable[[RequestResult], None] | None = None) -> RunResult:
    """Send every request of `workload` to `url`: open loop at `rate` requests/s (Poisson), or
    closed loop with `concurrency` requests in flight. Exactly one of the two. `on_result` is
    called with each request's result as it finishes (progress reports)."""
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of rate (open loop) and concurrency (closed loop)")
    url = url.rstrip("/")
    requests = list(workload.requests)

    async def send_one(client: httpx.AsyncClient, req: BenchRequest, started: float) -> RequestResult:
        result = await send(client, url, model, req, started, timeout_s)
        if on_result is not None:
            on_result(result)
        return result

    async with _client(concurrency or len(requests)) as client:
        started = time.perf_counter()
        if rate is not None:
            times = poisson(len(requests), rate, seed)

            async def at(delay: float, req: BenchRequest) -> RequestResult:
                await asyncio.sleep(max(0.0, started + delay - time.perf_counter()))
                return await send_one(client, req, started)

            results = await asyncio.gather(*(at(t, r) for t, r in zip(times, requests)))
            load = f"poisson {rate:g}/s"
        else:
            queue: asyncio.Queue[BenchRequest] = asyncio.Queue()
            for r in requests:
                queue.put_nowait(r)
            results = []

            async def client_loop() -> None:
                while not queue.empty():
                    results.append(await send_one(client, queue.get_nowait(), started))

            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
            results.sort(key=lambda r: r.index)
            load = f"closed {concurrency}"
        duration = time.perf_counter() - started
    return RunResult(workload.name, load, duration, list(results))


async def warm_up(url: str, model: str, workload: Workload, n: int = 2, timeout_s: float = 300.0) -> list[str]:
    """Send the first `n` requests one by one (first-request costs: connections, handshakes,
    compilation); returns their errors, if any."""
    async with _client(1) as client:
        started = time.perf_counter()
        errors = []
        for req in workload.requests[:n]:
            r = await send(client, url.rstrip("/"), model, req, started, timeout_s)
            if r.error:
                errors.append(r.error)
        return errors
