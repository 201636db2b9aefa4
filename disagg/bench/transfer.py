"""`disagg bench transfer`: KV transfer throughput and latency, per backend and for raw NIXL.

Every case moves the same bytes between two real processes and is compared with a memcpy of
those bytes measured in the same initiator process in the same run:

- `contiguous`: one 64 MiB region (READ and WRITE);
- `scattered`: 4096 blocks of 64 KiB at random remote positions (4096 descriptors);
- `coalesced`: the same 4096 blocks in runs of 16 consecutive ids on both sides, coalesced
  into 256 descriptors (what the vLLM connector does with consecutive block ids);
- `latency`: one 64 KiB block.

Each ratio to memcpy is a field whose name contains `ratio`; `vs_raw_nixl_ratio` compares our
agent's nixl backend with NIXL's own API on the same case. Rounds interleave the agents, so
drift on a shared machine hits all of them alike; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from disagg.bench.agent_process import AgentOps, AgentProcess
from disagg.bench.progress import say
from kv_transfer.backends import available_backends

MiB = 1 << 20
BLOCK = 64 << 10
NUM_BLOCKS = 4096
RUN = 16
CONTIGUOUS = 64 * MiB


class BenchOps(AgentOps):
    """The initiator's and target's side of the benchmark, over our Agent."""

    def setup_initiator(self) -> None:
        self.alloc("dst", NUM_BLOCKS * BLOCK)
        self.alloc("wsrc", CONTIGUOUS, seed=5)
        self.alloc("copy_src", NUM_BLOCKS * BLOCK, seed=6, register=False)

    def setup_target(self) -> dict[str, int]:
        return {"pool": self.alloc("pool", NUM_BLOCKS * BLOCK, seed=7), "wdst": self.alloc("wdst", CONTIGUOUS)}

    def memcpy(self, case: str, iters: int, remote_ids: list[int] | None = None) -> list[float]:
        """The same bytes moved by one in-process copy (a gather for block cases)."""
        src, dst = self.buffers["copy_src"], self.buffers["dst"]
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            if case == "contiguous":
                np.copyto(dst[:CONTIGUOUS], src[:CONTIGUOUS])
            elif case == "latency":
                np.copyto(dst[:BLOCK], src[:BLOCK])
            else:
                assert remote_ids is not None
                # mode="clip": with the default mode numpy buffers `out`, copying twice.
                np.take(src.reshape(NUM_BLOCKS, BLOCK), remote_ids, axis=0, out=dst.reshape(NUM_BLOCKS, BLOCK),
                        mode="clip")
            out.append(time.perf_counter() - t0)
        return out

    def run_case(self, case: str, op: str, remote: str, target: dict[str, int], remote_ids: list[int],
                 iters: int) -> list[tuple[float, float]]:
        """(transfer seconds, memcpy seconds) pairs, alternating, so both see the same machine."""
        local, rows = _case_descs(case, op, target, remote_ids)
        key = "wsrc" if op == "WRITE" else "dst"
        pairs = []
        for _ in range(iters):
            (t,) = self.timed(op, key, local, remote, rows, 1, coalesce=(case == "coalesced"))
            (c,) = self.memcpy(case, 1, remote_ids)
            pairs.append((t, c))
        return pairs


class RawNixlOps(BenchOps):
    """The same cases through NIXL's own Python API: the agent's reference point."""

    def __init__(self, name: str, backend: str, lease_ttl_s: float) -> None:
        from kv_transfer.backends.nixl import _quiet_nixl_logging
        os.environ.setdefault("UCX_NET_DEVICES", "lo")
        _quiet_nixl_logging()
        from nixl_cu12._api import nixl_agent, nixl_agent_config

        # Configured like our nixl backend (see kv_transfer/backends/nixl.py for why).
        self.nixl = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[]))
        self.nixl.create_backend("UCX", {"ucx_error_handling_mode": "none"})
        self.name = name
        self.buffers: dict[str, np.ndarray] = {}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "backend": "nixl-raw", "address": ("", 0), "pid": os.getpid()}

    def alloc(self, key: str, nbytes: int, seed: int | None = None, register: bool = True) -> int:
        buf = (np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8) if seed is not None
               else np.zeros(nbytes, dtype=np.uint8))
        buf[:] = buf
        self.buffers[key] = buf
        if register:
            self.nixl.register_memory([(int(buf.ctypes.data), nbytes, 0, "")], "DRAM")
        return int(buf.ctypes.data)

    def metadata(self) -> bytes:
        return bytes(self.nixl.get_agent_metadata())

    def add_peer(self, metadata: bytes) -> str:
        name = self.nixl.add_remote_agent(metadata)
        return name.decode() if isinstance(name, bytes) else name

    def timed(self, op: str, local_key: str, local_spans: list[tuple[int, int]] | None, remote: str,
              remote_rows: list[tuple[int, int]], iters: int, coalesce: bool = False) -> list[float]:
        from kv_transfer.descriptors import DescList, paired_coalesce

        base = int(self.buffers[local_key].ctypes.data)
        spans = local_spans if local_spans is not None else [(0, self.buffers[local_key].nbytes)]
        local = DescList.from_descs([(base + off, n) for off, n in spans])
        remote_descs = DescList.from_descs(remote_rows)
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            lo, ro = paired_coalesce(local, remote_descs) if coalesce else (local, remote_descs)
            h = self.nixl.initialize_xfer(op, self.nixl.get_xfer_descs(lo.array.astype(np.uint64), "DRAM"),
                                          self.nixl.get_xfer_descs(ro.array.astype(np.uint64), "DRAM"), remote)
            state = self.nixl.transfer(h)
            while state == "PROC":
                state = self.nixl.check_xfer_state(h)
            if state != "DONE":
                raise RuntimeError(f"raw NIXL transfer ended {state}")
            self.nixl.release_xfer_handle(h)
            out.append(time.perf_counter() - t0)
        return out

    def close(self) -> None:
        self.nixl = None


def _case_descs(case: str, op: str, target: dict[str, int], remote_ids: list[int]
                ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    if case == "contiguous":
        base = target["wdst"] if op == "WRITE" else target["pool"]
        return [(0, CONTIGUOUS)], [(base, CONTIGUOUS)]
    if case == "latency":
        return [(0, BLOCK)], [(target["pool"] + remote_ids[0] * BLOCK, BLOCK)]
    return ([(i * BLOCK, BLOCK) for i in range(NUM_BLOCKS)],
            [(target["pool"] + b * BLOCK, BLOCK) for b in remote_ids])


def _block_ids(case: str, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    if case == "coalesced":
        # Runs of RUN consecutive ids, the runs in random order; local ids are 0..N-1, so each
        # run is consecutive on both sides.
        return [int(r) * RUN + j for r in rng.permutation(NUM_BLOCKS // RUN) for j in range(RUN)]
    return [int(b) for b in rng.permutation(NUM_BLOCKS)]


CASES: list[tuple[str, str]] = [("contiguous", "READ"), ("contiguous", "WRITE"), ("scattered", "READ"),
                                ("coalesced", "READ"), ("latency", "READ")]


class Pair:
    def __init__(self, label: str, backend: str, env: dict[str, str]) -> None:
        factory = RawNixlOps if label == "nixl-raw" else BenchOps
        self.label = label
        self.target = AgentProcess(f"{label}-target", backend, env=env, ops_factory=factory)
        self.initiator = AgentProcess(f"{label}-initiator", backend, env=env, ops_factory=factory)
        self.addresses: dict[str, int] = self.target.call("setup_target")
        self.initiator.call("setup_initiator")
        if label == "nixl-raw":
            self.remote = self.initiator.call("add_peer", self.target.call("metadata"))
        else:
            self.remote = self.initiator.call("fetch", *self.target.address)

    def close(self) -> None:
        self.initiator.close()
        self.target.close()


def run(backends: list[str], rounds: int, iters: dict[str, int], env: dict[str, str]) -> dict[str, Any]:
    labels = [b for b in backends if b in available_backends() or b == "nixl-raw"]
    skipped = [b for b in backends if b not in labels]
    say("transfer", f"starting initiator and target processes for {', '.join(labels)}"
        + (f" (not installed: {', '.join(skipped)})" if skipped else ""))
    pairs = {label: Pair(label, "nixl" if label == "nixl-raw" else label, env) for label in labels}
    samples: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    try:
        for round_ in range(1, rounds + 1):
            for case, op in CASES:
                say("transfer", f"round {round_}/{rounds}: {case} {op} ({iters[case]} iterations per backend)")
                ids = _block_ids(case)
                for label, pair in pairs.items():
                    # Warm up (first-touch, connection setup) outside the timings.
                    pair.initiator.call("run_case", case, op, pair.remote, pair.addresses, ids, 1)
                    samples.setdefault((label, case, op), []).extend(pair.initiator.call(
                        "run_case", case, op, pair.remote, pair.addresses, ids, iters[case], timeout_s=600))
    finally:
        for pair in pairs.values():
            pair.close()
    return _report(labels, samples)


def _report(labels: list[str], samples: dict[tuple[str, str, str], list[tuple[float, float]]]) -> dict[str, Any]:
    nbytes = {"contiguous": CONTIGUOUS, "scattered": NUM_BLOCKS * BLOCK, "coalesced": NUM_BLOCKS * BLOCK,
              "latency": BLOCK}
    results: list[dict[str, Any]] = []
    for (label, case, op), pairs in samples.items():
        t = statistics.median(p[0] for p in pairs)
        c = statistics.median(p[1] for p in pairs)
        row: dict[str, Any] = {"backend": label, "case": case, "op": op, "bytes": nbytes[case],
                               "descriptors": {"contiguous": 1, "latency": 1, "scattered": NUM_BLOCKS,
                                               "coalesced": NUM_BLOCKS // RUN}[case],
                               "median_s": t, "gbps": nbytes[case] / t / 1e9, "memcpy_gbps": nbytes[case] / c / 1e9,
                               # Median of per-pair ratios: each transfer against the memcpy run
                               # right after it, so machine-wide slowdowns cancel out.
                               "memcpy_ratio": statistics.median(p[1] / p[0] for p in pairs),
                               "samples": len(pairs)}
        if case == "latency":
            row["latency_us"] = t * 1e6
            row["memcpy_latency_us"] = c * 1e6
        results.append(row)
    raw = {(r["case"], r["op"]): r for r in results if r["backend"] == "nixl-raw"}
    for r in results:
        if r["backend"] == "nixl" and (r["case"], r["op"]) in raw:
            # Compared through each one's own memcpy ratio (measured in different processes).
            r["vs_raw_nixl_ratio"] = r["memcpy_ratio"] / raw[(r["case"], r["op"])]["memcpy_ratio"]
    return {"benchmark": "kv_transfer", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "block_bytes": BLOCK, "num_blocks": NUM_BLOCKS, "run_length": RUN, "contiguous_bytes": CONTIGUOUS,
            "backends": labels, "results": sorted(results, key=lambda r: (r["case"], r["op"], r["backend"])),
            "targets": _targets(results)}


def _targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's bars, checked on this run (nixl backend)."""
    def find(case: str, op: str, backend: str = "nixl") -> dict[str, Any] | None:
        return next((r for r in results if (r["backend"], r["case"], r["op"]) == (backend, case, op)), None)

    out: dict[str, Any] = {}
    bars = [("contiguous_read_ratio_min", "contiguous", "READ", 0.7),
            ("contiguous_write_ratio_min", "contiguous", "WRITE", 0.7),
            ("coalesced_read_ratio_min", "coalesced", "READ", 0.6),
            ("scattered_read_ratio_min", "scattered", "READ", 0.35)]
    for name, case, op, bar in bars:
        r = find(case, op)
        if r is not None:
            out[name] = {"bar": bar, "memcpy_ratio": round(r["memcpy_ratio"], 3), "met": r["memcpy_ratio"] >= bar}
    agent = [r for r in results if r["backend"] == "nixl" and "vs_raw_nixl_ratio" in r and r["case"] != "latency"]
    if agent:
        worst = min(agent, key=lambda r: r["vs_raw_nixl_ratio"])
        out["vs_raw_nixl_ratio_min"] = {"bar": 0.9, "worst_case": f"{worst['case']} {worst['op']}",
                                        "vs_raw_nixl_ratio": round(worst["vs_raw_nixl_ratio"], 3),
                                        "met": worst["vs_raw_nixl_ratio"] >= 0.9}
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["case"] != "latency"]
    cases = sorted({(r["case"], r["op"]) for r in rows})
    labels = report["backends"]
    fig, (ax, lx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        ys = [next((r["memcpy_ratio"] for r in rows if (r["case"], r["op"], r["backend"]) == (c, o, label)), 0)
              for c, o in cases]
        ax.bar([k + i * width for k in range(len(cases))], ys, width, label=label)
    for bar, color in ((0.7, "tab:red"), (0.6, "tab:orange"), (0.35, "tab:gray")):
        ax.axhline(bar, color=color, linestyle="--", linewidth=0.8)
    ax.set_xticks([k + width * (len(labels) - 1) / 2 for k in range(len(cases))])
    ax.set_xticklabels([f"{c}\n{o}" for c, o in cases])
    ax.set_ylabel("throughput / memcpy of the same bytes")
    ax.set_title("KV transfer between two processes (ratio to memcpy)")
    ax.legend()
    lat = [r for r in report["results"] if r["case"] == "latency"]
    lx.bar([r["backend"] for r in lat], [r["latency_us"] for r in lat], color="tab:purple")
    lx.set_ylabel("µs (one 64 KiB block)")
    lx.set_yscale("log")
    lx.set_title("latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disagg bench transfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="write the report here")
    parser.add_argument("--plot", type=Path, help="plot PNG (default: beside the JSON)")
    parser.add_argument("--backends", default="nixl-raw,nixl,ucxx,tcp",
                        help="comma-separated: nixl-raw, nixl, ucxx, tcp (uninstalled ones are skipped)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    args = parser.parse_args(argv)
    iters = ({"contiguous": 2, "scattered": 1, "coalesced": 1, "latency": 20} if args.quick
             else {"contiguous": 8, "scattered": 4, "coalesced": 4, "latency": 300})
    env = {"UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES", "lo"), "NIXL_LOG_LEVEL": "WARN"}
    report = run([b.strip() for b in args.backends.split(",") if b.strip()], args.rounds, iters, env)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    png = args.plot or args.json.with_suffix(".png")
    plot(report, png)
    _print_table(report)
    print(f"wrote {args.json} and {png}")
    return 0


def _print_table(report: dict[str, Any]) -> None:
    print(f"{'backend':10} {'case':11} {'op':5} {'GB/s':>7} {'memcpy':>7} {'ratio':>6} {'vs raw':>7} {'latency':>9}")
    for r in report["results"]:
        lat = f"{r['latency_us']:.1f}us" if "latency_us" in r else ""
        vs = f"{r['vs_raw_nixl_ratio']:.2f}" if "vs_raw_nixl_ratio" in r else ""
        print(f"{r['backend']:10} {r['case']:11} {r['op']:5} {r['gbps']:7.2f} {r['memcpy_gbps']:7.2f} "
              f"{r['memcpy_ratio']:6.2f} {vs:>7} {lat:>9}")
    for name, t in report["targets"].items():
        print(f"target {name}: {t}")


if __name__ == "__main__":
    sys.exit(main())
