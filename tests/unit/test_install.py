"""The installed environment itself: packages that overwrite each other's modules break Ray quietly."""

from opentelemetry.proto.metrics.v1 import metrics_pb2


def test_opentelemetry_proto_is_the_one_ray_reads():
    # xds-protos ships an old opentelemetry/proto; with it, Ray's metrics agent drops every
    # application metric (AttributeError: scope_metrics) and nothing reaches Ray's Prometheus port.
    fields = {f.name for f in metrics_pb2.ResourceMetrics.DESCRIPTOR.fields}
    assert "scope_metrics" in fields, f"old opentelemetry-proto installed ({sorted(fields)}): run `make install`"


def test_the_c_parts_are_built_where_they_can_be():
    # The builds are optional (Python serves without a compiler), so a broken build would pass
    # unnoticed: where a compiler and Python's headers are, both must have been built.
    import shutil
    import sysconfig
    from pathlib import Path

    from disagg.epp.h2grpc import ENGINES
    from disagg.routing import scoring

    buildable = shutil.which("cc") is not None and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
    assert "c" in ENGINES or not buildable, "disagg/epp/_h2native.c was not built: run `make install`"
    assert scoring._top is not None or not buildable, "disagg/routing/_rank.c was not built: run `make install`"
