"""The installed environment itself: packages that overwrite each other's modules break Ray quietly."""

from opentelemetry.proto.metrics.v1 import metrics_pb2


def test_opentelemetry_proto_is_the_one_ray_reads():
    # xds-protos ships an old opentelemetry/proto; with it, Ray's metrics agent drops every
    # application metric (AttributeError: scope_metrics) and nothing reaches Ray's Prometheus port.
    fields = {f.name for f in metrics_pb2.ResourceMetrics.DESCRIPTOR.fields}
    assert "scope_metrics" in fields, f"old opentelemetry-proto installed ({sorted(fields)}): run `make install`"
