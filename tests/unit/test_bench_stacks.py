"""How the benchmark decides a stack it started is ready, and where the peers' stacks live: in the
research harness (`benchmarks/`, run from the repository root), not in the package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.peers import NIXL_QUIET_DIR, REPO, nixl_env
from disagg.bench.stacks import said_ready


def test_ready_is_a_line_of_its_own_not_an_env_var_in_a_config_dump() -> None:
    dump = "'env_vars': {'VLLM_ENGINE_READY_TIMEOUT_S': '3600'}\n(pid=12) INFO READY? not yet\n"
    assert not said_ready(dump)
    assert said_ready(dump + "READY http://127.0.0.1:8000 model=tiny\n")


@pytest.mark.parametrize("launcher", ["benchmarks.ray_serve_llm", "benchmarks.reference_proxy"])
def test_a_peers_launcher_runs_as_the_stack_starts_it(launcher: str) -> None:
    # As the peer stacks launch it: `python -m` in the repository root, with only nixl_quiet on
    # PYTHONPATH (the package does not map `benchmarks`).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | nixl_env(spin=False)
    out = subprocess.run([sys.executable, "-m", launcher, "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--port" in out.stdout
    assert (NIXL_QUIET_DIR / "sitecustomize.py").is_file()


def test_the_package_holds_no_ray_code() -> None:
    # Ray code lives in deployments/ and, for the peers, in benchmarks/: disagg and kv_transfer run without Ray.
    root = Path(__file__).resolve().parents[2]
    ray_import = re.compile(r"^\s*(import ray|from ray)", re.MULTILINE)
    found = [str(p.relative_to(root)) for d in ("disagg", "kv_transfer") for p in (root / d).rglob("*.py")
             if ray_import.search(p.read_text())]
    assert not found, found


def test_disagg_bench_compare_names_its_new_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    from disagg.cli import main

    assert main(["bench", "compare", "--quick"]) == 2
    assert "python -m benchmarks.compare" in capsys.readouterr().err
