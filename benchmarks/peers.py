"""The peers' stacks, brought up like ours (`disagg.bench.stacks`) so that only the
orchestration differs:

    RayServeLLM      Ray Serve LLM's `build_pd_openai_app` with vLLM's NixlConnector
                     (`benchmarks.ray_serve_llm`)
    ReferenceProxy   two plain vLLM OpenAI servers behind vLLM's reference P/D proxy
                     (`benchmarks.reference_proxy`)

Both run vLLM's NixlConnector with NIXL's progress thread waiting instead of spinning unless
asked (`nixl_quiet/`). Their launchers are modules of this package: they run with the
repository root as their working directory, where `benchmarks` is importable.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.ray_serve_llm import engine_env
from disagg.bench.processes import free_port
from disagg.bench.stacks import PY, EngineSettings, Stack, http_ok, launch, ray_component, said_ready, wait_ready

REPO = Path(__file__).resolve().parents[1]
NIXL = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
NIXL_QUIET_DIR = Path(__file__).resolve().parent / "nixl_quiet"


def nixl_env(spin: bool) -> dict[str, str]:
    """Env of a stack that runs vLLM's NixlConnector. Without `spin`, NIXL's progress thread
    waits for UCX events instead of spinning (see `nixl_quiet/sitecustomize.py`): vLLM's default
    keeps a spinning thread per engine, a core each, which a 2-core machine cannot spare."""
    return {} if spin else {"PYTHONPATH": str(NIXL_QUIET_DIR)}


@dataclass
class RayServeLLM(Stack):
    """Ray Serve LLM's P/D app (see `benchmarks.ray_serve_llm`)."""

    stream_batching_ms: float = 50.0
    nixl_spin: bool = False  # keep NIXL's spinning progress thread (vLLM's default)

    @property
    def description(self) -> str:  # type: ignore[override]
        polling = "" if self.nixl_spin else " (NIXL progress thread not spinning)"
        return f"Ray Serve LLM build_pd_openai_app, NixlConnector{polling}, stream batching {self.stream_batching_ms:g} ms"

    def _start(self, timeout_s: float) -> None:
        s = self.settings
        port = free_port()
        tmp = tempfile.mkdtemp(prefix="rsl-", dir="/tmp")
        cmd = [PY, "-m", "benchmarks.ray_serve_llm", "--model", self.model, "--port", str(port),
               "--stream-batching-ms", str(self.stream_batching_ms), "--prefill-core", s.prefill_core,
               "--decode-core", s.decode_core, "--dtype", s.dtype, "--block-size", str(s.block_size),
               "--max-model-len", str(s.max_model_len), "--ray-tmpdir", tmp, "--timeout", str(timeout_s)]
        self.launched.append(launch("driver", cmd, log_dir=self.log_dir, cwd=REPO, classify=ray_component,
                                    env={"TMPDIR": tmp, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled",
                                         **nixl_env(self.nixl_spin)}))
        self.url = f"http://127.0.0.1:{port}"
        wait_ready(lambda: said_ready(self.launched[0].log_tail(100_000)), self.launched, timeout_s, self.name)


def vllm_server_cmd(model: str, port: int, settings: EngineSettings, kv_transfer: dict | None) -> list[str]:
    cmd = [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", Path(model).name, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", settings.dtype, "--block-size", str(settings.block_size),
           "--max-model-len", str(settings.max_model_len),
           "--max-num-seqs", str(settings.max_num_seqs), "--enforce-eager", "--enable-prefix-caching",
           "--disable-uvicorn-access-log"]
    if kv_transfer is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv_transfer)]
    return cmd


@dataclass
class ReferenceProxy(Stack):
    """Two vLLM OpenAI servers (prefill, decode) behind `benchmarks.reference_proxy`."""

    nixl_spin: bool = False  # keep NIXL's spinning progress thread (vLLM's default)
    engine_urls: dict[str, str] = field(default_factory=dict)  # role -> the vLLM server's own URL

    @property
    def description(self) -> str:  # type: ignore[override]
        polling = "" if self.nixl_spin else " (NIXL progress thread not spinning)"
        return f"vLLM OpenAI servers x2 + reference P/D proxy (round robin, NixlConnector{polling})"

    def _start(self, timeout_s: float) -> None:
        s = self.settings
        p_port, d_port, proxy_port = free_port(), free_port(), free_port()
        self.engine_urls = {"prefill": f"http://127.0.0.1:{p_port}", "decode": f"http://127.0.0.1:{d_port}"}
        for role, port, core in (("prefill", p_port, s.prefill_core), ("decode", d_port, s.decode_core)):
            env = {**engine_env(core, free_port(), "127.0.0.1", s.kv_cache_gib), **nixl_env(self.nixl_spin)}
            self.launched.append(launch(role, vllm_server_cmd(self.model, port, s, NIXL), log_dir=self.log_dir,
                                        cwd=REPO, env=env))
        self.launched.append(launch("router", [PY, "-m", "benchmarks.reference_proxy", "--port", str(proxy_port),
                                               "--prefill", f"127.0.0.1:{p_port}", "--decode", f"127.0.0.1:{d_port}"],
                                    log_dir=self.log_dir, cwd=REPO))
        self.url = f"http://127.0.0.1:{proxy_port}"
        wait_ready(lambda: all(http_ok(f"http://127.0.0.1:{p}/health") for p in (p_port, d_port, proxy_port)),
                   self.launched, timeout_s, self.name)
