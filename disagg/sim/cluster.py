"""The simulated deployment: engines per role, the real `disagg.routing.Scheduler` picking every
request from the signals the workers would send it, KV transfers timed by the cost model, and
injected faults. Everything runs on one simpy clock, which is also the scheduler's clock.

Signals reach the scheduler as they do on the stack: each engine is registered once
(`pool.upsert`), scraped every `scrape_interval_s` (`pool.update_load`), its KV events are
applied as they happen (`kv_events.apply_batch`), and the pool is swept as `Background` sweeps it.

One request, as the stack serves it (`serve`):

    router: tokenized, `scheduler.pick()`; a decode that is gone is skipped for the next in the
            pick's list (Envoy's ordered fallback);
    decode: with a prefill picked, calls the prefill workers in the pick's order, at most
            `prefill_attempts`, skipping one that is dead or dies meanwhile; none left: prefills
            locally. Then generates; the KV load starts when decode admits the request, and a
            load that fails is recomputed on decode;
    leases: the prefill's blocks are freed by the decode's ack after a load, or when the lease
            ends (a failed load, a decode that died);
    faults: an engine that dies fails what it holds; requests on a dead decode end with an
            error (`failed`), never silently (`lost` counts requests with no outcome at the end).
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import simpy

from disagg.bench.progress import say
from disagg.config import AppConfig, RoutingConfig
from disagg.messages import WorkerInfo
from disagg.routing import NoEndpointError, OverloadedError, PickRequest, Scheduler
from disagg.routing.kv_events import KVEventBatch, apply_batch
from disagg.sim.cost import CostModel
from disagg.sim.engine import Engine, Seq
from disagg.sim.trace import SimRequest
from kv_transfer.layout import KVLayout

MODEL = "sim"


@dataclass
class Deployment:
    """Engines per role and how the stack around them is set."""

    prefill: int
    decode: int
    aggregated: int = 0  # engines that prefill and decode, where no prefill role exists
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    prefill_attempts: int = AppConfig.model_fields["prefill_attempts"].default
    stream_window_s: float = AppConfig.model_fields["stream_batching_ms"].default / 1000

    @property
    def engines(self) -> int:
        return self.prefill + self.decode + self.aggregated


@dataclass
class Faults:
    kill_prefill_at_s: float | None = None  # the first prefill engine dies then
    kill_decode_at_s: float | None = None  # the first decode engine dies then
    transfer_failure: float = 0.0  # fraction of KV loads that fail


@dataclass(slots=True)
class Outcome:
    """What the client saw of one request (times in seconds from its arrival)."""

    index: int
    group: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    status: str = "lost"  # completed | failed | rejected | unfinished | lost
    decision: str = ""  # remote | local
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    prefill_attempts: int = 0
    local_fallback: bool = False  # a prefill was picked, decode prefilled after all
    transfer_failed: bool = False
    awaiting: tuple[Engine, Seq] | None = field(default=None, repr=False)  # the engine it waits on


@dataclass
class Counters:
    picks: int = 0
    remote: int = 0
    prefill_retries: int = 0  # prefill attempts after the first
    local_fallbacks: int = 0
    decode_fallbacks: int = 0
    transfers: int = 0
    transfer_failures: int = 0
    leases_expired: int = 0
    rejected: int = 0


@dataclass(eq=False)
class Handoff:
    """A prefill's answer to decode: where the prompt's KV waits, held under a lease."""

    prefill: Engine
    held: Seq
    read: bool = False  # decode started reading it
    failed: bool = False  # the load failed (decode computed the prompt itself)


@dataclass
class Timeline:
    """Per role, sampled every `every_s`: busy fraction, waiting and running sums, mean KV use."""

    every_s: float
    t: list[float] = field(default_factory=list)
    roles: dict[str, dict[str, list[float]]] = field(default_factory=dict)


class Cluster:
    def __init__(self, env: simpy.Environment, cost: CostModel, deployment: Deployment, *,
                 faults: Faults | None = None, seed: int = 0, sample_every_s: float = 1.0) -> None:
        self.env, self.cost, self.deployment = env, cost, deployment
        self.routing = deployment.routing
        self.faults = faults or Faults()
        self.rng = random.Random(f"faults-{seed}")
        self.scheduler = Scheduler(self.routing, model=MODEL, block_size=cost.limits.block_size,
                                   clock=lambda: env.now)
        self.counters = Counters()
        self.outcomes: list[Outcome] = []
        self.sent_all = env.event()  # the last request has arrived
        self._all_done = env.event()  # ... and every request has an outcome
        self._in_flight = 0
        self.last_outcome_s = 0.0
        self.open_leases = 0  # blocks a prefill holds for a load that will not come
        self.engines: dict[str, Engine] = {}
        layout = KVLayout(model=MODEL, dtype=cost.dtype, block_size=cost.limits.block_size, num_layers=1,
                          num_kv_heads=1, head_dim=cost.kv_bytes_per_token, tp_size=1)
        for label, role, n in (("prefill", "prefill", deployment.prefill), ("decode", "decode", deployment.decode),
                               ("aggregated", "decode", deployment.aggregated)):
            for i in range(n):
                engine = Engine(env, f"{label}-{i}", role, cost, on_events=self._on_events,
                                on_load=self._on_load, label=label)
                self.engines[engine.engine_id] = engine
                k = len(self.engines)
                self.scheduler.pool.upsert(WorkerInfo(role=role, model=MODEL, engine_id=engine.engine_id,
                                                      address=f"10.{k >> 8}.{k & 255}.1:8000", node_id=engine.engine_id,
                                                      layout=layout, num_blocks=cost.limits.num_blocks))
                env.process(self._scrape(engine, phase=self.rng.random() * self.routing.scrape_interval_s))
        env.process(self._sweep())
        self.timeline = Timeline(sample_every_s)
        env.process(self._sample())
        for at, label in ((self.faults.kill_prefill_at_s, "prefill"), (self.faults.kill_decode_at_s, "decode")):
            if at is not None:
                env.process(self._kill_at(at, label))

    # -- the workload ---------------------------------------------------------------------------

    def replay(self, requests: Iterable[SimRequest], total: int | None = None, progress: bool = True) -> simpy.Process:
        """A process that sends each request at its arrival time; it ends when all have an outcome.
        With `progress`, a line on stderr every 5 s of wall time."""
        return self.env.process(self._replay(iter(requests), total, progress))

    def _replay(self, requests: Iterator[SimRequest], total: int | None, progress: bool):
        started = shown = time.monotonic()
        for sent, req in enumerate(requests, 1):
            if req.arrival_s > self.env.now:
                yield self.env.timeout(req.arrival_s - self.env.now)
            self._in_flight += 1
            self.env.process(self._serve_one(req))
            if progress and time.monotonic() - shown >= 5.0:
                shown = time.monotonic()
                say("simulate", f"simulated {self.env.now:.1f} s: {sent}{f'/{total}' if total else ''} requests sent, "
                                f"{self._in_flight} in flight, {shown - started:.0f} s wall")
        self.sent_all.succeed()
        if self._in_flight:
            yield self._all_done

    def _serve_one(self, req: SimRequest):
        yield from self.serve(req)
        self.last_outcome_s = self.env.now
        self._in_flight -= 1
        if not self._in_flight and self.sent_all.triggered:
            self._all_done.succeed()

    def serve(self, req: SimRequest):
        """One request, as the stack serves it (the module docstring)."""
        out = Outcome(req.index, req.group, req.arrival_s, len(req.tokens), req.output_tokens)
        self.outcomes.append(out)
        stack = self.cost.stack
        yield self.env.timeout(stack.request_s)
        try:
            pick = self.scheduler.pick(PickRequest(model=MODEL, prompt_token_ids=req.tokens))
        except (NoEndpointError, OverloadedError):
            out.status = "rejected"
            self.counters.rejected += 1
            return
        self.scheduler.flush()  # the event loop's next turn, on the stack
        self.counters.picks += 1
        out.decision = pick.decision
        decode = next((self.engines[e.engine_id] for e in pick.decode if self.engines[e.engine_id].alive), None)
        if decode is None or decode.engine_id != pick.decode[0].engine_id:
            self.counters.decode_fallbacks += 1
        if decode is None:
            out.status = "failed"
            return
        source = None
        if pick.prefill:
            self.counters.remote += 1
            for endpoint in pick.prefill[:self.deployment.prefill_attempts]:
                out.prefill_attempts += 1
                prefill = self.engines[endpoint.engine_id]
                yield self.env.timeout(stack.prefill_call_s)
                seq = Seq(req, 1, self.env.event())
                out.awaiting = (prefill, seq)
                prefill.submit(seq)  # a dead one refuses at once: the connection is refused
                if (yield seq.done):
                    source = Handoff(prefill, seq)
                    break
            self.counters.prefill_retries += max(out.prefill_attempts - 1, 0)
            if source is None:
                out.local_fallback = True
                self.counters.local_fallbacks += 1
        seq = Seq(req, req.output_tokens, self.env.event(), remote=source)
        out.awaiting = (decode, seq)
        decode.submit(seq)
        ok = yield seq.done
        out.awaiting = None
        out.transfer_failed = source is not None and source.failed
        if not ok:
            out.status = "failed"
            if source is not None and not source.read and source.prefill.alive:
                self.env.process(self._lease(source.prefill, source.held))  # nobody will read them
            return
        first = seq.first_token_s + stack.stream_s
        last = last_seen(seq.first_token_s, seq.last_token_s, req.output_tokens, self.deployment.stream_window_s)
        last += stack.stream_s
        out.status = "completed"
        out.ttft_s = first - req.arrival_s
        out.e2e_s = last - req.arrival_s
        out.tpot_s = (last - first) / (req.output_tokens - 1) if req.output_tokens > 1 else None

    def settle(self) -> None:
        """At the end: requests still on a live engine's books are `unfinished` (overload); any
        other request without an outcome is `lost`."""
        for out in self.outcomes:
            if out.status == "lost" and out.awaiting is not None:
                engine, seq = out.awaiting
                if engine.alive and seq.state in ("waiting", "loading", "running", "decoding"):
                    out.status = "unfinished"

    # -- KV transfers ---------------------------------------------------------------------------

    def _on_load(self, decode: Engine, seq: Seq, tokens: int) -> None:
        self.env.process(self._transfer(decode, seq, tokens))

    def _transfer(self, decode: Engine, seq: Seq, tokens: int):
        handoff: Handoff = seq.remote
        handoff.read = True
        prefill, held = handoff.prefill, handoff.held
        self.counters.transfers += 1
        yield self.env.timeout(self.cost.transfer_s(tokens))
        ok = prefill.alive and self.rng.random() >= self.faults.transfer_failure
        if not ok:
            self.counters.transfer_failures += 1
            handoff.failed = True
        if ok and decode.alive:
            prefill.release(held)  # the decode's ack
        elif prefill.alive:
            self.env.process(self._lease(prefill, held))
        decode.loaded(seq, ok)

    def _lease(self, prefill: Engine, held: Seq):
        self.open_leases += 1
        yield self.env.timeout(self.cost.stack.kv_lease_s)
        self.open_leases -= 1
        if held.state == "held" and prefill.alive:
            self.counters.leases_expired += 1
        prefill.release(held)

    # -- signals to the scheduler ---------------------------------------------------------------

    def _on_events(self, engine: Engine, batch: KVEventBatch) -> None:
        if self.routing.kv_events:
            apply_batch(self.scheduler.index, engine.engine_id, batch)
            self.scheduler.pool.touch(engine.engine_id)

    def _scrape(self, engine: Engine, phase: float):
        yield self.env.timeout(phase)
        pool = self.scheduler.pool
        while engine.alive:
            pool.update_load(engine.engine_id, engine.load(), at=self.env.now)
            yield self.env.timeout(self.routing.scrape_interval_s)

    def _sweep(self):
        every = min(0.1, self.routing.dead_after_s / 10)
        for tick in itertools.count(1):
            yield self.env.timeout(every)
            self.scheduler.pool.sweep()
            if tick % 100 == 0:
                self.scheduler.index.expire()

    def _kill_at(self, at: float, label: str):
        yield self.env.timeout(at)
        victim = next((e for e in self.engines.values() if e.label == label and e.alive), None)
        if victim is not None:
            victim.kill()

    def _sample(self):
        tl = self.timeline
        labels = sorted({e.label for e in self.engines.values()})
        for label in labels:
            tl.roles[label] = {"busy": [], "waiting": [], "running": [], "kv_usage": []}
        busy = {e.engine_id: 0.0 for e in self.engines.values()}
        while True:
            yield self.env.timeout(tl.every_s)
            tl.t.append(round(self.env.now, 3))
            for label in labels:
                mine = [e for e in self.engines.values() if e.label == label and e.alive]
                series = tl.roles[label]
                loads = [e.load() for e in mine]
                n = max(len(mine), 1)
                busy_s = sum(e.busy_s - busy[e.engine_id] for e in mine)
                # a step counts when it ends, so one across a sample boundary can push a sample past 1
                series["busy"].append(round(min(busy_s / (n * tl.every_s), 1.0), 3))
                series["waiting"].append(sum(x.waiting for x in loads))
                series["running"].append(sum(x.running for x in loads))
                series["kv_usage"].append(round(sum(x.kv_usage for x in loads) / n, 3))
                for e in mine:
                    busy[e.engine_id] = e.busy_s


def last_seen(first: float, last: float, tokens: int, window: float) -> float:
    """When the last token leaves decode: our stream merges tokens that follow the previous item
    within `window` (`stream_batching_ms`), so with tokens closer than that, items leave every
    window from the first token, and the last one at the first window's end after it."""
    if tokens < 2 or window <= 0 or (last - first) / (tokens - 1) >= window:
        return last
    return first + -(-(last - first) // window) * window
