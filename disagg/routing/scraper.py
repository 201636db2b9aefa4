"""Load signals from a worker's Prometheus `/metrics`, by vLLM's metric names (the model-server
protocol GIE scrapes), over aiohttp's keep-alive connections (about 0.17 ms of CPU per scrape here,
against 1.4 ms through httpx): `vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc` (older vLLM: `vllm:gpu_cache_usage_perc`) and
`vllm:cache_config_info{num_gpu_blocks=...}`. Several engines in one process are summed."""

from __future__ import annotations

import re
from urllib.parse import urlencode

import aiohttp

from disagg.messages import EngineLoad

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_WANTED = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:cache_config_info",
)


class ScrapeError(Exception):
    pass


def parse_metrics(text: str) -> EngineLoad:
    """EngineLoad from Prometheus text exposition. Raises ScrapeError when no vLLM load metric is
    present (a worker whose engine is not up yet is not a zero-load worker)."""
    waiting = running = 0.0
    usage: list[float] = []
    num_blocks = 0
    seen = False
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            close = line.rfind("}")
            labels, rest = line[brace + 1:close], line[close + 1:]
        else:
            name, labels, rest = line[:space], "", line[space:]
        if name not in _WANTED:
            continue
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        if name == "vllm:num_requests_waiting":
            waiting += value
            seen = True
        elif name == "vllm:num_requests_running":
            running += value
            seen = True
        elif name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            usage.append(value)
        elif name == "vllm:cache_config_info":
            for key, val in _LABEL.findall(labels):
                if key == "num_gpu_blocks" and val.isdigit():
                    num_blocks += int(val)
    if not seen:
        raise ScrapeError("no vllm:num_requests_* metric in /metrics")
    kv_usage = sum(usage) / len(usage) if usage else 0.0
    usable = max(num_blocks - 1, 0)  # block 0 is vLLM's null block
    return EngineLoad(
        waiting=int(waiting),
        running=int(running),
        kv_usage=kv_usage,
        num_blocks=num_blocks,
        free_blocks=round((1.0 - kv_usage) * usable),
    )


# Only these series (`name[]`, honoured by prometheus_client's exposition: our workers and vLLM's
# own server); an exporter that ignores it sends everything, which parses the same.
LOAD_QUERY = [("name[]", name) for name in _WANTED]
LOAD_TARGET = "/metrics?" + urlencode(LOAD_QUERY)


async def scrape(session: aiohttp.ClientSession, address: str) -> EngineLoad:
    """GET /metrics (the load series only) from the worker at `address` and parse it. Raises
    ScrapeError (unreachable, timed out, not 200, or no load series)."""
    try:
        async with session.get(f"http://{address}{LOAD_TARGET}") as response:
            if response.status != 200:
                raise ScrapeError(f"/metrics answered {response.status}")
            text = await response.text(errors="replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ScrapeError(f"GET http://{address}/metrics: {type(exc).__name__}: {exc}") from None
    return parse_metrics(text)
