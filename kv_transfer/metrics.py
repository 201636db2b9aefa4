"""Transfer metrics: an in-process accumulator, and the Prometheus series it feeds.

An Agent records into its `TransferStats`. Whoever exports takes snapshots: the vLLM connector
ships them from the engine's worker to the front-end process through vLLM's connector-stats
path (where `/metrics` is served); a plain program calls `default_metrics().observe(...)`.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram

BYTES = "disagg_kv_transfer_bytes_total"
TRANSFERS = "disagg_kv_transfers_total"
SECONDS = "disagg_kv_transfer_seconds"
FAILURES = "disagg_kv_transfer_failures_total"
LEASE_EXPIRIES = "disagg_kv_lease_expiries_total"

_SECONDS_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class TransferStats:
    """What happened since the last `take()`. Thread-safe; snapshots are plain dicts (msgpack-able)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        # key "backend|op" -> totals; seconds kept per transfer for the histogram.
        self._bytes: dict[str, int] = defaultdict(int)
        self._count: dict[str, int] = defaultdict(int)
        self._seconds: dict[str, list[float]] = defaultdict(list)
        self._failures: dict[str, int] = defaultdict(int)  # "backend|reason"
        self._expiries = 0

    def record_transfer(self, backend: str, op: str, nbytes: int, seconds: float) -> None:
        key = f"{backend}|{op}"
        with self._lock:
            self._bytes[key] += nbytes
            self._count[key] += 1
            self._seconds[key].append(seconds)

    def record_failure(self, backend: str, reason: str) -> None:
        with self._lock:
            self._failures[f"{backend}|{reason}"] += 1

    def record_lease_expiries(self, n: int) -> None:
        if n:
            with self._lock:
                self._expiries += n

    def take(self) -> dict[str, Any]:
        with self._lock:
            snap = {"bytes": dict(self._bytes), "count": dict(self._count),
                    "seconds": {k: list(v) for k, v in self._seconds.items()},
                    "failures": dict(self._failures), "lease_expiries": self._expiries}
            self._reset()
        return snap

    @staticmethod
    def is_empty(snap: dict[str, Any]) -> bool:
        return not (snap.get("count") or snap.get("failures") or snap.get("lease_expiries"))

    @staticmethod
    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"bytes": dict(a.get("bytes", {})), "count": dict(a.get("count", {})),
                               "seconds": {k: list(v) for k, v in a.get("seconds", {}).items()},
                               "failures": dict(a.get("failures", {})),
                               "lease_expiries": a.get("lease_expiries", 0) + b.get("lease_expiries", 0)}
        for field in ("bytes", "count", "failures"):
            for k, v in b.get(field, {}).items():
                out[field][k] = out[field].get(k, 0) + v
        for k, v in b.get("seconds", {}).items():
            out["seconds"].setdefault(k, []).extend(v)
        return out


class TransferMetrics:
    """The five `disagg_kv_*` series. Metric classes are injectable (vLLM passes Ray-backed ones
    under Ray); `extra_labels` are label names every series carries (e.g. vLLM's engine labels)."""

    def __init__(self, counter_cls: Any = Counter, histogram_cls: Any = Histogram,
                 extra_labels: tuple[str, ...] = ()) -> None:
        self.extra_labels = tuple(extra_labels)
        labels = list(self.extra_labels)
        self.bytes = _make(counter_cls, BYTES, "Bytes moved by KV transfers.", labels + ["backend", "op"])
        self.transfers = _make(counter_cls, TRANSFERS, "KV transfers completed.", labels + ["backend", "op"])
        self.seconds = _make(histogram_cls, SECONDS, "Duration of one KV transfer, post to confirmed.",
                             labels + ["backend", "op"], buckets=_SECONDS_BUCKETS)
        self.failures = _make(counter_cls, FAILURES, "KV transfers that failed or were refused.",
                              labels + ["backend", "reason"])
        self.lease_expiries = _make(counter_cls, LEASE_EXPIRIES,
                                    "Leases on handed-off KV blocks that expired before the peer acknowledged.",
                                    labels or None)

    def observe(self, snap: dict[str, Any], extra_values: tuple[object, ...] = ()) -> None:
        ev = [str(v) for v in extra_values]
        for key, n in snap.get("bytes", {}).items():
            self.bytes.labels(*ev, *key.split("|", 1)).inc(n)
        for key, n in snap.get("count", {}).items():
            self.transfers.labels(*ev, *key.split("|", 1)).inc(n)
        for key, values in snap.get("seconds", {}).items():
            h = self.seconds.labels(*ev, *key.split("|", 1))
            for v in values:
                h.observe(v)
        for key, n in snap.get("failures", {}).items():
            self.failures.labels(*ev, *key.split("|", 1)).inc(n)
        if snap.get("lease_expiries"):
            (self.lease_expiries.labels(*ev) if ev else self.lease_expiries).inc(snap["lease_expiries"])


_default: TransferMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> TransferMetrics:
    """The series in prometheus_client's default registry, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = TransferMetrics()
        return _default


def _make(cls: Any, name: str, doc: str, labels: list[str] | None, **kw: Any) -> Any:
    # A second engine in the same process (or a test re-creating metrics) must reuse the series
    # rather than fail on a duplicate registration.
    if cls in (Counter, Histogram):
        existing = REGISTRY._names_to_collectors.get(name)  # noqa: SLF001 - no public lookup
        if existing is not None:
            return existing
    return cls(name, doc, labelnames=labels or (), **kw)
