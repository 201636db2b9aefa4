"""Traces a simulation replays: Mooncake JSONL and our workloads without a tokenizer."""

from __future__ import annotations

import json

import pytest

from disagg.bench.workloads import poisson
from disagg.sim import trace


def write(tmp_path, rows):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_mooncake_lines_become_requests_whose_equal_hash_ids_are_equal_tokens(tmp_path):
    path = write(tmp_path, [
        {"timestamp": 1000, "input_length": 1200, "output_length": 20, "hash_ids": [7, 8, 9]},
        {"timestamp": 1500, "input_length": 700, "output_length": 5, "hash_ids": [7, 11]},
        {"timestamp": 3000, "input_length": 100, "output_length": 0, "hash_ids": []},
    ])
    a, b, c = trace.mooncake(path)
    assert [r.arrival_s for r in (a, b, c)] == [0.0, 0.5, 2.0]
    assert [len(r.tokens) for r in (a, b, c)] == [1200, 700, 100]
    assert [r.output_tokens for r in (a, b, c)] == [20, 5, 1]  # at least one token
    assert a.tokens[:512] == b.tokens[:512]  # block 7 in both
    assert a.tokens[512:700] != b.tokens[512:700]
    assert not set(c.tokens) & set(a.tokens)


def test_mooncake_timestamps_scale_to_a_rate(tmp_path):
    path = write(tmp_path, [{"timestamp": t, "input_length": 10, "output_length": 1, "hash_ids": [t]}
                            for t in range(0, 10_000, 1000)])
    reqs = list(trace.mooncake(path, rate=3.0))
    assert reqs[-1].arrival_s == pytest.approx(3.0)  # 9 gaps at 3/s


def test_workloads_arrive_as_bench_serve_sends_them():
    reqs = list(trace.workload("mixed", requests=24, rate=2.0, seed=0))
    assert [r.arrival_s for r in reqs] == poisson(24, 2.0, 0)
    assert {r.group for r in reqs} == {"long_prompt", "short_prompt"}
    long = [r for r in reqs if r.group == "long_prompt"]
    assert all(1024 <= len(r.tokens) <= 1536 and 4 <= r.output_tokens <= 8 for r in long)


def test_shared_prefix_turns_extend_the_previous_turn_and_share_the_system_prompt():
    reqs = list(trace.workload("shared_prefix", requests=8, rate=1.0, conversations=2, turns=4))
    conv0 = [r for r in reqs if r.group == "conv0"]
    conv1 = [r for r in reqs if r.group == "conv1"]
    assert len(conv0) == 4 and conv0[0].tokens[:512] == conv1[0].tokens[:512]
    for before, after in zip(conv0, conv0[1:]):
        assert after.tokens[:len(before.tokens) - 2] == before.tokens[:-2]  # all but the generation prompt
        assert len(after.tokens) > len(before.tokens)


def test_workload_parameters_reach_the_builder():
    reqs = list(trace.workload("uniform", requests=50, rate=5.0, prompt=(10, 20), answer=(3, 3)))
    assert all(10 <= len(r.tokens) <= 20 and r.output_tokens == 3 for r in reqs)
