"""The gateway routes the public OpenAI paths to the workers and nothing else: any other path is
a 404 in OpenAI's error body from Envoy itself, without a pick (the workers' /internal/prefill,
/metrics and /v1/worker are not reachable through it)."""

from __future__ import annotations

import json
from pathlib import Path

from disagg.epp.envoy import PUBLIC_PATHS, WORKERS_CLUSTER, EnvoySettings, envoy_config


def routes() -> list[dict]:
    config = envoy_config(EnvoySettings("127.0.0.1", 0, "127.0.0.1", 9002, Path("/tmp")))
    (listener,) = config["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    return vhost["routes"]


def test_only_the_public_openai_paths_reach_the_workers_matched_exactly() -> None:
    assert PUBLIC_PATHS == ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health")
    to_workers = [r for r in routes() if "route" in r]
    assert [r["match"] for r in to_workers] == [{"path": p} for p in PUBLIC_PATHS]
    assert {r["route"]["cluster"] for r in to_workers} == {WORKERS_CLUSTER}


def test_every_other_path_is_an_openai_404_from_envoy_without_asking_the_epp() -> None:
    last = routes()[-1]
    assert last["match"] == {"prefix": "/"} and "route" not in last
    assert last["direct_response"]["status"] == 404
    body = json.loads(last["direct_response"]["body"]["inline_string"])
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == "404"
    assert last["response_headers_to_add"][0]["header"] == {"key": "content-type", "value": "application/json"}
    assert last["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["disabled"] is True


def test_envoys_own_reply_mappers_leave_the_404_as_it_is() -> None:
    config = envoy_config(EnvoySettings("127.0.0.1", 0, "127.0.0.1", 9002, Path("/tmp")))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for mapper in hcm.get("local_reply_config", {}).get("mappers", []):
        expression = mapper["filter"]["extension_filter"]["typed_config"]["expression"]
        # Either it leaves direct responses out, or it matches one detail of Envoy's own.
        assert ("response.code_details != 'direct_response'" in expression
                or expression == "response.code_details == 'upgrade_failed'"), expression
