"""`disagg serve` end to end on a real local Ray (the edge's stack, `disagg serve --gateway`): the
OpenAI API through the Router, P/D through Serve handles pinned to the picked decode replica,
errors, disconnects, and the Ray dashboard. Runs last of the edge's modules (by name): its last
test kills the prefill replica."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.prometheus import Prometheus, promtool_problems
from tests.support.serve_stack import ServeStack
from tests.support.workers import REPO, metric, start_worker_process, wait_ready

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def aggregated(tiny_model, tmp_path_factory):
    """The aggregated reference: a vLLM worker of its own with no KV connector and no prefill."""
    worker = start_worker_process(tiny_model, "decode", cpu_bind="0", log_dir=tmp_path_factory.mktemp("agg"),
                                  settings=["block_size=32", "max_model_len=1024", "kv_connector=none"])
    try:
        wait_ready(worker)
        yield worker
    finally:
        worker.stop()


def long_prompt(i: int, words: int = 80) -> str:
    return " ".join(f"item{(i * 31 + k) % 401} dog" for k in range(words))


def engine_load(address: str) -> dict:
    return httpx.get(f"http://{address}/v1/worker", timeout=10).json()["load"]


def wait_blocks_free(address: str, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        load = engine_load(address)
        if (load["running"] == 0 and load["kv_usage"] == 0.0) or time.monotonic() > deadline:
            return load
        time.sleep(0.3)


def test_chat_completion_returns_text_and_usage(stack):
    r = stack.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi there"}],
                                             "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 8 or body["choices"][0]["finish_reason"] == "stop"
    assert r.headers["x-disagg-pd"] == "local"  # a short prompt is prefilled on decode


def test_long_prompt_is_disaggregated_and_equals_local_output(stack):
    text = long_prompt(1)
    r = stack.post("/v1/completions", {"model": "tiny", "prompt": text, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["x-disagg-pd"] == "remote"
    decode = r.headers["x-disagg-decode"]
    # The same prompt straight on the decode worker's own endpoint, no prefill: the reference.
    ref = httpx.post(f"http://{decode}/v1/completions",
                     json={"model": "tiny", "prompt": text, "max_tokens": 16, "temperature": 0}, timeout=60)
    assert r.json()["choices"][0]["text"] == ref.json()["choices"][0]["text"]
    metrics = httpx.get(f"http://{decode}/metrics", timeout=5).text
    assert re.search(r'disagg_prefill_handoffs_total\{result="remote"\} [1-9]', metrics)


def test_gateway_routes_to_the_picked_decode_and_disaggregates_like_the_router(stack):
    """`disagg serve --gateway`: Envoy asks the EPP, which learned the pool from the router, and
    routes to the decode worker's own endpoint; a long prompt carries the prefill worker in
    `x-prefiller-host-port`, and the text equals the Router path's. (First through the gateway:
    once a decode holds the prompt's blocks, either path prefills it locally.)"""
    pool = httpx.get(f"{stack.url}/v1/pool", timeout=10).json()
    decodes = {w["address"] for w in pool if w["role"] == "decode"}
    prefills = {w["address"] for w in pool if w["role"] == "prefill"}
    body = {"model": "tiny", "prompt": long_prompt(900), "max_tokens": 16, "temperature": 0}

    def remote_handoffs() -> dict[str, float]:
        return {d: metric(f"http://{d}", "disagg_prefill_handoffs_total", result="remote") for d in decodes}

    before = remote_handoffs()
    deadline = time.monotonic() + 30  # the EPP polls the router's pool every 0.5 s
    while True:
        r = httpx.post(f"{stack.gateway_url}/v1/completions", json=body, timeout=120)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    served = r.headers["x-disagg-upstream"]
    assert served == r.headers["x-gateway-destination-endpoint"].split(",")[0] and served in decodes
    assert r.headers["x-disagg-prefill"].split(",")[0] in prefills
    assert remote_handoffs()[served] == before[served] + 1
    # The Router path now finds the prompt cached (a decode holds it): the text must not change.
    routed = stack.post("/v1/completions", body)
    assert r.json()["choices"][0]["text"] == routed.json()["choices"][0]["text"]


def test_disaggregated_equals_aggregated_token_for_token_over_8_prompts(stack, aggregated):
    """Through the Router on a real Ray: each long prompt is prefilled remotely, the decode side
    computes at most one block of it, and the text equals one vLLM with no connector."""
    for i, words in enumerate((12, 18, 26, 36, 50, 66, 90, 125)):  # ~80 to ~850 tokens
        text = long_prompt(100 + i, words)
        body = {"model": "tiny", "prompt": text, "max_tokens": 16, "temperature": 0}
        ref = httpx.post(f"{aggregated.url}/v1/completions", json=body, timeout=120)
        assert ref.status_code == 200, ref.text
        n_prompt = ref.json()["usage"]["prompt_tokens"]
        assert 64 < n_prompt < 1000, n_prompt
        decode = "http://" + next(e["address"] for e in httpx.get(f"{stack.url}/v1/pool").json()
                                  if e["role"] == "decode")
        local_before = metric(decode, "vllm:prompt_tokens_by_source_total", source="local_compute")
        r = stack.post("/v1/completions", body)
        assert r.status_code == 200, r.text
        assert r.headers["x-disagg-pd"] == "remote"
        local = metric(decode, "vllm:prompt_tokens_by_source_total", source="local_compute") - local_before
        assert local <= 32, (i, local, n_prompt)
        assert r.json()["choices"][0]["text"] == ref.json()["choices"][0]["text"], i
        assert r.json()["usage"] == ref.json()["usage"]


def test_streaming_chat_ends_with_usage_and_done_and_equals_aggregated(stack, aggregated):
    body = {"model": "tiny", "messages": [{"role": "user", "content": long_prompt(2)}], "max_tokens": 10,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["x-disagg-pd"] == "remote"
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(x) for x in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["usage"]["completion_tokens"] == 10
    assert any(e["choices"] and e["choices"][0]["finish_reason"] == "length" for e in events)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    del body["stream"], body["stream_options"]
    whole = httpx.post(f"{aggregated.url}/v1/chat/completions", json=body, timeout=60).json()
    assert streamed == whole["choices"][0]["message"]["content"]


def test_seeded_sampling_disaggregated_equals_aggregated(stack, aggregated):
    body = {"model": "tiny", "prompt": long_prompt(7), "max_tokens": 24, "temperature": 0.9, "seed": 1234}
    r = stack.post("/v1/completions", body)
    assert r.status_code == 200 and r.headers["x-disagg-pd"] == "remote", r.text
    ref = httpx.post(f"{aggregated.url}/v1/completions", json=body, timeout=60).json()
    assert r.json()["choices"][0]["text"] == ref["choices"][0]["text"]


def test_decode_refuses_a_prefill_header_naming_an_unregistered_worker(stack):
    decode = next(e["address"] for e in httpx.get(f"{stack.url}/v1/pool").json() if e["role"] == "decode")
    r = httpx.post(f"http://{decode}/v1/completions", json={"model": "tiny", "prompt": long_prompt(1)},
                   headers={"x-prefiller-host-port": "10.1.2.3:80"}, timeout=30)
    assert r.status_code == 403
    assert r.json()["error"]["param"] == "x-prefiller-host-port"


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", {"model": "tiny", "messages": "hello"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                  "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 7}, 400, "temperature"),
        ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
        ("/v1/completions", {"model": "tiny", "prompt": "word " * 2000}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ],
)
def test_bad_input_gets_openai_error(stack, path, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(f"{stack.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = stack.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param


def test_worker_metrics_restricted_to_the_load_series_the_router_scrapes(aggregated):
    """The router asks for its few series by `name[]`; the worker renders only those (a full
    /metrics, vLLM's histograms included, ten times a second cost ~10% of a core per worker)."""
    from disagg.routing.scraper import LOAD_QUERY, parse_metrics

    restricted = httpx.get(f"{aggregated.url}/metrics", params=LOAD_QUERY, timeout=10).text
    names = {line.split("{")[0].split(" ")[0] for line in restricted.splitlines() if line and line[0] != "#"}
    assert names == {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                     "vllm:cache_config_info"}, names
    assert parse_metrics(restricted).num_blocks > 0
    full = httpx.get(f"{aggregated.url}/metrics", timeout=10).text
    assert "vllm:e2e_request_latency_seconds_bucket" in full and len(full) > 10 * len(restricted)


def test_models_and_health(stack):
    assert httpx.get(f"{stack.url}/v1/models").json()["data"][0]["id"] == "tiny"
    health = httpx.get(f"{stack.url}/health").json()
    assert health["decode"] == 1 and health["prefill"] == 1


def test_client_disconnect_aborts_both_workers(stack):
    pool = httpx.get(f"{stack.url}/v1/pool").json()
    body = {"model": "tiny", "prompt": long_prompt(3), "max_tokens": 350, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["x-disagg-pd"] == "remote"
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break
    loads = [wait_blocks_free(e["address"]) for e in pool]
    assert all(l["running"] == 0 and l["kv_usage"] == 0.0 for l in loads), loads


def test_ray_dashboard_lists_the_deployments_healthy(stack):
    token_file = Path.home() / ".ray" / "auth_token"
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file.exists() else {}
    r = httpx.get(f"{stack.dashboard}/api/serve/applications/", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    app = r.json()["applications"]["disagg"]
    assert app["status"] == "RUNNING"
    deployments = app["deployments"]
    for name in ("Router", "PrefillServer", "DecodeServer"):
        assert deployments[name]["status"] == "HEALTHY", (name, deployments[name]["status"])


def test_disagg_metrics_reach_rays_metrics_port(stack):
    # Requests above made P/D decisions and prefill hand-offs; the bridge pushes every 2 s and
    # Ray's exporter refreshes on its own period.
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(stack.ray_metrics, timeout=10).text
        if "ray_disagg_pd_decisions_total" in text and "ray_disagg_prefill_handoffs_total" in text:
            break
        time.sleep(2)
    assert re.search(r'ray_disagg_pd_decisions_total\{[^}]*decision="remote"[^}]*\} [1-9]', text), text[-2000:]
    assert re.search(r'ray_disagg_prefill_handoffs_total\{[^}]*deployment="DecodeServer"[^}]*\} [1-9]', text)


def test_disagg_status_prints_the_pool(stack):
    out = subprocess.run([sys.executable, "-m", "disagg.cli", "status", "--url", stack.url], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["ROLE", "ADDRESS"]
    roles = sorted(line.split()[0] for line in lines[1:])
    assert roles == ["decode", "prefill"]
    assert all(line.rstrip().endswith("ok") for line in lines[1:])


def test_prometheus_scrapes_the_stack_and_promtool_finds_no_problems(stack, tmp_path):
    pool = httpx.get(f"{stack.url}/v1/pool").json()
    workers = [w["address"] for w in pool]
    router = stack.url.removeprefix("http://")
    ray_metrics = stack.ray_metrics.removeprefix("http://").removesuffix("/metrics")
    prom = Prometheus({"workers": workers, "router": [router], "ray": [ray_metrics]}, tmp_path)
    try:
        for i in range(3):
            stack.post("/v1/completions", {"model": "tiny", "prompt": long_prompt(10 + i), "max_tokens": 8})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ttft = prom.query('sum(vllm:time_to_first_token_seconds_count{model_name="tiny"})')
            decisions = prom.query("sum(disagg_pd_decisions_total)")
            # Every worker scraped at least once: the counters above may all come from the decode.
            scraped = len(prom.query("vllm:num_requests_waiting")) == len(workers)
            if ttft and float(ttft[0]["value"][1]) >= 3 and decisions and float(decisions[0]["value"][1]) >= 3 \
                    and scraped:
                break
            time.sleep(1)
        assert all(v == 1.0 for v in prom.targets_up().values()), prom.targets_up()
        for name in ("vllm:num_requests_waiting", "vllm:num_requests_running"):
            series = prom.query(name)
            assert len(series) == len(workers), (name, series)
            assert all(float(s["value"][1]) >= 0 for s in series)
        usage = prom.query("vllm:kv_cache_usage_perc")
        assert len(usage) == len(workers) and all(0.0 <= float(s["value"][1]) <= 1.0 for s in usage)
        info = prom.query("vllm:cache_config_info")
        assert {s["metric"]["block_size"] for s in info} == {"32"}
        assert float(prom.query("sum(vllm:time_to_first_token_seconds_count)")[0]["value"][1]) >= 3
        assert prom.query("vllm:inter_token_latency_seconds_count")
        assert float(prom.query('sum(disagg_pd_decisions_total{decision="remote"})')[0]["value"][1]) >= 3
        assert float(prom.query("sum(disagg_prefill_handoffs_total)")[0]["value"][1]) >= 3
        assert prom.query("disagg_endpoint_signal_age_seconds")
    finally:
        prom.stop()
    for address in workers + [router]:
        problems = promtool_problems(httpx.get(f"http://{address}/metrics").text)
        assert problems == [], (address, problems)


def test_bench_serve_drives_the_running_stack(stack, tiny_model, tmp_path):
    """`disagg bench serve --url` against this stack: every request answered, long prompts
    disaggregated, JSON and PNG written. (Without --url the command starts its own stacks.)"""
    json_path = tmp_path / "serve.json"
    out = subprocess.run([sys.executable, "-m", "disagg.cli", "bench", "serve", "--mode", "disagg", "--url",
                          stack.url, "--model", tiny_model, "--model-name", "tiny", "--requests", "4",
                          "--concurrency", "2", "--seed", "5", "--long-prompt", "300,400", "--short-answer", "8,16",
                          "--json", str(json_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(json_path.read_text())["modes"]["disagg"]["run"]["summary"]
    assert summary["requests"] == 4 and summary["failed"] == 0, summary
    assert summary["ttft_p50_ms"] > 0 and summary["output_tok_s"] > 0
    assert summary["remote_prefill_fraction"] > 0, summary
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4/4 requests done, 0 failed" in out.stderr


def _replica_processes(stack: ServeStack, deployment: str) -> list:
    """The processes of a Serve replica of `deployment` in this stack, with their children (the
    vLLM engine core)."""
    import psutil

    found = []
    for p in psutil.Process(stack.proc.pid).children(recursive=True):  # Ray's processes are below its driver
        try:
            if f"ServeReplica:disagg:{deployment}" in " ".join(p.cmdline()):
                found += [p] + p.children(recursive=True)
        except psutil.Error:
            pass
    return found


def test_killed_prefill_replica_is_survived_then_replaced(stack, aggregated):
    """Runs last: a prefill replica and its engine die (SIGKILL, as a lost node). Requests go on
    with correct answers (the dead endpoint is skipped or prefill falls back to decode), decode
    frees every block, and Serve's replacement replica takes over remote prefill."""
    pool = httpx.get(f"{stack.url}/v1/pool").json()
    old_prefill = next(e for e in pool if e["role"] == "prefill")
    decode = next(e for e in pool if e["role"] == "decode")["address"]
    victims = _replica_processes(stack, "PrefillServer")
    assert victims, "no PrefillServer replica process found"
    for p in victims:
        p.kill()

    for i in range(3):  # at once: the Router may still list the dead prefill
        body = {"model": "tiny", "prompt": long_prompt(700 + i), "max_tokens": 12, "temperature": 0}
        r = stack.post("/v1/completions", body)
        assert r.status_code == 200, r.text
        ref = httpx.post(f"{aggregated.url}/v1/completions", json=body, timeout=120).json()
        assert r.json()["choices"][0]["text"] == ref["choices"][0]["text"]
    load = wait_blocks_free(decode)
    assert load["running"] == 0 and load["kv_usage"] == 0.0, load

    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        pool = httpx.get(f"{stack.url}/v1/pool").json()
        if any(e["role"] == "prefill" and e["engine_id"] != old_prefill["engine_id"] for e in pool):
            break
        time.sleep(2)
    else:
        pytest.fail(f"no replacement prefill registered: {pool}")
    assert old_prefill["engine_id"] not in {e["engine_id"] for e in pool}
    body = {"model": "tiny", "prompt": long_prompt(800), "max_tokens": 12, "temperature": 0}
    r = stack.post("/v1/completions", body)
    assert r.status_code == 200 and r.headers["x-disagg-pd"] == "remote", r.text
    ref = httpx.post(f"{aggregated.url}/v1/completions", json=body, timeout=120).json()
    assert r.json()["choices"][0]["text"] == ref["choices"][0]["text"]
    for address in (decode, next(e["address"] for e in pool if e["role"] == "prefill")):
        load = wait_blocks_free(address)
        assert load["kv_usage"] == 0.0 and load["free_blocks"] == load["num_blocks"] - 1, (address, load)


def test_a_short_soak_loses_and_repeats_no_token(stack) -> None:
    """`disagg bench soak`, small: streaming clients for a few seconds, every token counted."""
    import asyncio

    from disagg.bench.soak import soak

    result = asyncio.run(soak(stack.url, "tiny", stack.proc.pid, minutes=0.2, clients=3, sample_s=2.0,
                              settle_min=0.0, seed=1))
    assert result["requests"] >= 3 and result["received"] == result["asked"] > 0
    assert result["lost"] == result["duplicated"] == result["failed"] == result["error_events"] == 0
    assert result["not_done"] == result["usage_mismatch"] == 0
    assert result["samples"] and all(s["rss_mib"] > 100 for s in result["samples"])
