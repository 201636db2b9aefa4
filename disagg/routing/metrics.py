"""Routing and EPP metrics (prometheus-client, default registry).

Per-endpoint gauges are computed when scraped, from every live `EndpointPool` and `PrefixIndex`
in the process, so they never go stale themselves.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Iterable

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from disagg.routing.pool import EndpointPool
    from disagg.routing.prefix_index import PrefixIndex

PICK_DURATION = Histogram(
    "disagg_pick_duration_seconds",
    "Time to pick a decode (and prefill) endpoint for one request.",
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1),
)
PD_DECISIONS = Counter(
    "disagg_pd_decisions",
    "Picks by prefill decision: remote (a prefill worker) or local (decode prefills itself).",
    ["decision"],
)
PD_REMOTE = PD_DECISIONS.labels("remote")
PD_LOCAL = PD_DECISIONS.labels("local")
PANIC_PICKS = Counter(
    "disagg_pick_panics", "Picks made with no live decode endpoint, to the most recently seen one."
)
PICK_ERRORS = Counter("disagg_pick_errors", "Picks refused, by reason.", ["reason"])
PROMPT_TOKENS = Counter(
    "disagg_pick_prompt_tokens",
    "Prompt tokens of picked requests (prefix hit rate: disagg_prefix_hit_tokens / this).",
)
PREFIX_HIT_TOKENS = Counter(
    "disagg_prefix_hit_tokens",
    "Prompt tokens already cached on the picked decode endpoint (per the prefix index).",
)
ENDPOINT_REMOVALS = Counter("disagg_endpoint_removals", "Endpoints that left the pool, by reason.", ["reason"])
REGISTRATION_ERRORS = Counter(
    "disagg_registration_errors", "Workers refused at registration (model or KV layout mismatch)."
)
SCRAPES = Counter("disagg_scrapes", "Scrapes of workers' /metrics, by result.", ["result"])
LOAD_REPORTS = Counter("disagg_load_reports", "Load reports pushed by workers and applied to the pool.")
LOAD_REPORT_GAPS = Counter("disagg_load_report_gaps", "Load reports lost (gaps in a worker's sequence).")
KV_EVENTS = Counter("disagg_kv_events", "KV events applied to the prefix index, by type.", ["type"])
KV_EVENT_GAPS = Counter(
    "disagg_kv_event_gaps", "Sequence gaps in KV event streams (events lost; a replay was asked)."
)
MIGRATIONS = Counter("disagg_migrations", "Requests moved to another decode after theirs died mid-stream.")
EPP_REQUESTS = Counter("disagg_epp_requests", "Requests the EPP answered, by HTTP status it chose.", ["code"])


class _PoolCollector(Collector):
    def __init__(self) -> None:
        self.pools: weakref.WeakSet[EndpointPool] = weakref.WeakSet()
        self.indexes: weakref.WeakSet[PrefixIndex] = weakref.WeakSet()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        age = GaugeMetricFamily(
            "disagg_endpoint_signal_age_seconds",
            "Seconds since the endpoint's newest load signal.",
            labels=["role", "address", "engine_id"],
        )
        waiting = GaugeMetricFamily("disagg_endpoint_waiting", "Waiting requests (last signal).",
                                    labels=["role", "address"])
        running = GaugeMetricFamily("disagg_endpoint_running", "Running requests (last signal).",
                                    labels=["role", "address"])
        kv = GaugeMetricFamily("disagg_endpoint_kv_usage", "KV cache usage 0..1 (last signal).",
                               labels=["role", "address"])
        count = GaugeMetricFamily("disagg_endpoints", "Live endpoints in the pool.", labels=["role"])
        blocks = GaugeMetricFamily("disagg_prefix_index_blocks", "Entries in the prefix index.")
        counts = {"prefill": 0, "decode": 0}
        for pool in list(self.pools):
            now = pool.clock()
            for e in pool.endpoints(include_dead=True):
                counts[e.role] = counts.get(e.role, 0) + 1
                age.add_metric([e.role, e.address, e.engine_id], max(0.0, now - e.load_at))
                waiting.add_metric([e.role, e.address], e.load.waiting)
                running.add_metric([e.role, e.address], e.load.running)
                kv.add_metric([e.role, e.address], e.load.kv_usage)
        for role, n in counts.items():
            count.add_metric([role], n)
        blocks.add_metric([], sum(index.num_blocks() for index in list(self.indexes)))
        return [age, waiting, running, kv, count, blocks]


_collector = _PoolCollector()
REGISTRY.register(_collector)


def watch(pool: "EndpointPool", index: "PrefixIndex") -> None:
    """Export the gauges of `pool` and `index` while they live; count every removal from the pool."""
    _collector.pools.add(pool)
    _collector.indexes.add(index)
    pool.on_remove(lambda endpoint, reason: ENDPOINT_REMOVALS.labels(reason).inc())
