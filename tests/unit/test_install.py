"""The installed environment itself: packages that overwrite each other's modules break Ray quietly."""

from opentelemetry.proto.metrics.v1 import metrics_pb2


def test_opentelemetry_proto_is_the_one_ray_reads():
    # xds-protos ships an old opentelemetry/proto; with it, Ray's metrics agent drops every
    # application metric (AttributeError: scope_metrics) and nothing reaches Ray's Prometheus port.
    fields = {f.name for f in metrics_pb2.ResourceMetrics.DESCRIPTOR.fields}
    assert "scope_metrics" in fields, f"old opentelemetry-proto installed ({sorted(fields)}): run `make install`"


def test_the_package_is_python_only():
    # One implementation of each part: no compiled twin beside a Python one (no C in the package).
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    compiled = [p for d in ("disagg", "kv_transfer", "deployments") for p in (root / d).rglob("*")
                if p.suffix in (".c", ".so", ".pyx", ".cpp")]
    assert not compiled, compiled
