"""The benchmark drivers on very small workloads, so that they cannot rot.

Fast stand-ins check the client driver and the reference proxy's protocol; the reference stack
runs for real (two vLLM servers with NixlConnector behind the proxy); Ray Serve LLM's P/D app is
built (not deployed: that takes minutes) from the arguments our launcher gives it; the report
renders from a run's JSON; `disagg bench serve --mode both` runs our stack both ways for real.
`python -m benchmarks.compare --quick` runs every stack for real.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from benchmarks.compare import ratios
from benchmarks.peers import RayServeLLM, ReferenceProxy
from benchmarks.reference_proxy import build_app as build_proxy
from benchmarks.report import markdown, plots
from disagg.bench import driver, workloads
from disagg.bench.stacks import EngineSettings, GatewayWorker, OursGateway, Stack
from tests.support.workers import metric

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A FastAPI app on a free port in a background thread."""

    def __init__(self, app: FastAPI):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("stand-in server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def fake_vllm(role: str, seen: list[dict[str, Any]], fail_every: int = 0) -> FastAPI:
    """Streams max_tokens one-word tokens every 5 ms (OpenAI SSE, usage last); as prefill,
    answers with kv_transfer_params like vLLM's NixlConnector."""
    app = FastAPI()
    count = {"n": 0}

    async def handle(request: Request, kind: str) -> Any:
        body = await request.json()
        seen.append({"role": role, **body})
        count["n"] += 1
        if fail_every and count["n"] % fail_every == 0:
            return JSONResponse({"error": {"message": "injected"}}, status_code=500)
        if role == "prefill":
            return {"choices": [{"text": "x"}], "kv_transfer_params": {
                "do_remote_prefill": True, "remote_engine_id": "e1", "remote_block_ids": [1, 2],
                "remote_host": "127.0.0.1", "remote_port": 1234}}

        async def stream() -> AsyncIterator[str]:
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(0.005)
                choice = {"delta": {"content": "w "}} if kind == "chat" else {"text": "w "}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            usage = {"prompt_tokens": 1, "completion_tokens": body["max_tokens"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await handle(request, "chat")

    return app


async def test_driver_measures_every_request_open_and_closed_loop(tiny_model: str) -> None:
    seen: list[dict[str, Any]] = []
    w = workloads.build("shared_prefix", tiny_model, conversations=2, turns=2, answer_tokens=5)
    with _Server(fake_vllm("decode", seen)) as server:
        url = f"http://{server.address}"
        open_loop = await driver.drive(url, "tiny", w, rate=50.0)
        closed = await driver.drive(url, "tiny", w, concurrency=2)
    for run in (open_loop, closed):
        s = run.summary()
        assert s["requests"] == 4 and s["failed"] == 0
        assert s["output_tokens"] == 20
        assert s["ttft_p50_ms"] > 0 and s["itl_p50_ms"] > 0 and s["tpot_p50_ms"] > 0
    assert all("messages" in body for body in seen)


async def test_driver_counts_failures(tiny_model: str) -> None:
    w = workloads.build("uniform", tiny_model, requests=6, answer=(3, 3))
    with _Server(fake_vllm("decode", [], fail_every=3)) as server:
        run = await driver.drive(f"http://{server.address}", "tiny", w, concurrency=1)
    assert run.summary()["failed"] == 2
    assert all(r.error.startswith("HTTP 500") for r in run.results if not r.ok)


async def test_driver_counts_an_unreachable_server_as_failed(tiny_model: str) -> None:
    w = workloads.build("uniform", tiny_model, requests=2)
    run = await driver.drive(f"http://127.0.0.1:{_free_port()}", "tiny", w, concurrency=2)
    assert run.failed == 2 and len(run.results) == 2


async def test_reference_proxy_prefills_one_token_then_decodes_with_the_returned_params(tiny_model: str) -> None:
    seen: list[dict[str, Any]] = []
    with _Server(fake_vllm("prefill", seen)) as p, _Server(fake_vllm("decode", seen)) as d1, \
            _Server(fake_vllm("decode", seen)) as d2:
        with _Server(build_proxy([p.address], [d1.address, d2.address])) as proxy:
            w = workloads.build("mixed", tiny_model, requests=4, long_prompt=(40, 50), short_prompt=(5, 10))
            run = await driver.drive(f"http://{proxy.address}", "tiny", w, concurrency=1)
    assert run.failed == 0
    prefills = [b for b in seen if b["role"] == "prefill"]
    decodes = [b for b in seen if b["role"] == "decode"]
    assert len(prefills) == len(decodes) == 4
    for b in prefills:
        assert b["max_tokens"] == 1 and b["stream"] is False and "stream_options" not in b
        assert b["kv_transfer_params"]["do_remote_decode"] is True
    for b in decodes:
        assert b["kv_transfer_params"]["remote_block_ids"] == [1, 2] and b["stream"] is True


def _serves_a_small_workload(stack: Stack, tiny_model: str, components: set[str],
                             inside: Callable[[Stack], Any] = lambda _: None) -> Any:
    """4 mixed requests through `stack`, none failing; every component measured, every process
    gone after. Returns what `inside(stack)` read while the stack was up."""
    w = workloads.build("mixed", tiny_model, requests=4, long_prompt=(300, 400), short_answer=(8, 12))
    with stack:
        run = asyncio.run(driver.drive(stack.url, stack.model_name, w, concurrency=2))
        memory = stack.memory_mib()
        seen = inside(stack)
    summary = run.summary()
    assert summary["failed"] == 0 and summary["requests"] == 4, summary
    assert summary["output_tokens"] > 0
    assert components <= set(memory) and all(memory[c] > 50 for c in components), memory
    assert all(not i.alive() for i in stack.launched)
    return seen


def test_reference_stack_serves_a_small_workload(tiny_model: str, tmp_path: Path) -> None:
    """Two real vLLM servers (prefill core 0, decode core 1, NixlConnector with NIXL's progress
    thread waiting instead of spinning, as the benchmark runs them) behind the proxy: the decode
    engine gets most of each prompt's KV by transfer."""
    stack = ReferenceProxy("reference", tiny_model, EngineSettings(), log_dir=tmp_path)

    def inside(s: Stack) -> tuple[float, float, str, set[str]]:
        decode = stack.engine_urls["decode"]
        return (metric(decode, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"),
                metric(decode, "vllm:prompt_tokens_by_source_total", source="local_compute"),
                "".join(item.log_tail(200_000) for item in s.launched), set(s.memory_mib()))

    components = {"prefill", "decode", "router"}
    transferred, computed, logs, measured = _serves_a_small_workload(stack, tiny_model, components, inside)
    assert measured == components
    assert "progress threads poll with a 1000 us timeout" in logs
    assert transferred > 2 * computed, (transferred, computed)


# A stack of Ray Serve LLM's own (~90 s): `make test-slow`; its app's construction from our
# arguments is in every run (test_ray_serve_llm_pd_app_builds_from_our_arguments).
@pytest.mark.slow
def test_ray_serve_llm_stack_serves_a_small_workload(tiny_model: str, tmp_path: Path) -> None:
    """Ray Serve LLM's P/D app as the benchmark starts it (its NixlConnector not spinning)."""
    pytest.importorskip("pyarrow", reason="ray.llm needs pyarrow (see benchmarks/ray_serve_llm.py)")
    stack = RayServeLLM("ray-serve-llm", tiny_model, EngineSettings(), log_dir=tmp_path, stream_batching_ms=0.0)
    _serves_a_small_workload(stack, tiny_model, {"prefill", "decode"})


def test_study_stack_serves_each_kind_of_arm(tiny_model: str, tmp_path: Path) -> None:
    """The P/D study's gateway stack: workers start once, the router restarts per arm (here
    aggregated on one decode, then disaggregated through the prefill)."""
    stack = OursGateway("study", tiny_model, EngineSettings(), log_dir=tmp_path,
                        workers=[GatewayWorker("prefill0", "prefill", "0"), GatewayWorker("decode0", "decode", "1")])
    w = workloads.build("mixed", tiny_model, requests=4, long_prompt=(300, 400), short_answer=(8, 12))
    with stack:
        for labels, routing in ((["decode0"], []), (["prefill0", "decode0"], ["routing.pd_threshold_tokens=0"])):
            stack.route(labels, routing)
            run = asyncio.run(driver.drive(stack.url, stack.model_name, w, concurrency=2))
            assert run.summary()["failed"] == 0, (labels, run.summary())
        remote = metric(f"http://{stack.workers[1].address}", "disagg_prefill_handoffs_total", result="remote")
    assert remote >= 4, remote


def test_bench_serve_measures_a_running_stack_given_by_url(tiny_model: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from disagg.bench.serve import main

    with _Server(fake_vllm("decode", [])) as server:
        rc = main(["--mode", "aggregated", "--url", f"http://{server.address}", "--model", tiny_model,
                   "--model-name", "tiny", "--requests", "5", "--rate", "20", "--short-answer", "4,6",
                   "--long-prompt", "100,200", "--json", str(tmp_path / "s.json")])
    assert rc == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert list(report["modes"]) == ["aggregated"] and "ratios" not in report
    s = report["modes"]["aggregated"]["run"]["summary"]
    assert s["requests"] == 5 and s["failed"] == 0 and report["load"] == "poisson 20/s"
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert "5/5 requests done, 0 failed" in capsys.readouterr().err


def test_ray_serve_llm_pd_app_builds_from_our_arguments(tiny_model: str) -> None:
    pytest.importorskip("pyarrow", reason="ray.llm needs pyarrow (see benchmarks/ray_serve_llm.py)")
    from ray.serve.llm import build_pd_openai_app

    from benchmarks.ray_serve_llm import pd_serving_args

    args = pd_serving_args(tiny_model, model_id="tiny", host="127.0.0.1", prefill_core="0", decode_core="1",
                           prefill_nixl_port=_free_port(), decode_nixl_port=_free_port(), stream_batching_ms=0.0)
    assert build_pd_openai_app(args) is not None
    assert args["decode_config"]["experimental_configs"]["stream_batching_interval_ms"] == 0.0
    assert args["prefill_config"]["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "0"


def _fake_report() -> dict[str, Any]:
    def run(workload: str, load: str, ttft: float, tok_s: float, itl: float = 10.0) -> dict[str, Any]:
        s = {"requests": 4, "failed": 0, "ttft_p50_ms": ttft, "ttft_p99_ms": ttft * 2, "itl_p50_ms": itl / 2,
             "itl_p99_ms": itl, "tpot_p50_ms": 5.0, "tpot_p99_ms": 9.0, "output_tok_s": tok_s, "req_s": 1.0}
        return {"workload": workload, "load": load, "summary": s, "groups": {"short_prompt": s}}

    def stack(name: str, ttft: float, tok_s: float) -> dict[str, Any]:
        runs = [r for w in workloads.WORKLOADS for r in (run(w, "poisson 2/s", ttft, tok_s),
                                                          run(w, "closed 4", ttft, tok_s))]
        return {"name": name, "runs": runs, "memory_mib": {"prefill": 900.0, "decode": 900.0}, "startup_s": 60}

    return {
        "date": "2026-11-27T00:00:00+00:00", "command": "python -m benchmarks.compare --quick", "elapsed_s": 600,
        "machine": {"cpu": "cpu", "cores": 2, "memory_gib": 24, "load_avg_at_start": [1, 1, 1], "platform": "linux"},
        "side_by_side": {"model": "tiny", "workloads": {}, "stacks": [stack("ours", 50, 300), stack("ray-serve-llm", 100, 200),
                                                                      stack("reference", 80, 250)]},
        "pd_study": {"model": "bench", "workloads": {}, "arms": [
            {"arm": "aggregated", "runs": [run("mixed", "poisson 1/s", 100, 50, itl=300),
                                           run("shared_prefix", "poisson 1/s", 30, 50)]},
            {"arm": "round-robin", "runs": [run("shared_prefix", "poisson 1/s", 120, 50)]},
            {"arm": "disaggregated t=256", "threshold": 256, "runs": [run("mixed", "poisson 1/s", 150, 50, itl=60)]},
        ]},
    }


def test_report_gives_the_ratios_the_issue_asks_for_and_renders(tmp_path: Path) -> None:
    report = _fake_report()
    report["ratios"] = r = ratios(report["side_by_side"], report["pd_study"])
    assert r["ours_vs_ray-serve-llm"]["ttft_p50_geomean"] == 0.5
    assert r["ours_vs_ray-serve-llm"]["throughput_geomean"] == 1.5
    assert r["itl_p99_disagg_over_agg_mixed"] == 0.2
    assert r["ttft_p50_prefix_over_round_robin_shared_prefix"] == 0.25
    names = plots(report, tmp_path, "t")
    assert names and all((tmp_path / n).stat().st_size > 1000 for n in names)
    text = markdown(report, "t.json", names)
    assert "| TTFT p50 ours / ray-serve-llm (geomean of workloads) | 0.50 | <= 0.7 |" in text
    assert "disaggregated t=256" in text


def test_report_plots_go_where_plot_names_them(tmp_path: Path) -> None:
    """`python -m benchmarks.compare --plot FILE`: the side by side at FILE, the others beside it."""
    from benchmarks.report import plots_at

    written = plots_at(_fake_report(), tmp_path / "out" / "cmp.png")
    assert [p.name for p in written] == ["cmp.png", "cmp-memory.png", "cmp-pd-study.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_bench_epp_times_picks_and_the_envoy_hop(tmp_path: Path) -> None:
    """`disagg bench epp` on a tiny run: picks at two pool sizes, the hop through a real Envoy
    alone and with real `disagg epp` processes (TLS and plaintext) and the harness's servers (the
    floor, grpclib) in front of a stand-in worker, and scrapes of stand-in workers."""
    from disagg.bench.epp import main

    out = tmp_path / "epp.json"
    assert main(["--endpoints", "4,8", "--indexed-blocks", "320", "--picks", "60", "--answer-requests", "50",
                 "--hop-requests", "40", "--scrape-workers", "4", "--qps", "100", "--qps-seconds", "2",
                 "--replica-requests", "40", "--idle-workers", "20", "--large-body-requests", "40",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    # The fleet-scale parts, small: open-loop arrivals, two replicas, an idle EPP, large bodies.
    qps = report["qps"]
    assert qps["rate"] == 100 and qps["failed"] == 0 and qps["envoy_epp"]["answered"] > 100
    assert "epp_hop_added_p50_ms" in qps and "epp_hop_added_p99_ms" in qps
    replicas = report["replicas"]
    assert replicas["count"] == 2 and replicas["prefix_affinity"] >= 0.9
    assert replicas["pick_agreement"] is None or replicas["pick_agreement"] >= 0.9
    idle = report["idle"]
    assert idle["endpoints"] == idle["live"] == 20 and 0 <= idle["cpu_percent"] < 100
    assert "epp_hop_added_p50_ms" in report["large_body"]
    assert [p["endpoints"] for p in report["pick"]] == [4, 8]
    assert all(p["picks"] == 60 and 0 < p["p50_us"] <= p["p99_us"] for p in report["pick"])
    # The in-process answers routed to the stand-in (checked as they ran), each taking some time.
    answer = report["answer"]
    assert all(0 < answer[name][key] for name in ("epp", "floor") for key in ("p50_us", "after_idle_p50_us"))
    hop = report["hop"]
    assert hop["requests"] == 40
    assert all(0 < hop[name]["p50_ms"] for name in ("direct", "envoy", "envoy_floor", "envoy_epp",
                                                    "envoy_epp_plaintext", "envoy_epp_grpclib"))
    # Each EPP process (ours over TLS and plaintext, and on grpclib) did work for every request.
    assert all(hop[f"epp_cpu_ms_per_request{suffix}"] > 0 for suffix in ("", "_plaintext", "_grpclib"))
    assert "grpclib_minus_ours_added_p50_ms" in hop
    # The floor's CPU may read 0 over so few requests (/proc counts 10 ms ticks); it is there.
    assert hop["epp_cpu_ms_per_request_floor"] >= 0 and "epp_hop_added_p50_ms_floor" in hop
    assert (tmp_path / "epp.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "epp.md").read_text()
    assert "| 8 |" in table and "Envoy + EPP with ext_proc on grpclib" in table and "(the floor)" in table
    assert "| EPP (parse, pick, answer) |" in table and "Envoy + EPP over TLS (the default)" in table
    # Four workers scraped every 0.2 s: about 20 scrapes a second, each costing some CPU.
    scrapes = report["scrapes"]
    assert scrapes["workers"] == 4 and 10 < scrapes["scrapes_per_s"] <= 25 and scrapes["cpu_ms_per_scrape"] > 0
    assert "Keeping the state current: 4 workers" in table
