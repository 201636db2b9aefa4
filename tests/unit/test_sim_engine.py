"""The simulated vLLM engine on hand-made cases with exact expected times.

Cost model of these tests: a prompt token costs 1 ms, a decode step 10 ms whatever its batch, and
a step with both costs 10 ms + 1 ms per prompt token (the larger base, 10 ms, plus the tokens)."""

from __future__ import annotations

import pytest
import simpy

from disagg.routing.kv_events import BlockRemoved, BlockStored, apply_batch
from disagg.routing.prefix_index import PrefixIndex, block_hashes
from disagg.sim.cost import CostModel, DecodeCost, EngineLimits, PrefillCost, TransferCost
from disagg.sim.engine import Engine, Seq
from disagg.sim.trace import SimRequest


def cost(*, block_size: int = 4, num_blocks: int = 64, budget: int = 64, max_seqs: int = 8) -> CostModel:
    return CostModel(name="test", model="m", hardware="none", dtype="float16", kv_bytes_per_token=1,
                     prefill=PrefillCost(base_s=0.0, per_token_s=0.001, per_attention_s=0.0),
                     decode=DecodeCost(base_s=0.010, per_seq_s=0.0, per_context_token_s=0.0),
                     limits=EngineLimits(block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_seqs,
                                         max_num_batched_tokens=budget),
                     transfer={"t": TransferCost(latency_s=0.0, bandwidth_bytes_s=1.0)}, backend="t")


class Harness:
    def __init__(self, role: str = "decode", **limits: int) -> None:
        self.env = simpy.Environment()
        self.events: list = []
        self.loads: list[tuple[Seq, int]] = []
        self.engine = Engine(self.env, "e0", role, cost(**limits), on_events=lambda e, b: self.events.extend(b.events),
                             on_load=lambda e, seq, n: self.loads.append((seq, n)))

    def submit(self, tokens: list[int], max_tokens: int, at: float = 0.0, remote: object | None = None) -> Seq:
        seq = Seq(SimRequest(0, at, tokens, max_tokens), max_tokens, self.env.event(), remote=remote)

        def later():
            yield self.env.timeout(at)
            self.engine.submit(seq)

        self.env.process(later())
        return seq

    def run(self, until: float | None = None) -> None:
        self.env.run(until=until if until is not None else self.env.now + 10.0)


def prompt(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def test_one_request_prefills_then_decodes_one_token_per_step():
    h = Harness()
    seq = h.submit(prompt(6), 3)
    h.run()
    assert seq.first_token_s == pytest.approx(0.006)  # 6 prompt tokens
    assert seq.last_token_s == pytest.approx(0.026)  # two decode steps
    assert seq.done.value is True and seq.state == "finished"
    assert h.engine.free == h.engine.num_blocks - 1  # its one full prompt block stays cached
    assert h.engine.steps == 3


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    h = Harness(budget=8)
    seq = h.submit(prompt(20), 2)
    h.run()
    assert seq.first_token_s == pytest.approx(0.020)  # chunks of 8, 8 and 4 tokens
    assert h.engine.steps == 4


def test_a_prompt_joins_the_running_batch_and_the_step_pays_both_parts():
    h = Harness()
    a = h.submit(prompt(4), 10)
    b = h.submit(prompt(5, start=500), 2, at=0.005)  # arrives during a's first decode step (4-14 ms)
    h.run()
    assert a.first_token_s == pytest.approx(0.004)
    # b waits for the step boundary at 14 ms, then shares a step with a's decode: 10 + 5 ms
    assert b.first_token_s == pytest.approx(0.014 + 0.015)
    assert b.last_token_s == pytest.approx(0.029 + 0.010)
    assert a.last_token_s == pytest.approx(0.029 + 7 * 0.010)  # tokens 4 to 10


def test_full_kv_preempts_the_newest_sequence_and_recomputes_it_later():
    # 4 blocks of 4 tokens; two 4-token prompts decoding 8 tokens each run out of blocks at the
    # step that needs the 9th KV slot of each: the newest (b) is preempted, a finishes, then b
    # prefills its prompt and the 5 tokens it had generated again (its prompt block still cached).
    h = Harness(num_blocks=4)
    a = h.submit(prompt(4), 8)
    b = h.submit(prompt(4, start=500), 8)
    h.run()
    assert h.engine.preemptions == 1 and b.preemptions == 1 and a.preemptions == 0
    assert a.first_token_s == pytest.approx(0.008) and b.first_token_s == pytest.approx(0.008)
    assert a.last_token_s == pytest.approx(0.078)  # 7 decode steps after the shared prefill
    # at 78 ms b prefills 9 tokens minus its cached prompt block (5 ms), then 2 decode steps
    assert b.cached_tokens == 4
    assert b.last_token_s == pytest.approx(0.078 + 0.005 + 0.020)
    assert h.engine.free + len(h.engine.evictable) == 4  # every block back


def test_a_cached_prefix_is_not_computed_again_and_kv_events_name_its_blocks():
    h = Harness()
    first = h.submit(prompt(10), 1)
    again = h.submit(prompt(10) + prompt(3, start=900), 1, at=1.0)
    h.run()
    assert first.first_token_s == pytest.approx(0.010)
    assert again.cached_tokens == 8  # two full blocks of 4
    assert again.first_token_s == pytest.approx(1.0 + 0.005)  # 13 - 8 tokens
    stored = [e for e in h.events if isinstance(e, BlockStored)]
    assert stored[0].block_hashes == block_hashes(prompt(10), 4) and stored[0].parent_block_hash is None
    assert stored[1].parent_block_hash == stored[0].block_hashes[-1]  # the third block, after the hit
    index = PrefixIndex(4)
    from disagg.routing.kv_events import KVEventBatch

    apply_batch(index, "e0", KVEventBatch(ts=0.0, events=h.events))
    assert index.match(block_hashes(prompt(10) + prompt(3, start=900), 4)) == {"e0": 3}


def test_allocating_past_the_free_blocks_evicts_the_least_recently_freed_and_says_so():
    h = Harness(num_blocks=3)
    h.submit(prompt(4), 1)  # its block stays cached when it finishes
    h.submit(prompt(8, start=500), 1, at=1.0)  # needs 2 blocks: 2 free, nothing evicted
    h.submit(prompt(8, start=900), 1, at=2.0)  # needs 2: evicts the two least recently freed
    h.run()
    removed = [e for e in h.events if isinstance(e, BlockRemoved)]
    assert len(removed) == 1 and len(removed[0].block_hashes) == 2
    assert removed[0].block_hashes[0] == block_hashes(prompt(4), 4)[0]


def test_a_remote_sequence_waits_for_its_kv_then_computes_only_its_last_token():
    h = Harness()
    seq = h.submit(prompt(9), 2, remote="prefill-0")
    h.run(until=0.5)
    assert h.loads == [(seq, 9)] and seq.state == "loading" and h.engine.steps == 0
    h.env.run(until=1.0)
    h.engine.loaded(seq, ok=True)
    h.run()
    assert seq.first_token_s == pytest.approx(1.001)  # one prompt token
    assert seq.last_token_s == pytest.approx(1.011)


def test_a_failed_load_is_recomputed_on_decode():
    h = Harness()
    seq = h.submit(prompt(9), 1, remote="prefill-0")
    h.run(until=1.0)
    h.engine.loaded(seq, ok=False)
    h.run()
    assert seq.first_token_s == pytest.approx(1.009)


def test_a_prefill_engine_holds_the_blocks_until_released():
    h = Harness(role="prefill")
    seq = h.submit(prompt(9), 1)
    h.run()
    assert seq.state == "held" and h.engine.load().kv_usage == pytest.approx(3 / 64)
    h.engine.release(seq)
    assert h.engine.load().kv_usage == 0.0


def test_an_engine_that_dies_fails_what_it_holds():
    h = Harness()
    seq = h.submit(prompt(40), 100)
    h.run(until=0.1)
    h.engine.kill()
    h.run()
    assert seq.done.value is False and seq.state == "failed"
    late = h.submit(prompt(4), 2, at=1.0)
    h.run()
    assert late.done.value is False


def test_decode_runs_give_exactly_what_one_step_at_a_time_gives(monkeypatch):
    """Decode-only steps run as one timeout; with runs of one step the whole simulation (times,
    preemptions, the loads the scheduler reads and so its picks) is the same."""
    from disagg.sim import trace
    from disagg.sim.simulate import Deployment, simulate

    profile = CostModel.load("a100-opt-13b")
    small = profile.model_copy(update={"limits": profile.limits.model_copy(update={"num_blocks": 60})})
    reqs = list(trace.workload("shared_prefix", requests=300, rate=12, seed=1))

    def run():
        r = simulate(small, Deployment(1, 2, 1), reqs, progress=False)
        return r.requests, r.roles

    runs = run()
    monkeypatch.setattr(Engine, "_run_length", lambda self: 1)
    steps = run()
    assert runs == steps
    assert steps[1]["decode"]["preemptions"] > 0
