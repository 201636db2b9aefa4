"""How the benchmark decides a stack it started is ready."""

from __future__ import annotations

from disagg.bench.stacks import said_ready


def test_ready_is_a_line_of_its_own_not_an_env_var_in_a_config_dump() -> None:
    dump = "'env_vars': {'VLLM_ENGINE_READY_TIMEOUT_S': '3600'}\n(pid=12) INFO READY? not yet\n"
    assert not said_ready(dump)
    assert said_ready(dump + "READY http://127.0.0.1:8000 model=tiny\n")
