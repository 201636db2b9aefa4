"""Mirror this process's `disagg_*` Prometheus metrics into Ray's metrics, so they show in the Ray
dashboard and on Ray's Prometheus export port (as `ray_disagg_*`, with Serve's deployment and
replica tags). Counters and histogram series are mirrored as gauges of their running totals:
`rate()` and `histogram_quantile()` work on them the same way."""

from __future__ import annotations

import asyncio
import logging

import prometheus_client
import ray
from ray.serve.metrics import Gauge

log = logging.getLogger(__name__)
PREFIX = "disagg_"


class MetricsBridge:
    def __init__(self, registry: prometheus_client.CollectorRegistry = prometheus_client.REGISTRY):
        self.registry = registry
        self._gauges: dict[str, tuple[Gauge, tuple[str, ...]]] = {}

    def push(self) -> int:
        """Copy every disagg_* sample once; returns how many were copied."""
        n = 0
        for family in self.registry.collect():
            if not family.name.startswith(PREFIX):
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                gauge, keys = self._gauge(sample.name, tuple(sorted(sample.labels)), family.documentation)
                gauge.set(sample.value, tags={k: str(sample.labels.get(k, "")) for k in keys})
                n += 1
        return n

    def _gauge(self, name: str, keys: tuple[str, ...], doc: str) -> tuple[Gauge, tuple[str, ...]]:
        if name not in self._gauges:
            self._gauges[name] = (Gauge(name, description=doc or name, tag_keys=keys), keys)
        return self._gauges[name]

    async def run(self, interval_s: float = 2.0) -> None:
        if not ray.is_initialized():
            return  # Serve's local testing mode: no Ray, so no Ray metrics to feed
        while True:
            try:
                self.push()
            except Exception:  # noqa: BLE001 - metrics must never take a replica down
                log.warning("metrics bridge push failed", exc_info=True)
            await asyncio.sleep(interval_s)
