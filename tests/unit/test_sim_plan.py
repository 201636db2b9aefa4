"""`disagg plan`'s search: candidates, pruning, the recommendation, and DistServe's direction."""

from __future__ import annotations

from disagg.sim import trace
from disagg.sim.cost import CostModel, DecodeCost, EngineLimits, PrefillCost, TransferCost
from disagg.sim.plan import Row, candidates, recommend, search, values_for
from disagg.sim.simulate import Slo

A100 = CostModel.load("a100-opt-13b")


def synthetic(prefill_ms_per_token: float) -> CostModel:
    """A profile where a prompt token costs `prefill_ms_per_token` and a decode step 10 ms."""
    return CostModel(name="synthetic", model="m", hardware="none", dtype="float16", kv_bytes_per_token=1000,
                     prefill=PrefillCost(base_s=0.005, per_token_s=prefill_ms_per_token / 1000, per_attention_s=0.0),
                     decode=DecodeCost(base_s=0.010, per_seq_s=0.0001, per_context_token_s=0.0),
                     limits=EngineLimits(block_size=64, num_blocks=4096, max_num_seqs=64, max_num_batched_tokens=2048),
                     transfer={"link": TransferCost(latency_s=1e-4, bandwidth_bytes_s=10e9)}, backend="link")


def test_candidates_cover_every_split_within_the_budget_smallest_first():
    cs = candidates(3, (0, 256))
    names = [c.name for c in cs]
    assert names == ["1A", "2A", "1P1D@0", "1P1D@256", "3A", "1P2D@0", "1P2D@256", "2P1D@0", "2P1D@256"]
    assert [c.engines for c in cs] == sorted(c.engines for c in cs)


def row(name: str, engines: int, meets: bool, gpe: float) -> Row:
    return Row(name, "aggregated", 0, 0, engines, 256, engines, meets, 1.0, 1.0, 1.0, 1.0, gpe * engines, gpe,
               1.0, 1.0, 0)


def test_the_recommendation_meets_the_slo_before_it_has_more_goodput():
    rows = [row("1A", 1, False, 3.0), row("2A", 2, True, 1.9), row("3A", 3, True, 1.3)]
    assert recommend(rows).name == "2A"
    assert recommend([row("1A", 1, False, 3.0), row("2A", 2, False, 1.0)]).name == "1A"  # none meets: flagged


def test_search_skips_configurations_that_cannot_beat_the_best_of_their_kind():
    reqs = list(trace.workload("uniform", requests=60, rate=2.0, prompt=(32, 64), answer=(16, 32)))
    rows = search(synthetic(0.01), reqs, slo=Slo(0.5, 0.05), max_engines=4, thresholds=(256,),
                  progress=False)
    names = [r.name for r in rows]
    assert names[0] == "1A" and rows[0].meets_slo  # one engine serves 2 short requests/s
    assert not any(r.kind == "aggregated" and r.engines > 1 for r in rows)  # rate / engines < the best
    assert "1P1D@256" in names  # the best disaggregated one is still found
    assert recommend(rows).name == "1A"


def test_the_answer_comes_with_app_config_and_helm_values():
    r = Row("2P3D@512", "disaggregated", 2, 3, 0, 512, 5, True, 1, 1, 1, 1, 1, 1, 1, 1, 0)
    v = values_for(r, A100)
    assert v["app_config"] == {"block_size": 64, "prefill": {"replicas": 2}, "decode": {"replicas": 3},
                               "routing": {"pd_threshold_tokens": 512}}
    assert v["helm_values"]["routing"] == {"pdThresholdTokens": 512}
    agg = values_for(row("4A", 4, True, 1.0), A100)
    assert agg["app_config"]["prefill"] == {"replicas": 0} and agg["app_config"]["kv_connector"] == "none"


def best(rows: list[Row], kind: str) -> float:
    return max((r.goodput_per_engine for r in rows if r.kind == kind), default=0.0)


def test_distserve_direction_long_prompts_under_a_tight_tpot_slo_favour_disaggregation():
    reqs = list(trace.workload("uniform", requests=120, rate=4.0, prompt=(1024, 1536), answer=(64, 128)))
    rows = search(A100, reqs, slo=Slo(1.0, 0.030), max_engines=5, thresholds=(256,), progress=False)
    assert recommend(rows).kind == "disaggregated" and recommend(rows).meets_slo
    assert best(rows, "disaggregated") > best(rows, "aggregated")


def test_short_prompts_favour_aggregation():
    reqs = list(trace.workload("uniform", requests=120, rate=4.0, prompt=(16, 64), answer=(64, 128)))
    rows = search(A100, reqs, slo=Slo(1.0, 0.030), max_engines=5, thresholds=(0, 256), progress=False)
    assert recommend(rows).kind == "aggregated" and recommend(rows).meets_slo
    assert best(rows, "aggregated") > best(rows, "disaggregated")
