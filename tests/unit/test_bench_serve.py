"""`disagg bench serve`: its arguments, the disagg/aggregated ratios, the report's table and plot,
and the aggregated stack it starts (no prefill deployment)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from disagg.bench import serve
from disagg.config import AppConfig


def _summary(**overrides: Any) -> dict[str, Any]:
    s = {"requests": 4, "failed": 0, "no_text": 0, "ttft_p50_ms": 100.0, "ttft_p99_ms": 400.0, "itl_p50_ms": 10.0,
         "itl_p99_ms": 50.0, "tpot_p50_ms": 12.0, "tpot_p99_ms": 30.0, "latency_p50_ms": 900.0,
         "latency_p99_ms": 1500.0, "output_tokens": 200, "output_tok_s": 80.0, "req_s": 1.0}
    return {**s, **overrides}


def test_defaults_run_both_modes_closed_loop_on_the_mixed_workload() -> None:
    args = serve.parse_args([])
    assert serve.modes_of(args) == ["disagg", "aggregated"]
    assert args.workload == "mixed" and args.concurrency == 4 and args.rate is None
    assert args.json is None and args.plot is None


def test_rate_gives_an_open_loop_without_a_concurrency() -> None:
    args = serve.parse_args(["--rate", "2.5", "--mode", "disagg"])
    assert args.rate == 2.5 and args.concurrency is None
    assert serve.modes_of(args) == ["disagg"]


def test_the_plot_goes_beside_the_json_unless_named(tmp_path: Path) -> None:
    assert serve.parse_args(["--json", str(tmp_path / "a.json")]).plot == tmp_path / "a.png"
    args = serve.parse_args(["--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "b.png")])
    assert args.plot == tmp_path / "b.png"


@pytest.mark.parametrize("argv", [
    ["--url", "http://127.0.0.1:8000"],  # one URL is one stack: which mode is it?
    ["--url", "http://127.0.0.1:8000", "--mode", "both"],
    ["--rate", "2", "--concurrency", "4"],
    ["--rate", "0"],
    ["--concurrency", "0"],
    ["--requests", "0"],
    ["--mode", "pd"],
    ["--long-prompt", "400,300"],
])
def test_contradictory_or_invalid_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        serve.parse_args(argv)
    assert exc.value.code == 2


def test_a_url_is_measured_as_the_mode_it_is_labelled() -> None:
    args = serve.parse_args(["--url", "http://127.0.0.1:8000", "--mode", "aggregated"])
    assert serve.modes_of(args) == ["aggregated"] and args.url == "http://127.0.0.1:8000"


def test_token_ranges_are_lo_hi_or_one_number() -> None:
    assert serve.token_range("300,400") == (300, 400)
    assert serve.token_range("64") == (64, 64)
    for bad in ("0,10", "10,5", "a,b", "1,2,3", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            serve.token_range(bad)


def test_ratios_are_disagg_over_aggregated_per_metric() -> None:
    r = serve.ratios(_summary(ttft_p50_ms=50.0, itl_p99_ms=10.0, output_tok_s=120.0), _summary())
    assert r["ttft_p50"] == 0.5 and r["itl_p99"] == 0.2 and r["output_tok_s"] == 1.5
    assert r["ttft_p99"] == r["itl_p50"] == r["tpot_p50"] == r["tpot_p99"] == r["latency_p50"] == 1.0
    assert set(r) == {k.removesuffix("_ms") for k in serve.COMPARED}


def test_no_ratio_from_a_run_with_failures_or_a_missing_value() -> None:
    assert set(serve.ratios(_summary(failed=1), _summary()).values()) == {None}
    assert set(serve.ratios(_summary(), None).values()) == {None}
    r = serve.ratios(_summary(ttft_p50_ms=None), _summary(itl_p50_ms=0.0))
    assert r["ttft_p50"] is None and r["itl_p50"] is None and r["ttft_p99"] == 1.0


def test_ratios_cover_every_request_group_when_both_modes_ran() -> None:
    def run(ttft: float) -> dict[str, Any]:
        return {"summary": _summary(ttft_p50_ms=ttft), "groups": {"long_prompt": _summary(ttft_p50_ms=ttft * 4),
                                                                   "short_prompt": _summary(ttft_p50_ms=ttft)}}

    report: dict[str, Any] = {"modes": {"disagg": {"run": run(50.0)}, "aggregated": {"run": run(100.0)}}}
    serve.add_ratios(report)
    assert report["ratios"]["ttft_p50"] == 0.5
    assert set(report["group_ratios"]) == {"long_prompt", "short_prompt"}
    assert report["group_ratios"]["long_prompt"]["ttft_p50"] == 0.5


def test_no_ratios_from_one_mode_and_none_from_a_mode_that_did_not_run() -> None:
    one: dict[str, Any] = {"modes": {"disagg": {"run": {"summary": _summary(), "groups": {}}}}}
    serve.add_ratios(one)
    assert "ratios" not in one
    failed: dict[str, Any] = {"modes": {"disagg": {"run": {"summary": _summary(), "groups": {}}},
                                        "aggregated": {"error": "TimeoutError"}}}
    serve.add_ratios(failed)
    assert set(failed["ratios"].values()) == {None} and "group_ratios" not in failed


def _report() -> dict[str, Any]:
    disagg, agg = _summary(ttft_p50_ms=50.0), _summary()
    return {"model": "tiny", "workload": {"name": "mixed", "requests": 4}, "load": "closed 2",
            "modes": {"disagg": {"run": {"summary": disagg}}, "aggregated": {"run": {"summary": agg}}},
            "ratios": serve.ratios(disagg, agg),
            "group_ratios": {"short_prompt": serve.ratios(disagg, agg)}}


def test_the_table_has_a_row_per_mode_and_the_ratios() -> None:
    text = serve.table(_report())
    assert "| disagg | 50.0/400 | 10.0/50.0 | 12.0/30.0 | 900 | 80.0 | 0/4 |" in text
    assert "| all requests | 0.50 | 1.00 |" in text and "| short_prompt only |" in text


def test_a_mode_that_failed_to_start_shows_its_error() -> None:
    report = _report()
    report["modes"]["aggregated"] = {"error": "TimeoutError: not ready"}
    del report["ratios"], report["group_ratios"]
    assert "| aggregated | - | - | - | - | - | TimeoutError: not ready |" in serve.table(report)


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "out" / "serve.png"
    serve.plot(_report(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_the_modes_use_the_same_two_cores(tiny_model: str, tmp_path: Path) -> None:
    from disagg.bench.stacks import EngineSettings

    disagg = serve.make_stack("disagg", tiny_model, EngineSettings(), tmp_path)
    agg = serve.make_stack("aggregated", tiny_model, EngineSettings(), tmp_path)
    assert (disagg.prefill_replicas, disagg.decode_replicas) == (1, 1)
    assert (agg.prefill_replicas, agg.decode_replicas) == (0, 2)
    assert "kv_connector=none" in agg.settings_overrides
    default = AppConfig.model_fields["kv_connector"].default
    assert f"kv_connector={default}" in disagg.settings_overrides and default in disagg.description


def test_the_gateway_path_runs_the_same_modes_on_the_same_cores(tiny_model: str, tmp_path: Path) -> None:
    from disagg.bench.stacks import EngineSettings, OursGateway

    disagg = serve.make_stack("disagg", tiny_model, EngineSettings(), tmp_path, path="gateway")
    agg = serve.make_stack("aggregated", tiny_model, EngineSettings(), tmp_path, path="gateway")
    assert isinstance(disagg, OursGateway) and isinstance(agg, OursGateway)
    assert [(w.role, w.core) for w in disagg.workers] == [("prefill", "0"), ("decode", "1")]
    assert [(w.role, w.core) for w in agg.workers] == [("decode", "0"), ("decode", "1")]
    assert disagg.initial_route == [w.label for w in disagg.workers] and len(set(disagg.initial_route)) == 2
    assert "kv_connector=none" in agg.worker_settings and "gateway" in agg.description
    with pytest.raises(ValueError, match="unknown path"):
        serve.make_stack("disagg", tiny_model, EngineSettings(), tmp_path, path="direct")


def test_the_disagg_mode_can_take_another_kv_connector(tiny_model: str, tmp_path: Path) -> None:
    from disagg.bench.stacks import EngineSettings

    stack = serve.make_stack("disagg", tiny_model, EngineSettings(), tmp_path, kv_connector="nixl")
    assert "kv_connector=nixl" in stack.settings_overrides and "nixl" in stack.description
    assert serve.parse_args(["--kv-connector", "nixl"]).kv_connector == "nixl"


def test_an_aggregated_config_deploys_no_prefill_server(tiny_model: str) -> None:
    from ray.serve._private.build_app import build_app as build_serve_app

    from deployments.app import build_app

    config = AppConfig(model=tiny_model, kv_connector="none", prefill={"replicas": 0},
                       decode={"replicas": 2, "cpu_bind": ["0", "1"]})
    built = {d.name: d for d in build_serve_app(build_app(config), name="disagg").deployments}
    assert "PrefillServer" not in built
    assert built["DecodeServer"].num_replicas == 2
