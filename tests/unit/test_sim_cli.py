"""`disagg simulate`, `disagg plan` and `disagg profile`: the JSON other tools read."""

from __future__ import annotations

import json

import pytest

from disagg.cli import main
from disagg.sim.cost import PROFILES, CostModel
from disagg.sim.profile import Point, fit, transfer_costs

SUMMARY_KEYS = {"requests", "completed", "lost", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99",
                "prefix_hit_rate", "wall_s"}


def test_simulate_writes_the_summary_per_request_results_and_a_plot(tmp_path, capsys):
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    rc = main(["simulate", "--profile", str(PROFILES / "a100-opt-13b.json"), "--prefill", "1", "--decode", "1",
               "--aggregated", "1", "--workload", "shared_prefix", "--rate", "2", "--duration", "10", "--seed", "1",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 0
    report = json.loads(out.read_text())
    assert SUMMARY_KEYS <= set(report["summary"])
    assert report["summary"]["requests"] == 20 and report["summary"]["lost"] == 0
    assert report["summary"]["prefix_hit_rate"] > 0  # the shared system prompt
    assert set(report["roles"]) == {"prefill", "decode", "aggregated"}
    assert len(report["requests"]["ttft_ms"]) == 20 and "e2e_ms" in report["requests"]
    assert report["timeline"]["roles"]["decode"]["busy"]
    assert "[simulate]" in capsys.readouterr().err  # progress on stderr


def test_plan_writes_the_recommendation(tmp_path):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--profile", "a100-opt-13b", "--workload", "uniform", "--workload-arg", "prompt=[16,64]",
               "--rate", "2", "--duration", "10", "--slo-ttft-ms", "1000", "--slo-tpot-ms", "40",
               "--max-engines", "3", "--json", str(out), "--plot", str(tmp_path / "plan.png")])
    assert rc == 0
    report = json.loads(out.read_text())
    recommended = set(report["recommended"])
    assert {"prefill", "decode", "aggregated", "pd_threshold_tokens", "goodput_per_engine"} <= recommended
    assert report["recommended"]["app_config"]["decode"]["replicas"] >= 1
    assert report["configurations"] and (tmp_path / "plan.png").exists()


def test_simulate_replays_a_mooncake_trace(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"timestamp": 250 * i, "input_length": 600, "output_length": 8,
                                        "hash_ids": [1, i]}) + "\n" for i in range(12)))
    out = tmp_path / "sim.json"
    assert main(["simulate", "--profile", "a100-opt-13b", "--prefill", "1", "--decode", "1", "--trace", str(path),
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["summary"]["completed"] == 12


def test_the_fit_recovers_a_line_and_says_how_far_it_is():
    points = [Point((1.0, n, n * n), 0.002 + 1e-5 * n + 1e-9 * n * n) for n in (16, 128, 512, 1024, 2000)]
    coef, error = fit(points)
    assert coef == pytest.approx([0.002, 1e-5, 1e-9], rel=1e-6)
    assert error.points == 5 and error.max_relative < 1e-6


def test_a_negative_coefficient_is_dropped_and_the_rest_refitted():
    points = [Point((1.0, b), 0.003 - 1e-6 * b) for b in (1, 4, 16)]
    coef, _ = fit(points)
    assert coef[1] == 0.0 and coef[0] > 0


def test_transfer_costs_come_from_bench_transfer_json(tmp_path):
    path = tmp_path / "transfer.json"
    path.write_text(json.dumps({"results": [
        {"backend": "nixl", "case": "latency", "op": "READ", "median_s": 8e-5, "gbps": 0.7},
        {"backend": "nixl", "case": "coalesced", "op": "READ", "median_s": 0.04, "gbps": 6.0},
        {"backend": "nixl-raw", "case": "coalesced", "op": "READ", "median_s": 0.04, "gbps": 6.1}]}))
    costs = transfer_costs(path)
    assert set(costs) == {"nixl"}
    assert costs["nixl"].latency_s == 8e-5 and costs["nixl"].bandwidth_bytes_s == 6e9


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_profile_loads_and_says_where_its_numbers_come_from(path):
    cost = CostModel.load(path)
    assert cost.backend in cost.transfer and cost.sources
    assert {"prefill", "decode", "limits", "transfer"} <= set(cost.sources)
