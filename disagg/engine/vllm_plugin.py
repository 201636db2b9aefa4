"""A vLLM general plugin (`vllm.general_plugins` entry point): vLLM loads it in every process it
starts, the engine core and each worker, before the model runs.

It asks Linux for permission to use AMX tiles where the CPU has them. vLLM's CPU attention picks
its AMX kernel whenever the CPU advertises AMX, but nothing in the worker process requests the
permission (ARCH_REQ_XCOMP_PERM) unless oneDNN happened to run an AMX matmul first, so a float32
model's first attention step died of SIGILL on this project's machines."""

from __future__ import annotations


def register() -> None:
    import torch

    if torch.cpu._is_amx_tile_supported():
        torch._C._cpu._init_amx()
