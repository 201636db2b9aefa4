"""AppConfig: one source for CLI flags, YAML, Serve args and the EPP."""

import pytest
from pydantic import ValidationError

from disagg.config import AppConfig


def test_yaml_then_overrides_then_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: /m/tiny\nblock_size: 64\nrouting: {pd_threshold_tokens: 100}\n")
    cfg = AppConfig.load(path, {"port": 9000, "decode.replicas": 3}, ["routing.kv_events=false", "prefill.cpu_bind=[2]"])
    assert (cfg.model, cfg.block_size, cfg.port) == ("/m/tiny", 64, 9000)
    assert cfg.routing.pd_threshold_tokens == 100 and cfg.routing.kv_events is False
    assert cfg.decode.replicas == 3 and cfg.prefill.cpu_bind == ["2"]
    assert cfg.model_name == "tiny"


def test_unknown_keys_are_errors_not_ignored():
    with pytest.raises(ValidationError, match="blok_size"):
        AppConfig.model_validate({"model": "m", "blok_size": 32})
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"model": "m", "routing": {"threshold": 1}})


def test_block_size_and_context_are_checked():
    with pytest.raises(ValidationError, match="multiple of 16"):
        AppConfig(model="m", block_size=40)
    with pytest.raises(ValidationError, match="max_model_len"):
        AppConfig(model="m", block_size=128, max_model_len=64)


def test_setting_without_equals_is_rejected():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        AppConfig.load(None, {"model": "m"}, ["block_size"])


def test_serve_args_round_trip():
    cfg = AppConfig(model="m", kv_connector="nixl")
    assert AppConfig.model_validate(cfg.model_dump()) == cfg
