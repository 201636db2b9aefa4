"""The generated Envoy configuration: what the GIE protocol needs from the proxy, and that Envoy
itself accepts it (`envoy --mode validate`)."""

from __future__ import annotations

import json
import subprocess

import pytest

from disagg.epp.envoy import EDS_FILE, EnvoySettings, endpoints_document, envoy_binary, envoy_config, write_endpoints


@pytest.fixture
def settings(tmp_path) -> EnvoySettings:
    return EnvoySettings("127.0.0.1", 18000, "127.0.0.1", 9002, tmp_path)


def ext_proc_filter(config: dict) -> dict:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]


def test_ext_proc_gets_the_buffered_body_and_accepts_envoy_lb_metadata(settings) -> None:
    config = envoy_config(settings)
    ext_proc = ext_proc_filter(config)
    assert ext_proc["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert ext_proc["processing_mode"]["request_trailer_mode"] == "SEND"
    assert ext_proc["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy.lb"]
    assert ext_proc["failure_mode_allow"] is False
    # Envoy holds a body up to the size the EPP accepts, and waits for its answer while the
    # request may wait in the EPP's flow control.
    assert config["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == settings.max_request_bytes
    assert float(ext_proc["message_timeout"].rstrip("s")) == settings.flow_control_ttl_s + settings.ext_proc_timeout_s


def test_ext_proc_can_stream_the_body_full_duplex_as_gie_does(settings) -> None:
    settings.request_body_mode = "FULL_DUPLEX_STREAMED"
    config = envoy_config(settings)
    ext_proc = ext_proc_filter(config)
    assert ext_proc["processing_mode"]["request_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert float(ext_proc["message_timeout"].rstrip("s")) == settings.ext_proc_timeout_s
    assert "per_connection_buffer_limit_bytes" not in config["static_resources"]["listeners"][0]
    settings.request_body_mode = "STREAMED"
    with pytest.raises(ValueError, match="request_body_mode"):
        envoy_config(settings)


def test_workers_cluster_routes_by_override_host_from_metadata_then_header(settings) -> None:
    cluster = next(c for c in envoy_config(settings)["static_resources"]["clusters"] if c["name"] == "workers")
    policy = cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert policy["name"] == "envoy.load_balancing_policies.override_host"
    sources = policy["typed_config"]["override_host_sources"]
    assert sources == [{"metadata": {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}},
                       {"header": "x-gateway-destination-endpoint"}]


def test_endpoints_document_lists_each_address_once() -> None:
    doc = endpoints_document(["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8001"])
    lb = doc["resources"][0]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in lb] == [8001, 8002]


@pytest.mark.parametrize("mode", ["BUFFERED", "FULL_DUPLEX_STREAMED"])
def test_envoy_accepts_the_generated_configuration(settings, tmp_path, mode) -> None:
    settings.request_body_mode = mode
    try:
        binary = envoy_binary()
    except FileNotFoundError:
        pytest.skip("no Envoy binary")
    write_endpoints(tmp_path, ["127.0.0.1:8001"])
    assert json.loads((tmp_path / EDS_FILE).read_text())["resources"]
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(envoy_config(settings)))
    done = subprocess.run([str(binary), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


async def test_a_restarted_epp_leaves_envoys_upstreams_until_it_finds_a_decode(tmp_path) -> None:
    """The EDS file a restarted EPP's scheduler takes over still lists the old decodes: an empty
    pool must not empty Envoy's cluster (every request would get Envoy's own 503)."""
    import asyncio

    from disagg.config import RoutingConfig
    from disagg.epp.gateway import follow_decode_endpoints
    from disagg.routing import Scheduler
    from disagg.bench.standin import make_info

    def listed() -> list[str]:
        doc = json.loads((tmp_path / EDS_FILE).read_text())
        eps = doc["resources"][0]["endpoints"]
        return [f"{e['endpoint']['address']['socket_address']['address']}:"
                f"{e['endpoint']['address']['socket_address']['port_value']}" for e in (eps[0]["lb_endpoints"] if eps else [])]

    write_endpoints(tmp_path, ["127.0.0.1:8001", "127.0.0.1:8002"])
    scheduler = Scheduler(RoutingConfig(), model="tiny", block_size=32)
    task = asyncio.create_task(follow_decode_endpoints(scheduler.pool, tmp_path, interval_s=0.01))
    try:
        await asyncio.sleep(0.1)
        assert listed() == ["127.0.0.1:8001", "127.0.0.1:8002"]  # empty pool: left alone
        decode = scheduler.pool.upsert(make_info("decode", "127.0.0.1:8001"))
        await asyncio.sleep(0.1)
        assert listed() == ["127.0.0.1:8001"]  # the pool's decodes from then on
        scheduler.pool.remove(decode.engine_id)
        await asyncio.sleep(0.1)
        assert listed() == []  # and all gone when they are
    finally:
        task.cancel()
