"""`disagg bench epp`: how fast the endpoint picker is.

1. Pick latency and picks per second at 8, 64 and 256 endpoints (half prefill, half decode), with
   100k blocks in the prefix index; prompts of 1024 tokens, half of them sharing an indexed prefix.
   The sizes take turns in rounds, so each sees the machine alike.
2. What answering one ext_proc stream costs the EPP itself, in-process, back to back and after
   the core idled, beside the constant-answer floor (`benchmarks.ext_proc_replay`; from a checkout).
3. The latency the ext_proc hop adds: the same small request to a stand-in worker that answers at
   once, directly, through Envoy alone and through Envoy + EPP (`disagg epp`, its own process, over
   TLS as by default and plaintext), in alternating rounds, from a lean keep-alive client (the
   standard library's), so the client's own CPU barely competes. From a checkout, also the
   research comparisons in `benchmarks/`: a constant-answer ext_proc server (the floor) and the
   EPP with ext_proc served by grpclib instead of our server (`benchmarks.ext_proc_grpclib`).
4. What keeping the state current costs: a scheduler scraping stand-in workers (their own
   process) every `scrape_interval_s`, as the EPP does; scrapes per second and CPU per scrape.

Wall-clock figures on a shared machine measure the machine as much as the code, so each is paired
with a CPU-time one: CPU seconds the picking thread spent per pick, and CPU seconds Envoy and the
EPP spent per request (from /proc and the process clock), which waiting for a core does not inflate.

Writes JSON (--json) and a PNG plot when matplotlib is installed (--plot); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.request import Request, urlopen

from disagg.bench.progress import say
from disagg.bench.standin import make_info
from disagg.config import RoutingConfig
from disagg.routing import PickRequest, Scheduler
from disagg.routing.prefix_index import block_hashes
from disagg.messages import EngineLoad

BLOCK = 32
# The hop's request (and the in-process answer's): a small completion of token ids.
HOP_MODEL = "bench"
HOP_BODY = json.dumps({"model": HOP_MODEL, "prompt": list(range(200)), "max_tokens": 1}).encode()
# The research harness (floors, other servers), where this runs from a checkout.
REPO = Path(__file__).resolve().parents[2]
HARNESS = (REPO / "benchmarks" / "__init__.py").exists()


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def reference_loop_ms() -> float:
    """CPU time of a fixed pure-Python loop (median of 11): how fast this machine runs Python
    right now. About 2.5-3 ms on an idle recent x86 core; more when cores are shared."""
    times = []
    for _ in range(11):
        c0 = time.thread_time()
        total = 0
        for i in range(100_000):
            total += i
        times.append((time.thread_time() - c0) * 1e3)
    return sorted(times)[5]


class _PickBench:
    """One pool size: a scheduler with `indexed_blocks` in its index, and the requests to pick for."""

    def __init__(self, num_endpoints: int, *, indexed_blocks: int, picks: int, prompt_tokens: int,
                 seed: int = 0) -> None:
        self.rng = rng = random.Random(seed)
        self.num_endpoints, self.prompt_tokens = num_endpoints, prompt_tokens
        # Signals never age here: the benchmark times picks, not freshness.
        self.scheduler = scheduler = Scheduler(RoutingConfig(stale_after_s=1e6, dead_after_s=1e7), model="bench",
                                               block_size=BLOCK)
        self.endpoints = [scheduler.pool.upsert(make_info("decode" if i % 2 == 0 else "prefill",
                                                          f"10.{i // 250}.{i % 250}.1:8000", model="bench"))
                          for i in range(num_endpoints)]
        self.scrape()
        prefixes: list[list[int]] = []
        self.indexed = 0
        while self.indexed < indexed_blocks:
            tokens = [rng.randrange(32_000) for _ in range(16 * BLOCK)]
            scheduler.index.record(rng.choice(self.endpoints).engine_id, block_hashes(tokens, BLOCK))
            prefixes.append(tokens)
            self.indexed += 16
        self.requests = []
        for i in range(picks):
            head = rng.choice(prefixes)[: prompt_tokens // 2] if i % 2 else []
            tail = [rng.randrange(32_000) for _ in range(prompt_tokens - len(head))]
            self.requests.append(PickRequest(model="bench", prompt_token_ids=head + tail))
        self.latencies: list[float] = []
        self.cpu: list[float] = []
        self.flush_cpu: list[float] = []
        self.round_p50s: list[float] = []
        self.wall = 0.0
        self.decisions = {"remote": 0, "local": 0}

    def scrape(self) -> None:
        for e in self.endpoints:
            self.scheduler.pool.update_load(e.engine_id, EngineLoad(
                waiting=self.rng.randint(0, 2), running=self.rng.randint(0, 8), kv_usage=self.rng.random()))

    def run(self, count: int) -> None:
        """The next `count` picks (a scrape round every 50 picks)."""
        done = len(self.latencies)
        latencies = []
        started = time.perf_counter()
        for i, req in enumerate(self.requests[done:done + count], start=done):
            c0 = time.thread_time()
            t0 = time.perf_counter()
            pick = self.scheduler.pick(req)
            latencies.append(time.perf_counter() - t0)
            # What the EPP does once the answer is out (on the event loop's next turn): index the
            # prompt's blocks, count the pick in the metrics. Not part of the request's wait; part
            # of the CPU a pick costs.
            c1 = time.thread_time()
            self.scheduler.flush()
            c2 = time.thread_time()
            self.cpu.append(c1 - c0)
            self.flush_cpu.append(c2 - c1)
            self.decisions[pick.decision] += 1
            if i % 50 == 49:
                self.scrape()
        self.wall += time.perf_counter() - started
        self.latencies += latencies
        self.round_p50s.append(_percentile(sorted(latencies), 0.5))

    def summary(self) -> dict[str, Any]:
        latencies, cpu = sorted(self.latencies), sorted(self.cpu)
        return {
            "endpoints": self.num_endpoints,
            "indexed_blocks": self.indexed,  # before the picks (each pick records its prompt's blocks too)
            "index_entries_after": self.scheduler.index.num_blocks(),
            "picks": len(latencies),
            "prompt_tokens": self.prompt_tokens,
            "p50_us": _percentile(latencies, 0.5) * 1e6,
            "p90_us": _percentile(latencies, 0.9) * 1e6,
            "p99_us": _percentile(latencies, 0.99) * 1e6,
            "mean_us": statistics.fmean(latencies) * 1e6,
            # p50 of each round: the spread is the machine's; the best is the code with least interference.
            "round_p50_us": [v * 1e6 for v in self.round_p50s],
            "best_round_p50_us": min(self.round_p50s) * 1e6,
            "cpu_p50_us": _percentile(cpu, 0.5) * 1e6,
            "cpu_p99_us": _percentile(cpu, 0.99) * 1e6,
            "cpu_mean_us": statistics.fmean(cpu) * 1e6,
            # Bookkeeping after the answer (Scheduler.flush: indexing, metrics), CPU per pick.
            "record_after_answer_cpu_p50_us": _percentile(sorted(self.flush_cpu), 0.5) * 1e6,
            "picks_per_s": len(latencies) / self.wall,  # wall time includes the flushes
            "picks_per_cpu_s": len(cpu) / (sum(cpu) + sum(self.flush_cpu)) if sum(cpu) else None,
            "decisions": dict(self.decisions),
        }


def bench_picks(sizes: list[tuple[int, int]], *, picks: int, prompt_tokens: int,
                rounds: int = 10) -> list[dict[str, Any]]:
    """Pick latency at each pool size (endpoints, indexed blocks), the sizes taking turns round by
    round (order reversed every other round), so a change in the machine's speed hits every size
    alike."""
    benches = []
    for n, indexed_blocks in sizes:
        say("epp", f"pool of {n} endpoints: indexing {indexed_blocks} blocks, preparing {picks} prompts")
        benches.append(_PickBench(n, indexed_blocks=indexed_blocks, picks=picks, prompt_tokens=prompt_tokens))
    per_round = max(1, picks // rounds)
    for r in range(rounds):
        for bench in (benches if r % 2 == 0 else benches[::-1]):
            bench.run(per_round if r < rounds - 1 else picks - per_round * (rounds - 1))
    return [b.summary() for b in benches]


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Stand-in workers (argv: how many, and "push" to publish their loads), in their own process:
# they answer every request at once, and /metrics; the first is a decode worker. Prints
# "READY addr,addr,...".
_STAND_INS = (
    "import sys, time\n"
    "from disagg.bench.standin import StandInFleet\n"
    "n, push = int(sys.argv[1]), sys.argv[2:] == ['push']\n"
    "fleet = StandInFleet(['prefill' if i % 2 else 'decode' for i in range(n)], publish=push, model='bench').start()\n"
    "print('READY', ','.join(w.address for w in fleet.workers), flush=True)\n"
    "time.sleep(1e9)\n"
)


def _ready_line(item: Any, timeout_s: float = 60.0) -> str:
    """The READY line a launched process printed (its addresses), waiting for it."""
    from disagg.bench.stacks import ready_line, said_ready, wait_ready

    wait_ready(lambda: said_ready(item.log_tail(50_000)), [item], timeout_s, item.label)
    return ready_line(item.log_tail(50_000)) or ""


class _KeepAliveClient:
    """POSTs the same completion to one URL over one keep-alive HTTP/1.1 connection (the standard
    library's client, blocking). The client's own CPU per request shares the two cores with
    Envoy, the EPP and the worker: httpx spent about a millisecond per request here, which
    inflated every path and the hop most (it has the most processes to wake)."""

    def __init__(self, url: str, body: bytes) -> None:
        self.host, _, port = url.split("//", 1)[1].rpartition(":")
        self.port = int(port)
        self.body = body
        self.connection: http.client.HTTPConnection | None = None

    def post(self) -> int:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            self.connection.request("POST", "/v1/completions", self.body, {"content-type": "application/json"})
            response = self.connection.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def _time_rounds(clients: dict[str, _KeepAliveClient], requests: int, rounds: int,
                 latencies: dict[str, list[float]], watched: dict[str, int], cpu: dict[str, float],
                 epp_pids: dict[str, int], epp_cpu: dict[str, float]) -> None:
    """Warm every path up (connections, the EPP learning the worker), then time `requests` per
    path in `rounds` rounds, the paths' order reversed every other round."""
    for name, client in clients.items():
        ok, deadline = 0, time.monotonic() + 30
        while ok < 20:
            try:
                status = client.post()
            except (OSError, http.client.HTTPException):
                status = 0
            ok = ok + 1 if status == 200 else 0
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no run of 20 good answers in 30 s (last status {status})")
            if not ok:
                time.sleep(0.1)
    per_round = max(1, requests // rounds)
    for i in range(rounds):
        order = list(clients) if i % 2 == 0 else list(reversed(clients))
        for name in order:
            cpu0 = _cpu_seconds(watched[name]) if name in watched else 0.0
            epp0 = _cpu_seconds(epp_pids[name]) if name in epp_pids else 0.0
            client = clients[name]
            for _ in range(per_round):
                t0 = time.perf_counter()
                status = client.post()
                latencies[name].append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"{name}: status {status}")
            if name in watched:
                cpu[name] += _cpu_seconds(watched[name]) - cpu0
            if name in epp_pids:
                epp_cpu[name] += _cpu_seconds(epp_pids[name]) - epp0


def hop_paths(worker: str) -> dict[str, tuple[str, list[str]]]:
    """The gateway processes the hop goes through, by result key: a label and the command, which
    runs an Envoy in front of `worker` and prints its URL (`gateway=...`)."""
    epp = [sys.executable, "-m", "disagg.cli", "epp", "--model", HOP_MODEL, "--set", f"block_size={BLOCK}",
           "--endpoints", worker, "--host", "127.0.0.1", "--grpc-port", "0", "--health-port", "0",
           "--metrics-port", "0", "--gateway-port", "0", "--gateway-host", "127.0.0.1", "--log-level", "WARNING"]
    paths = {"envoy_epp": ("epp", epp), "envoy_epp_plaintext": ("epp-plaintext", [*epp, "--secure-serving=false"])}
    if HARNESS:
        paths["envoy_floor"] = ("ext-proc-floor", [sys.executable, "-m", "benchmarks.ext_proc_floor", worker])
        paths["envoy_epp_grpclib"] = ("epp-grpclib", [sys.executable, "-m", "benchmarks.ext_proc_grpclib", worker,
                                                      "--model", HOP_MODEL, "--block-size", str(BLOCK)])
    return paths


async def bench_hop(requests: int, rounds: int = 20) -> dict[str, Any]:
    """The same small request sent directly to a stand-in worker, through Envoy alone, and through
    each of `hop_paths` (Envoy + an ext_proc server), in alternating rounds, so a change in the
    machine's load hits all alike. Each EPP runs as in production: its own process, apart from
    the client and the worker."""
    import psutil

    from disagg.bench.processes import launch, terminate
    from disagg.epp.envoy import EnvoyProcess, EnvoySettings, write_endpoints

    log_dir = Path(tempfile.mkdtemp(prefix="disagg-bench-hop-"))
    launched = [launch("stand-in", [sys.executable, "-c", _STAND_INS, "1"], log_dir=log_dir)]
    alone: EnvoyProcess | None = None
    try:
        worker = _ready_line(launched[0]).split()[1]
        write_endpoints(log_dir, [worker])
        alone = EnvoyProcess(EnvoySettings("127.0.0.1", 0, "127.0.0.1", 1, log_dir, ext_proc=False))
        await alone.start()
        targets = {"direct": f"http://{worker}", "envoy": alone.url}
        watched = {"envoy": alone.process.pid}
        epp_pids: dict[str, int] = {}
        for name, (label, cmd) in hop_paths(worker).items():
            process = launch(label, cmd, log_dir=log_dir, cwd=REPO)
            launched.append(process)
            targets[name] = next(f for f in _ready_line(process).split() if f.startswith("gateway=")).split("=", 1)[1]
            watched[name] = next(c.pid for c in psutil.Process(process.pid).children(recursive=True)
                                 if "envoy" in c.name())
            epp_pids[name] = process.pid
        latencies: dict[str, list[float]] = {name: [] for name in targets}
        cpu = {name: 0.0 for name in watched}
        epp_cpu = {name: 0.0 for name in epp_pids}
        clients = {name: _KeepAliveClient(url, HOP_BODY) for name, url in targets.items()}
        try:
            await asyncio.to_thread(_time_rounds, clients, requests, rounds, latencies, watched, cpu, epp_pids, epp_cpu)
        finally:
            for client in clients.values():
                client.close()
    finally:
        if alone is not None:
            await alone.stop()
        terminate(launched, None, grace_s=10)

    def summary(name: str) -> dict[str, float]:
        values = sorted(latencies[name])
        out = {"p50_ms": _percentile(values, 0.5) * 1e3, "p90_ms": _percentile(values, 0.9) * 1e3,
               "p99_ms": _percentile(values, 0.99) * 1e3}
        if name in cpu:
            out["envoy_cpu_ms_per_request"] = cpu[name] / len(values) * 1e3
        return out

    n = len(latencies["envoy"])
    result: dict[str, Any] = {"requests": n, "rounds": rounds, **{name: summary(name) for name in targets}}
    for name in epp_pids:
        suffix = _key_suffix(name)
        result[f"epp_hop_added_p50_ms{suffix}"] = result[name]["p50_ms"] - result["envoy"]["p50_ms"]
        result[f"epp_hop_added_p99_ms{suffix}"] = result[name]["p99_ms"] - result["envoy"]["p99_ms"]
        result[f"epp_cpu_ms_per_request{suffix}"] = epp_cpu[name] / n * 1e3
        result[f"envoy_ext_proc_cpu_ms_per_request{suffix}"] = (
            result[name]["envoy_cpu_ms_per_request"] - result["envoy"]["envoy_cpu_ms_per_request"])
    if "envoy_epp_grpclib" in result:
        # The server comparison: the same EPP, plaintext both, grpclib's server against ours.
        result["grpclib_minus_ours_added_p50_ms"] = (result["epp_hop_added_p50_ms_grpclib"]
                                                     - result["epp_hop_added_p50_ms_plaintext"])
    return result


def _large_bodies(clients: int, per_client: int, size: int, seed: int = 0) -> list[list[bytes]]:
    """Completions of about `size` bytes of text, per client: a document of the client's own (nine
    tenths of the prompt, the same in each of its requests, as a conversation or a retrieved context
    is), then a question that changes."""
    rng = random.Random(seed)
    words = [w * rng.randint(1, 3) for w in ("alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta")]
    out = []
    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n // 5))[:n]

    for _ in range(clients):
        document = text(size * 9 // 10)
        out.append([json.dumps({"model": HOP_MODEL, "max_tokens": 1,
                                "prompt": document + text(size // 10 - 50)}).encode() for _ in range(per_client)])
    return out


def _time_concurrent(url: str, bodies: list[list[bytes]], start: int, count: int) -> tuple[list[float], int]:
    """Seconds per answered request, and how many failed (not 200, or the connection broke):
    `len(bodies)` clients at once, each over its own keep-alive connection, sending `count` of its
    bodies (from `start`, wrapping), one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    def client(own: list[bytes]) -> tuple[list[float], int]:
        connection = _KeepAliveClient(url, b"")
        times, failed = [], 0
        try:
            for i in range(start, start + count):
                connection.body = own[i % len(own)]
                t0 = time.perf_counter()
                try:
                    status = connection.post()
                except (OSError, http.client.HTTPException):
                    status = 0
                if status == 200:
                    times.append(time.perf_counter() - t0)
                else:
                    failed += 1
        finally:
            connection.close()
        return times, failed

    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(client, bodies))
    return [t for times, _ in results for t in times], sum(failed for _, failed in results)


# The ext_proc paths of the large-body run, by result key: the gateway's body mode of each. The floor
# (a constant answer that reads no body, from a checkout) is what receiving the body costs by itself.
LARGE_BODY_MODES = {"envoy_epp": "BUFFERED", "envoy_epp_full_duplex": "FULL_DUPLEX_STREAMED",
                    **({"envoy_floor": "BUFFERED"} if HARNESS else {})}


def _large_body_label(name: str, mode: str) -> str:
    server = "the floor (a constant answer)" if name == "envoy_floor" else "EPP"
    return f"Envoy + {server}, {mode}"


async def bench_large_body(requests: int, *, concurrency: int = 20, body_bytes: int = 220_000,
                           rounds: int = 6) -> dict[str, Any]:
    """Large prompts through the gateway: `concurrency` clients at once, each sending completions
    of `body_bytes` (its own long document, a changing question), through Envoy alone and through
    Envoy + EPP (`disagg epp`, its own process, TLS as by default) in each body mode
    (`LARGE_BODY_MODES`: BUFFERED sends the body to the EPP once, FULL_DUPLEX_STREAMED there and
    back), and through Envoy + the floor (a constant answer, plaintext, on our HTTP/2 server: what
    receiving the body costs any Python server here), to a stand-in worker, in alternating rounds.
    `requests` per path."""
    import psutil

    from disagg.bench.processes import launch, terminate
    from disagg.epp.envoy import EnvoyProcess, EnvoySettings, write_endpoints

    log_dir = Path(tempfile.mkdtemp(prefix="disagg-bench-large-body-"))
    launched = [launch("stand-in", [sys.executable, "-c", _STAND_INS, "1"], log_dir=log_dir)]
    alone: EnvoyProcess | None = None
    per_round = max(1, requests // (rounds * concurrency))
    bodies = _large_bodies(concurrency, per_round * rounds, body_bytes)
    try:
        worker = _ready_line(launched[0]).split()[1]
        write_endpoints(log_dir, [worker])
        alone = EnvoyProcess(EnvoySettings("127.0.0.1", 0, "127.0.0.1", 1, log_dir, ext_proc=False))
        await alone.start()
        targets, pids = {"envoy": alone.url}, {"envoy": (alone.process.pid, None)}
        paths = hop_paths(worker)
        for name, mode in LARGE_BODY_MODES.items():
            label, cmd = paths[name if name in paths else "envoy_epp"]
            if name != "envoy_floor":  # the floor's Envoy is the gateway's default (BUFFERED)
                cmd = [*cmd, "--gateway-body-mode", mode]
            epp = launch(f"{label}-{mode.lower()}", cmd, log_dir=log_dir, cwd=REPO)
            launched.append(epp)
            targets[name] = next(f for f in _ready_line(epp).split() if f.startswith("gateway=")).split("=", 1)[1]
            pids[name] = (next(c.pid for c in psutil.Process(epp.pid).children(recursive=True) if "envoy" in c.name()),
                          epp.pid)
        latencies: dict[str, list[float]] = {name: [] for name in targets}
        failed = {name: 0 for name in targets}
        envoy_cpu = {name: 0.0 for name in targets}
        epp_cpu = {name: 0.0 for name in targets}
        for name, url in targets.items():  # warm-up: connections, the EPP learning the worker
            deadline = time.monotonic() + 30
            while (await asyncio.to_thread(_time_concurrent, url, [b[:1] for b in bodies[:2]], 0, 5))[1]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: requests still fail after 30 s")
                await asyncio.sleep(0.2)
        for r in range(rounds):
            for name in (targets if r % 2 == 0 else list(reversed(targets))):
                envoy_pid, epp_pid = pids[name]
                envoy0, epp0 = _cpu_seconds(envoy_pid), _cpu_seconds(epp_pid) if epp_pid else 0.0
                times, lost = await asyncio.to_thread(_time_concurrent, targets[name], bodies, r * per_round, per_round)
                latencies[name] += times
                failed[name] += lost
                envoy_cpu[name] += _cpu_seconds(envoy_pid) - envoy0
                if epp_pid:
                    epp_cpu[name] += _cpu_seconds(epp_pid) - epp0
    finally:
        if alone is not None:
            await alone.stop()
        terminate(launched, None, grace_s=10)
    n = per_round * rounds * concurrency
    result: dict[str, Any] = {"concurrency": concurrency, "body_bytes": len(bodies[0][0]), "requests": n,
                              "rounds": rounds, "failed": sum(failed[name] for name in LARGE_BODY_MODES),
                              "body_modes": LARGE_BODY_MODES}
    for name, values in latencies.items():
        values.sort()
        result[name] = {"p50_ms": _percentile(values, 0.5) * 1e3, "p99_ms": _percentile(values, 0.99) * 1e3,
                        "failed": failed[name], "envoy_cpu_ms_per_request": envoy_cpu[name] / len(values) * 1e3}
    for name in LARGE_BODY_MODES:
        suffix = _key_suffix(name)
        result[f"epp_hop_added_p50_ms{suffix}"] = result[name]["p50_ms"] - result["envoy"]["p50_ms"]
        result[f"epp_hop_added_p99_ms{suffix}"] = result[name]["p99_ms"] - result["envoy"]["p99_ms"]
        result[f"epp_cpu_ms_per_request{suffix}"] = epp_cpu[name] / n * 1e3
        result[f"envoy_ext_proc_cpu_ms_per_request{suffix}"] = (result[name]["envoy_cpu_ms_per_request"]
                                                               - result["envoy"]["envoy_cpu_ms_per_request"])
    return result


async def bench_scrapes(workers: int, seconds: float = 5.0) -> dict[str, Any]:
    """A scheduler following `workers` stand-ins (static discovery, scrapes every 0.2 s): how many
    scrapes it makes a second and the CPU this process spends on them (the EPP's background load,
    which shares the event loop with the picks)."""
    from prometheus_client import REGISTRY

    from disagg.bench.processes import launch, terminate
    from disagg.routing import StaticDiscovery

    log_dir = Path(tempfile.mkdtemp(prefix="disagg-bench-scrape-"))
    launched = [launch("stand-ins", [sys.executable, "-c", _STAND_INS, str(workers)], log_dir=log_dir)]
    task: asyncio.Task | None = None
    try:
        addresses = _ready_line(launched[0]).split()[1].split(",")
        config = RoutingConfig()
        scheduler = Scheduler(config, model="bench", block_size=BLOCK)

        def scrapes() -> float:
            return REGISTRY.get_sample_value("disagg_scrapes_total", {"result": "ok"}) or 0.0

        task = asyncio.create_task(scheduler.run(StaticDiscovery(addresses, interval_s=1.0)))
        deadline = time.monotonic() + 30
        while len(scheduler.pool) < workers and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # every scrape loop under way
        n0, c0, t0 = scrapes(), time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        n, cpu, wall = scrapes() - n0, time.process_time() - c0, time.monotonic() - t0
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        terminate(launched, None, grace_s=5)
    return {"workers": workers, "scrape_interval_s": config.scrape_interval_s, "scrapes_per_s": n / wall,
            # Includes discovery's descriptor polls (one per worker a second).
            "cpu_ms_per_s": cpu / wall * 1e3, "cpu_ms_per_scrape": cpu / n * 1e3 if n else None}


async def bench_idle(workers: int, seconds: float = 10.0) -> dict[str, Any]:
    """CPU of one EPP process (`disagg epp`, its own process) keeping the state of `workers`
    stand-in workers current with no requests: the workers (one process) push their loads, a
    heartbeat a second each, and are described by discovery."""
    from disagg.bench.processes import launch, terminate

    log_dir = Path(tempfile.mkdtemp(prefix="disagg-bench-idle-"))
    launched = [launch("stand-ins", [sys.executable, "-c", _STAND_INS, str(workers), "push"], log_dir=log_dir)]
    try:
        addresses = _ready_line(launched[0], timeout_s=300).split()[1]
        epp = launch("epp", [sys.executable, "-m", "disagg.cli", "epp", "--model", HOP_MODEL, "--set",
                             f"block_size={BLOCK}", "--endpoints", addresses, "--host", "127.0.0.1",
                             "--grpc-port", "0", "--health-port", "0", "--metrics-port", "0",
                             "--log-level", "WARNING"], log_dir=log_dir)
        launched.append(epp)
        metrics_port = next(f for f in _ready_line(epp).split() if f.startswith("metrics=")).split("=", 1)[1]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # every worker in the pool, its reports flowing
            pool = json.loads(urlopen(f"http://127.0.0.1:{metrics_port}/v1/pool", timeout=10).read())
            if len(pool) >= workers:
                break
            await asyncio.sleep(1)
        await asyncio.sleep(3)  # the first descriptions and connections are done
        c0, t0 = _cpu_seconds(epp.pid), time.monotonic()
        await asyncio.sleep(seconds)
        cpu, wall = _cpu_seconds(epp.pid) - c0, time.monotonic() - t0
        pool = json.loads(urlopen(f"http://127.0.0.1:{metrics_port}/v1/pool", timeout=10).read())
    finally:
        terminate(launched, None, grace_s=10)
    return {"endpoints": workers, "live": len(pool), "seconds": wall, "cpu_percent": 100 * cpu / wall,
            "oldest_signal_age_s": max((w["signal_age_s"] for w in pool), default=None)}


def _conversation(i: int, conversations: int = 32) -> list[int]:
    """Request i of `conversations` taking turns: the conversation's 512-token prefix, then its own
    tokens (prefix scoring decides where it goes)."""
    k = i % conversations
    return list(range(100_000 * k, 100_000 * k + 512)) + [i % 30_000] * 32


async def _open_loop(url: str, rate: float, seconds: float, start: int = 0) -> tuple[list[float], int, int]:
    """Requests at `rate` a second for `seconds`, each sent at its time whatever the earlier ones do
    (open loop), over keep-alive connections: the latencies of the answered ones (seconds), how
    many failed, and how many were sent late (the client behind its schedule by over 5 ms)."""
    import aiohttp

    latencies: list[float] = []
    failed = late = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256),
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def one(i: int) -> None:
            nonlocal failed
            body = json.dumps({"model": HOP_MODEL, "prompt": _conversation(i), "max_tokens": 1})
            t0 = time.perf_counter()
            try:
                async with session.post(url + "/v1/completions", data=body,
                                        headers={"content-type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        failed += 1
                        return
            except (aiohttp.ClientError, TimeoutError):
                failed += 1
                return
            latencies.append(time.perf_counter() - t0)

        tasks = []
        begin = time.perf_counter()
        for n in range(int(rate * seconds)):
            delay = begin + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.005:
                late += 1
            tasks.append(asyncio.create_task(one(start + n)))
        await asyncio.gather(*tasks)
    return latencies, failed, late


async def bench_qps(rate: float, seconds: float, segments: int = 4) -> dict[str, Any]:
    """Open-loop arrivals at `rate` through Envoy + EPP (its own process, TLS, prefix scoring on:
    32 conversations sharing prefixes) to stand-in workers (8 decodes, 2 prefills, pushing
    their loads), against the same through Envoy alone, in alternating segments."""
    import psutil  # noqa: F401  (the launcher's dependency)

    from disagg.bench.processes import launch, terminate
    from disagg.epp.envoy import EnvoyProcess, EnvoySettings, write_endpoints

    log_dir = Path(tempfile.mkdtemp(prefix="disagg-bench-qps-"))
    roles = ["decode"] * 8 + ["prefill"] * 2
    code = _STAND_INS.replace("['prefill' if i % 2 else 'decode' for i in range(n)]", repr(roles))
    launched = [launch("stand-ins", [sys.executable, "-c", code, str(len(roles)), "push"], log_dir=log_dir)]
    alone: EnvoyProcess | None = None
    try:
        workers = _ready_line(launched[0]).split()[1].split(",")
        write_endpoints(log_dir, workers[:8])
        alone = EnvoyProcess(EnvoySettings("127.0.0.1", 0, "127.0.0.1", 1, log_dir, ext_proc=False))
        await alone.start()
        epp = launch("epp", [sys.executable, "-m", "disagg.cli", "epp", "--model", HOP_MODEL, "--set",
                             f"block_size={BLOCK}", "--endpoints", ",".join(workers), "--host", "127.0.0.1",
                             "--grpc-port", "0", "--health-port", "0", "--metrics-port", "0", "--gateway-port", "0",
                             "--gateway-host", "127.0.0.1", "--log-level", "WARNING"], log_dir=log_dir)
        launched.append(epp)
        gateway = next(f for f in _ready_line(epp).split() if f.startswith("gateway=")).split("=", 1)[1]
        await _open_loop(gateway, rate, 2.0)  # warm up: connections, the prefixes indexed
        await _open_loop(alone.url, rate, 2.0)
        paths = {"envoy": alone.url, "envoy_epp": gateway}
        results = {name: ([], 0, 0) for name in paths}
        for segment in range(segments):
            for name in (paths if segment % 2 == 0 else list(paths)[::-1]):
                lat, failed, late = await _open_loop(paths[name], rate, seconds / segments, start=segment * 100_000)
                old = results[name]
                results[name] = (old[0] + lat, old[1] + failed, old[2] + late)
    finally:
        if alone is not None:
            await alone.stop()
        terminate(launched, None, grace_s=10)
    out: dict[str, Any] = {"rate": rate, "seconds": seconds}
    for name, (lat, failed, late) in results.items():
        lat.sort()
        out[name] = {"answered": len(lat), "failed": failed, "sent_late": late,
                     "p50_ms": _percentile(lat, 0.5) * 1e3, "p99_ms": _percentile(lat, 0.99) * 1e3}
    out["epp_hop_added_p50_ms"] = out["envoy_epp"]["p50_ms"] - out["envoy"]["p50_ms"]
    out["epp_hop_added_p99_ms"] = out["envoy_epp"]["p99_ms"] - out["envoy"]["p99_ms"]
    out["failed"] = out["envoy_epp"]["failed"]
    return out


async def bench_replicas(requests: int = 400, count: int = 2) -> dict[str, Any]:
    """`count` EPP replicas (their own processes, `disagg.epp.replicas`) behind one Envoy, in
    front of the same stand-in pool (8 decodes pushing their loads); Envoy alternates the
    requests between the replicas; 32 conversations share prefixes. How often a replica would
    have picked as its peer did (its sampled agreement), and how often a conversation's requests
    land on the decode most of them went to."""
    from disagg.bench.processes import launch, terminate
    from disagg.config import AppConfig
    from disagg.epp.replicas import EppReplicas, ReplicaPorts

    log_dir = Path(tempfile.mkdtemp(prefix="disagg-bench-replicas-"))
    launched = [launch("stand-ins", [sys.executable, "-c", _STAND_INS.replace(
        "['prefill' if i % 2 else 'decode' for i in range(n)]", "['decode'] * n"), "8", "push"], log_dir=log_dir)]
    replicas = None
    try:
        workers = _ready_line(launched[0]).split()[1]
        config = AppConfig(model=HOP_MODEL, block_size=BLOCK)
        replicas = EppReplicas(config, ["--endpoints", workers], count, gateway_port=0, gateway_host="127.0.0.1",
                               base=ReplicaPorts(29002, 29003, 29090, 29004))
        await replicas.start()
        await asyncio.sleep(1.5)  # every replica has described every worker
        served: dict[int, list[str]] = {}

        def post(i: int) -> str:
            body = json.dumps({"model": HOP_MODEL, "prompt": _conversation(i), "max_tokens": 1}).encode()
            request = Request(replicas.url + "/v1/completions", body, {"content-type": "application/json"})
            return json.loads(urlopen(request, timeout=10).read())["served_by"]

        for i in range(requests):
            served.setdefault(i % 32, []).append(await asyncio.to_thread(post, i))
        agreed = disagreed = 0.0
        for i in range(count):
            text = urlopen(f"http://127.0.0.1:{replicas.ports(i).metrics}/metrics", timeout=5).read().decode()
            for line in text.splitlines():
                if line.startswith('disagg_epp_pick_agreement_samples_total{agreed="true"}'):
                    agreed += float(line.split()[-1])
                elif line.startswith('disagg_epp_pick_agreement_samples_total{agreed="false"}'):
                    disagreed += float(line.split()[-1])
    finally:
        if replicas is not None:
            await replicas.stop()
        terminate(launched, None, grace_s=10)
    on_majority = sum(max(v.count(d) for d in set(v)) for v in served.values())
    return {"count": count, "requests": requests, "sampled_picks": agreed + disagreed,
            "pick_agreement": agreed / (agreed + disagreed) if agreed + disagreed else None,
            "prefix_affinity": on_majority / requests}


def _key_suffix(path: str) -> str | None:
    """The suffix of a hop path's result keys (`epp_hop_added_p50_ms...`): none for the default
    EPP, "_plaintext", "_grpclib", "_floor" for the others; None for the paths without an
    ext_proc server."""
    if path == "envoy_floor":
        return "_floor"
    return path.removeprefix("envoy_epp") if path.startswith("envoy_epp") else None


HOP_LABELS = {
    "direct": ("direct", "direct to the worker"),
    "envoy": ("Envoy", "Envoy"),
    "envoy_floor": ("Envoy+\nconstant\next_proc", "Envoy + a constant-answer ext_proc server on our h2 server (the floor)"),
    "envoy_epp": ("Envoy+EPP\n(TLS)", "Envoy + EPP over TLS (the default)"),
    "envoy_epp_plaintext": ("Envoy+EPP\n(plaintext)", "Envoy + EPP, plaintext (`--secure-serving=false`)"),
    "envoy_epp_grpclib": ("Envoy+EPP\n(grpclib)", "Envoy + EPP with ext_proc on grpclib, plaintext"),
}


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    picks = result["pick"]
    xs = [p["endpoints"] for p in picks]
    left.plot(xs, [p["p50_us"] for p in picks], "o-", label="wall p50")
    left.plot(xs, [p["best_round_p50_us"] for p in picks], "v:", label="wall p50, best round")
    left.plot(xs, [p["p99_us"] for p in picks], "s--", label="wall p99")
    left.plot(xs, [p["cpu_p50_us"] for p in picks], "^-", label="CPU p50")
    left.axhline(100, color="grey", lw=0.8, ls=":", label="p50 target at 64 (100 µs)")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("endpoints")
    left.set_ylabel("pick latency (µs)")
    left.set_title(f"pick() with {picks[0]['indexed_blocks'] // 1000}k indexed blocks")
    left.legend()
    hop = result.get("hop")
    if hop:
        labels = {name: short for name, (short, _) in HOP_LABELS.items()}
        names = [n for n in labels if n in hop]
        right.bar([labels[n] for n in names], [hop[n]["p50_ms"] for n in names], label="p50")
        right.scatter([labels[n] for n in names], [hop[n]["p99_ms"] for n in names], color="black",
                      marker="_", s=400, label="p99")
        right.set_ylabel("request latency (ms)")
        title = f"EPP hop adds {hop['epp_hop_added_p50_ms']:.2f} ms at p50"
        if "epp_hop_added_p50_ms_floor" in hop:
            title += f"\n(a constant-answer server: {hop['epp_hop_added_p50_ms_floor']:.2f}"
            for name, label in (("_plaintext", "plaintext"), ("_grpclib", "grpclib")):
                if "epp_hop_added_p50_ms" + name in hop:
                    title += f"; on {label}: {hop['epp_hop_added_p50_ms' + name]:.2f}"
            title += ")"
        right.set_title(title)
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def markdown(result: dict[str, Any], command: str) -> str:
    """The report as a short Markdown table (written beside the JSON)."""
    m = result["machine"]
    lines = [
        "# `disagg bench epp`", "",
        f"- command: `{command}`",
        f"- machine: {m['cpus']} cores, load average {m['load_avg'][0]:.2f} at start; reference loop "
        f"{m['reference_loop_ms']:.1f} ms at start, {m['reference_loop_ms_after']:.1f} ms at the end "
        "(about 2.7 ms on an idle core: higher means a busier machine)", "",
        "Picks: the pool sizes take turns in rounds; a round's p50 moves with the machine, the best "
        "round is the code with the least interference.", "",
        "| endpoints | pick p50 (µs) | best round p50 (µs) | p99 (µs) | CPU p50 (µs) | bookkeeping after the answer (indexing, metrics), "
        "CPU p50 (µs) | picks/s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {p['endpoints']} | {p['p50_us']:.0f} | {p['best_round_p50_us']:.0f} | {p['p99_us']:.0f} | "
              f"{p['cpu_p50_us']:.0f} | {p['record_after_answer_cpu_p50_us']:.0f} | {p['picks_per_s']:.0f} |"
              for p in result["pick"]]
    answer = result.get("answer")
    if answer:
        lines += ["", "One ext_proc stream answered in-process (Envoy-like bytes into our HTTP/2 server; no Envoy, no "
                  "sockets, no event loop), back to back and after the core idled "
                  f"{answer['idle_ms']:.0f} ms (as between requests in a live gateway):", "",
                  "| server | p50 (µs) | after idle, p50 (µs) |", "|---|---|---|"]
        for name, label in (("epp", "EPP (parse, pick, answer)"), ("floor", "constant-answer floor")):
            timed = answer[name]
            lines.append(f"| {label} | {timed['p50_us']:.0f} | {timed['after_idle_p50_us']:.0f} |")
    hop = result.get("hop")
    if hop:
        lines += ["", f"The hop, {hop['requests']} requests per path in {hop['rounds']} alternating rounds, one "
                  "at a time over a keep-alive connection:", "",
                  "| path | p50 (ms) | p99 (ms) | added over Envoy, p50 (ms) | EPP CPU per request (ms) |",
                  "|---|---|---|---|---|"]
        for name, (_, label) in HOP_LABELS.items():
            if name not in hop:
                continue
            suffix = _key_suffix(name)
            added = f"{hop['epp_hop_added_p50_ms' + suffix]:.2f}" if suffix is not None else ""
            epp_cpu = f"{hop['epp_cpu_ms_per_request' + suffix]:.2f}" if suffix is not None else ""
            lines.append(f"| {label} | {hop[name]['p50_ms']:.2f} | {hop[name]['p99_ms']:.2f} | {added} | {epp_cpu} |")
    lb = result.get("large_body")
    if lb:
        lines += ["", f"Large prompts: {lb['body_bytes']} bytes, {lb['concurrency']} clients at once, {lb['requests']} "
                  "requests per path:", "", "| path | p50 (ms) | p99 (ms) | added over Envoy, p50 (ms) | "
                  "EPP CPU per request (ms) |", "|---|---|---|---|---|",
                  f"| Envoy alone | {lb['envoy']['p50_ms']:.2f} | {lb['envoy']['p99_ms']:.2f} | | |"]
        for name, mode in lb["body_modes"].items():
            suffix = _key_suffix(name)
            lines.append(f"| {_large_body_label(name, mode)} | {lb[name]['p50_ms']:.2f} | {lb[name]['p99_ms']:.2f} | "
                         f"{lb['epp_hop_added_p50_ms' + suffix]:.2f} | {lb['epp_cpu_ms_per_request' + suffix]:.2f} |")
    sc = result.get("scrapes")
    if sc:
        lines += ["", f"Keeping the state current: {sc['workers']} workers scraped every {sc['scrape_interval_s']} s, "
                  f"{sc['scrapes_per_s']:.0f} scrapes/s, {sc['cpu_ms_per_s']:.0f} ms of CPU a second "
                  f"({sc['cpu_ms_per_scrape']:.2f} ms per scrape, descriptor polls included)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disagg bench epp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoints", default="8,64,256,1000:1000000",
                   help="pool sizes to time picks at, each N or N:BLOCKS (blocks in the index; default --indexed-blocks)")
    p.add_argument("--indexed-blocks", type=int, default=100_000)
    p.add_argument("--picks", type=int, default=5000)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--hop-requests", type=int, default=2000, help="0 skips the Envoy hop measurement")
    p.add_argument("--answer-requests", type=int, default=2000,
                   help="0 skips timing the ext_proc answer in-process (no Envoy, no sockets)")
    p.add_argument("--scrape-workers", type=int, default=32, help="0 skips the scrape measurement")
    p.add_argument("--large-body-requests", type=int, default=600,
                   help="220 KB prompts from 20 clients at once through Envoy and Envoy + EPP, requests per path "
                        "(0 skips)")
    p.add_argument("--qps", type=float, default=500.0, help="open-loop rate through Envoy + EPP (0 skips it)")
    p.add_argument("--qps-seconds", type=float, default=20.0)
    p.add_argument("--replica-requests", type=int, default=400,
                   help="requests through 2 EPP replicas, for their agreement (0 skips it)")
    p.add_argument("--idle-workers", type=int, default=1000,
                   help="stand-in workers pushing their loads to one idle EPP (0 skips the idle measurement)")
    p.add_argument("--out", default="benchmarks", help="directory for epp.json and epp.png (when --json and "
                                                       "--plot are not given)")
    p.add_argument("--json", type=Path, help="write the report here (default: OUT/epp.json)")
    p.add_argument("--plot", type=Path, help="PNG plot (default: beside the JSON)")
    args = p.parse_args(argv)
    json_path = args.json or Path(args.out) / "epp.json"
    plot_path = args.plot or json_path.with_suffix(".png")

    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version(),
                    "reference_loop_ms": reference_loop_ms()},
        "pick": [],
    }
    sizes = [(int(n), int(blocks or args.indexed_blocks)) for n, _, blocks in
             (item.partition(":") for item in args.endpoints.split(","))]
    result["pick"] = bench_picks(sizes, picks=args.picks, prompt_tokens=args.prompt_tokens)
    for r in result["pick"]:
        print(f"pick @ {r['endpoints']:4d} endpoints: p50 {r['p50_us']:.1f} µs (best round {r['best_round_p50_us']:.1f}), "
              f"p99 {r['p99_us']:.1f} µs, {r['picks_per_s']:.0f} picks/s; CPU p50 {r['cpu_p50_us']:.1f} µs "
              f"+ {r['record_after_answer_cpu_p50_us']:.1f} µs bookkeeping after the answer (indexing, metrics), "
              f"{r['picks_per_cpu_s']:.0f} picks per CPU second", flush=True)
    if args.answer_requests and HARNESS:
        import subprocess

        say("epp", f"the ext_proc answer in-process: {args.answer_requests} Envoy-like streams to the EPP and the floor")
        out = subprocess.run([sys.executable, "-m", "benchmarks.ext_proc_replay", str(args.answer_requests), HOP_MODEL,
                              str(BLOCK), HOP_BODY.decode()], cwd=REPO, check=True, capture_output=True, text=True)
        answer = result["answer"] = json.loads(out.stdout)
        for name in ("epp", "floor"):
            print(f"answer ({name}): p50 {answer[name]['p50_us']:.0f} µs back to back, "
                  f"{answer[name]['after_idle_p50_us']:.0f} µs after {answer['idle_ms']:.0f} ms idle", flush=True)
    if args.hop_requests:
        say("epp", f"the ext_proc hop: {args.hop_requests} requests direct, through Envoy and through Envoy + each "
                   "ext_proc server")
        hop = asyncio.run(bench_hop(args.hop_requests))
        print(f"hop: direct p50 {hop['direct']['p50_ms']:.2f} ms, Envoy {hop['envoy']['p50_ms']:.2f} ms, "
              f"Envoy+EPP {hop['envoy_epp']['p50_ms']:.2f} ms (EPP adds {hop['epp_hop_added_p50_ms']:.2f} ms p50); "
              f"CPU per request: EPP {hop['epp_cpu_ms_per_request']:.2f} ms, Envoy's ext_proc work "
              f"{hop['envoy_ext_proc_cpu_ms_per_request']:.2f} ms", flush=True)
        for name, label in (("floor", "a constant-answer server (the floor)"), ("plaintext", "plaintext"),
                            ("grpclib", "grpclib, plaintext")):
            if f"epp_hop_added_p50_ms_{name}" in hop and name == "floor":
                print(f"hop floor (a constant-answer ext_proc server on our h2 server): adds "
                      f"{hop['epp_hop_added_p50_ms_floor']:.2f} ms p50, its CPU "
                      f"{hop['epp_cpu_ms_per_request_floor']:.2f} ms per request", flush=True)
            elif f"envoy_epp_{name}" in hop:
                print(f"hop with the EPP on {label}: Envoy+EPP {hop[f'envoy_epp_{name}']['p50_ms']:.2f} ms (adds "
                      f"{hop[f'epp_hop_added_p50_ms_{name}']:.2f} ms p50); EPP CPU "
                      f"{hop[f'epp_cpu_ms_per_request_{name}']:.2f} ms per request", flush=True)
        if "grpclib_minus_ours_added_p50_ms" in hop:
            print(f"grpclib adds {hop['grpclib_minus_ours_added_p50_ms']:.2f} ms p50 more than our server "
                  "(both plaintext)", flush=True)
        result["hop"] = hop
    if args.large_body_requests:
        say("epp", f"large bodies: {args.large_body_requests} requests of 220 KB per path, 20 at once, through Envoy "
                   "and Envoy + EPP")
        lb = result["large_body"] = asyncio.run(bench_large_body(args.large_body_requests))
        for name, mode in LARGE_BODY_MODES.items():
            suffix = _key_suffix(name)
            print(f"large body ({lb['body_bytes']} bytes, {lb['concurrency']} at once), "
                  f"{_large_body_label(name, mode)}: Envoy alone p50 {lb['envoy']['p50_ms']:.2f} ms, this path "
                  f"{lb[name]['p50_ms']:.2f} ms (adds "
                  f"{lb[f'epp_hop_added_p50_ms{suffix}']:.2f} ms p50, {lb[f'epp_hop_added_p99_ms{suffix}']:.2f} ms p99); "
                  f"CPU per request: EPP {lb[f'epp_cpu_ms_per_request{suffix}']:.2f} ms, Envoy's ext_proc work "
                  f"{lb[f'envoy_ext_proc_cpu_ms_per_request{suffix}']:.2f} ms", flush=True)
    if args.scrape_workers:
        say("epp", f"scrapes: a scheduler following {args.scrape_workers} stand-in workers")
        sc = result["scrapes"] = asyncio.run(bench_scrapes(args.scrape_workers))
        print(f"scrapes: {sc['workers']} workers, {sc['scrapes_per_s']:.0f} scrapes/s, {sc['cpu_ms_per_s']:.0f} ms "
              f"CPU per s ({sc['cpu_ms_per_scrape']:.2f} ms per scrape)", flush=True)
    if args.qps:
        say("epp", f"qps: {args.qps:.0f} requests/s open loop for {args.qps_seconds:.0f} s through Envoy + EPP and Envoy alone")
        q = result["qps"] = asyncio.run(bench_qps(args.qps, args.qps_seconds))
        print(f"qps {q['rate']:.0f}/s: Envoy+EPP p50 {q['envoy_epp']['p50_ms']:.2f} ms p99 {q['envoy_epp']['p99_ms']:.2f} ms "
              f"(EPP adds {q['epp_hop_added_p50_ms']:.2f} / {q['epp_hop_added_p99_ms']:.2f} ms), {q['failed']} failed, "
              f"{q['envoy_epp']['sent_late']} sent late", flush=True)
    if args.replica_requests:
        say("epp", f"replicas: {args.replica_requests} requests through 2 EPP replicas, conversations sharing prefixes")
        rep = result["replicas"] = asyncio.run(bench_replicas(args.replica_requests))
        print(f"replicas: {rep['count']}, pick agreement {rep['pick_agreement']} over {rep['sampled_picks']:.0f} "
              f"sampled picks, prefix affinity {rep['prefix_affinity']:.3f}", flush=True)
    if args.idle_workers:
        say("epp", f"idle: one EPP keeping {args.idle_workers} stand-in workers current, no requests")
        idle = result["idle"] = asyncio.run(bench_idle(args.idle_workers))
        print(f"idle: {idle['live']} of {idle['endpoints']} workers live, EPP CPU {idle['cpu_percent']:.1f}% of one "
              f"core, oldest load signal {idle['oldest_signal_age_s']} s", flush=True)
    result["machine"]["load_avg_after"] = os.getloadavg()
    result["machine"]["reference_loop_ms_after"] = reference_loop_ms()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    json_path.with_suffix(".md").write_text(markdown(result, "disagg bench epp " + " ".join(
        sys.argv[1:] if argv is None else argv)))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {json_path}" + (f" and {plot_path}" if plot(result, plot_path) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
