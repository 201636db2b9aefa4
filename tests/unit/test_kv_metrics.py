"""Transfer metrics: what the agent counts, how snapshots merge, and the disagg_kv_* series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from kv_transfer.metrics import BYTES, FAILURES, LEASE_EXPIRIES, SECONDS, TRANSFERS, TransferMetrics, TransferStats


def snapshot() -> dict:
    s = TransferStats()
    s.record_transfer("nixl", "READ", 1000, 0.01)
    s.record_transfer("nixl", "READ", 500, 0.02)
    s.record_failure("nixl", "lease")
    s.record_lease_expiries(2)
    return s.take()


def test_take_resets() -> None:
    s = TransferStats()
    s.record_transfer("tcp", "WRITE", 1, 0.1)
    assert not TransferStats.is_empty(s.take())
    assert TransferStats.is_empty(s.take())


def test_snapshots_merge() -> None:
    merged = TransferStats.merge(snapshot(), snapshot())
    assert merged["bytes"] == {"nixl|READ": 3000} and merged["count"] == {"nixl|READ": 4}
    assert len(merged["seconds"]["nixl|READ"]) == 4
    assert merged["failures"] == {"nixl|lease": 2} and merged["lease_expiries"] == 4


def test_series_carry_the_documented_names_and_labels() -> None:
    registry = CollectorRegistry()

    def counter(name, doc, labelnames=(), **kw):
        return Counter(name, doc, labelnames=labelnames, registry=registry, **kw)

    def histogram(name, doc, labelnames=(), **kw):
        return Histogram(name, doc, labelnames=labelnames, registry=registry, **kw)

    metrics = TransferMetrics(counter, histogram, extra_labels=("model_name", "engine"))
    metrics.observe(snapshot(), ("tiny", "0"))
    get = registry.get_sample_value
    labels = {"model_name": "tiny", "engine": "0", "backend": "nixl", "op": "READ"}
    assert get(BYTES, labels) == 1500
    assert get(TRANSFERS, labels) == 2
    assert get(SECONDS + "_count", labels) == 2
    assert get(FAILURES, {"model_name": "tiny", "engine": "0", "backend": "nixl", "reason": "lease"}) == 1
    assert get(LEASE_EXPIRIES, {"model_name": "tiny", "engine": "0"}) == 2


def test_connector_stats_reduce_for_vllm_logging() -> None:
    from kv_transfer.connector.stats import DisaggKVStats

    stats = DisaggKVStats(data=snapshot()).aggregate(DisaggKVStats(data=snapshot()))
    assert stats.reduce()["transfers"] == 4 and stats.reduce()["bytes"] == 3000
    assert not stats.is_empty() and DisaggKVStats(data={}).is_empty()
