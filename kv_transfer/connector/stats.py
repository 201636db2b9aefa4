"""Connector metrics through vLLM's connector-stats path: the worker half's agent counts, vLLM
ships the counts to the front-end process, and `DisaggPromMetrics` turns them into the
`disagg_kv_*` series there (where `/metrics` is served)."""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from prometheus_client import Counter, Histogram

from kv_transfer.metrics import TransferMetrics, TransferStats


class DisaggKVStats(KVConnectorStats):
    """`data` is a `TransferStats.take()` snapshot (plain dicts, msgpack-able)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "DisaggKVStats":
        return DisaggKVStats(data=TransferStats.merge(self.data, other.data))

    def reduce(self) -> dict[str, int | float]:
        count = sum(self.data.get("count", {}).values())
        seconds = [s for v in self.data.get("seconds", {}).values() for s in v]
        return {
            "transfers": count,
            "bytes": sum(self.data.get("bytes", {}).values()),
            "failures": sum(self.data.get("failures", {}).values()),
            "lease_expiries": self.data.get("lease_expiries", 0),
            "avg_transfer_ms": round(1000 * sum(seconds) / len(seconds), 3) if seconds else 0.0,
        }

    def is_empty(self) -> bool:
        return TransferStats.is_empty(self.data)


class DisaggPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.metrics = TransferMetrics(metric_types.get(Counter, Counter), metric_types.get(Histogram, Histogram),
                                       tuple(labelnames))

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        values = self.per_engine_labelvalues.get(engine_idx, [])
        self.metrics.observe(transfer_stats_data, tuple(values))
