"""One configuration for every entry point: `disagg serve` flags, YAML files, Serve's
`build_app` args, the EPP and the Helm chart's rendered Serve config all parse as `AppConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

KVConnectorName = Literal["disagg", "nixl", "none"]
KVBackendName = Literal["auto", "nixl", "ucxx", "tcp"]
Role = Literal["prefill", "decode"]


class _Strict(BaseModel):
    # A typo in a YAML key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RoleConfig(_Strict):
    """How one worker role (prefill or decode) is deployed."""

    replicas: int = Field(1, ge=0)
    # CPU cores for each replica's engine threads (VLLM_CPU_OMP_THREADS_BIND), replica i gets
    # cpu_bind[i % len]. Empty: no pinning (GPU machines, or a pod that owns its cores).
    cpu_bind: list[Annotated[str, BeforeValidator(str)]] = Field(default_factory=list)
    # The worker's own HTTP endpoint (gateway path). 0 picks a free port on each replica.
    http_port: int = Field(0, ge=0, le=65535)
    # Logical CPUs Ray reserves per replica (0 lets many engines share a small machine).
    ray_num_cpus: float = Field(0.0, ge=0)
    ray_num_gpus: float = Field(0.0, ge=0)
    # Custom Ray resources each replica asks for (ray_actor_options["resources"]). On KubeRay a
    # role's worker group advertises one unit of e.g. "disagg_prefill" per pod, and each replica
    # asks for one, so every pod of the group runs exactly one engine of this role.
    ray_resources: dict[str, float] = Field(default_factory=dict)


class RoutingConfig(_Strict):
    """The scheduler: which pair serves a request."""

    # Disaggregate only when the prompt's tokens not cached on the picked decode exceed this.
    pd_threshold_tokens: int = Field(256, ge=0)
    # Scorer weights (higher weight, more influence); see disagg.routing.
    prefix_weight: float = Field(2.0, ge=0)
    load_weight: float = Field(1.0, ge=0)
    kv_usage_weight: float = Field(1.0, ge=0)
    # Prefill ranking: a prefill on the decode's node moves KV without crossing the network.
    same_node_weight: float = Field(0.5, ge=0)
    # Ordered fallbacks returned besides the pick, per role (Envoy tries them in order).
    fallbacks: int = Field(2, ge=0)
    # A signal older than this loses score; a worker silent for dead_after_s leaves the pool.
    stale_after_s: float = Field(0.5, gt=0)
    dead_after_s: float = Field(2.0, gt=0)
    # Each scrape asks a worker for its load series only (`name[]`); ~2 ms of router CPU each here.
    scrape_interval_s: float = Field(0.2, gt=0)
    # Shed (429) when every candidate reports at least this many waiting requests (scraped).
    max_waiting_per_worker: int = Field(64, ge=1)
    # Learn prefixes from our own routing decisions when KV events are off.
    approximate_prefix: bool = True
    kv_events: bool = True


class AppConfig(_Strict):
    """The whole stack: model, engine, roles, routing, faults and ports."""

    model: str = Field(..., description="Path of a Hugging Face style model directory.")
    served_model_name: str | None = None
    dtype: str = "auto"
    block_size: int = Field(128, ge=1, description="KV block size in tokens (CPU: a multiple of 32).")
    max_model_len: int = Field(2048, ge=16)
    max_num_seqs: int = Field(16, ge=1)
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = True
    seed: int = 0
    # CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE); None leaves vLLM's default.
    kv_cache_gib: int | None = Field(1, ge=1)
    # Ray-native path: a decode replica merges a request's tokens that come within this many ms
    # of its previous stream item (0: one item per engine step); see disagg.engine.coalesce.
    stream_batching_ms: float = Field(20.0, ge=0)

    prefill: RoleConfig = Field(default_factory=lambda: RoleConfig(cpu_bind=["0"]))
    decode: RoleConfig = Field(default_factory=lambda: RoleConfig(cpu_bind=["1"]))
    routing: RoutingConfig = Field(default_factory=RoutingConfig)

    kv_connector: KVConnectorName = "disagg"
    kv_backend: KVBackendName = "auto"
    # Seconds a prefill worker keeps handed-off blocks before reclaiming them.
    kv_lease_s: float = Field(30.0, gt=0)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Faults: each prefill attempt's timeout and how many prefill workers decode tries before
    # prefilling locally.
    prefill_timeout_s: float = Field(30.0, gt=0)
    prefill_attempts: int = Field(2, ge=0)
    request_timeout_s: float = Field(600.0, gt=0)

    @field_validator("block_size")
    @classmethod
    def _block_size_is_sane(cls, v: int) -> int:
        if v % 16:
            raise ValueError("block_size must be a multiple of 16 (vLLM on CPU needs a multiple of 32)")
        return v

    @model_validator(mode="after")
    def _context_holds_a_block(self) -> "AppConfig":
        if self.max_model_len < self.block_size:
            raise ValueError("max_model_len must be at least one block_size")
        return self

    @property
    def model_name(self) -> str:
        """The name clients use in the OpenAI `model` field."""
        return self.served_model_name or Path(self.model).name

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "AppConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(_merge(data, overrides))

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None,
             settings: list[str] | None = None) -> "AppConfig":
        """YAML file (optional), then overrides, then `KEY=VALUE` settings (dotted keys reach
        nested fields; values are YAML scalars)."""
        data = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
        data = _merge(data, overrides or {})
        for item in settings or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"expected KEY=VALUE, got {item!r}")
            data = _merge(data, {key.strip(): yaml.safe_load(value)})
        return cls.model_validate(data)

    def with_overrides(self, **overrides: Any) -> "AppConfig":
        return AppConfig.model_validate(_merge(self.model_dump(), overrides))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge overrides into base; dotted keys ("routing.pd_threshold_tokens") reach nested fields."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        head, _, rest = key.partition(".")
        if rest:
            out[head] = _merge(dict(out.get(head) or {}), {rest: value})
        elif isinstance(value, dict) and isinstance(out.get(head), dict):
            out[head] = _merge(out[head], value)
        else:
            out[head] = value
    return out
