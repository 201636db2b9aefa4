"""The installed environment itself: packages that overwrite each other's modules break Ray quietly."""

from opentelemetry.proto.metrics.v1 import metrics_pb2


def test_opentelemetry_proto_is_the_one_ray_reads():
    # xds-protos ships an old opentelemetry/proto; with it, Ray's metrics agent drops every
    # application metric (AttributeError: scope_metrics) and nothing reaches Ray's Prometheus port.
    fields = {f.name for f in metrics_pb2.ResourceMetrics.DESCRIPTOR.fields}
    assert "scope_metrics" in fields, f"old opentelemetry-proto installed ({sorted(fields)}): run `make install`"


def test_the_epp_c_engine_is_built_where_it_can_be():
    # The build is optional (the Python engine serves without a compiler), so a broken build would
    # pass unnoticed: where a compiler and Python's headers are, the engine must have been built.
    import shutil
    import sysconfig
    from pathlib import Path

    from disagg.epp.h2grpc import ENGINES

    buildable = shutil.which("cc") is not None and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
    assert "c" in ENGINES or not buildable, "disagg/epp/_h2native.c was not built: run `make install`"
