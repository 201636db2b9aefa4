"""One configuration for every entry point: `disagg serve` flags, YAML files, Serve's
`build_app` args, the EPP and the Helm chart's rendered Serve config all parse as `AppConfig`."""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, NoReturn

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError,
                      field_validator, model_validator)

KVConnectorName = Literal["disagg", "nixl", "none"]
KVBackendName = Literal["auto", "nixl", "ucxx", "tcp"]


# VLLM_CPU_OMP_THREADS_BIND's syntax: cores and ranges, `,`-separated (`|` between TP ranks).
_CPU_LIST = re.compile(r"\d+(-\d+)?([,|]\d+(-\d+)?)*")


class BadValue(ValueError, argparse.ArgumentTypeError):
    """A value a setting or flag cannot take: pydantic and argparse both report its message."""


def cpu_list(text: str) -> str:
    """A core list such as `0`, `0-3` or `0,2-3` (a validator and an argparse type)."""
    if not _CPU_LIST.fullmatch(text) or any(int(lo) > int(hi) for lo, hi in re.findall(r"(\d+)-(\d+)", text)):
        raise BadValue(f"expected cores like 0, 0-3 or 0,2-3, got {text!r}")
    return text


class _Strict(BaseModel):
    # A typo in a YAML key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RoleConfig(_Strict):
    """How one worker role (prefill or decode) is deployed."""

    replicas: int = Field(1, ge=0)
    # CPU cores for each replica's engine threads (VLLM_CPU_OMP_THREADS_BIND), replica i gets
    # cpu_bind[i % len]. Empty: no pinning (GPU machines, or a pod that owns its cores).
    cpu_bind: list[Annotated[str, BeforeValidator(str), AfterValidator(cpu_list)]] = Field(default_factory=list)
    # The worker's own HTTP endpoint (gateway path). 0 picks a free port on each replica.
    http_port: int = Field(0, ge=0, le=65535)
    # Logical CPUs Ray reserves per replica (0 lets many engines share a small machine).
    ray_num_cpus: float = Field(0.0, ge=0)
    ray_num_gpus: float = Field(0.0, ge=0)
    # Custom Ray resources each replica asks for (ray_actor_options["resources"]). On KubeRay a
    # role's worker group advertises one unit of e.g. "disagg_prefill" per pod, and each replica
    # asks for one, so every pod of the group runs exactly one engine of this role.
    ray_resources: dict[str, float] = Field(default_factory=dict)


class FlowControlConfig(_Strict):
    """The EPP's flow control (`disagg.epp.flow_control`): while every decode is saturated,
    requests wait in the EPP, in priority bands and fair between tenants, instead of being shed."""

    # The longest a request waits before a 503; 0 turns flow control off (shed with 429 at once).
    ttl_s: float = Field(30.0, ge=0)
    # What one EPP replica holds waiting (all bands together): requests, and bytes of their bodies.
    max_requests: int = Field(5000, ge=1)
    max_bytes: int = Field(2**30, ge=1)
    # Objective names (`x-gateway-inference-objective`) and their priorities; unknown names are 0.
    objectives: dict[str, int] = Field(default_factory=dict)
    # While requests wait, how often the EPP looks for freed capacity and expired requests.
    poll_interval_s: float = Field(0.01, gt=0)


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
    # The EPP's queue while saturated (the Router sheds at once).
    flow_control: FlowControlConfig = Field(default_factory=FlowControlConfig)


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
    # A decode that dies mid-stream: the Router re-submits prompt + the tokens generated so far to
    # another decode, at most this many times per request, then ends the stream with an error.
    migration_limit: int = Field(1, ge=0)
    request_timeout_s: float = Field(600.0, gt=0)
    # Larger request bodies get a 413 before they are parsed (a few MB holds any prompt that
    # fits a long context).
    max_request_bytes: int = Field(4 * 2**20, ge=1024)
    # Worker-to-worker calls (decode's POST /internal/prefill) carry this token and prefill
    # refuses calls without it. None: `disagg serve` makes one at start for its workers; a
    # worker started otherwise takes $DISAGG_INTERNAL_TOKEN (the chart's Secret), and without
    # either accepts any caller.
    internal_token: SecretStr | None = None

    @field_validator("host")
    @classmethod
    def _host_is_an_address(cls, v: str) -> str:
        return host_name(v)

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
        data: Any = {}
        if path:
            try:
                data = yaml.safe_load(Path(path).read_text()) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"--config {path}: not valid YAML ({_first_line(e)})") from None
            if not isinstance(data, dict):
                raise ValueError(f"--config {path}: expected a mapping of settings, got a {type(data).__name__}")
        data = _merge(data, overrides or {})
        for item in settings or []:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
            try:
                data = _merge(data, {key.strip(): yaml.safe_load(value)})
            except yaml.YAMLError as e:
                raise ValueError(f"--set {key.strip()}: the value is not YAML ({_first_line(e)})") from None
            except (TypeError, ValueError):
                raise ValueError(f"--set {key.strip()}: {key.strip().rpartition('.')[0]} is not a section") from None
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


# Command lines (`disagg serve`, `disagg worker`, `disagg epp`): a bad flag or config value is
# one line that names the option and says what it expects, and exit status 2.

CONFIG_ERRORS = (ValidationError, ValueError, OSError)


class CommandLineParser(argparse.ArgumentParser):
    """argparse, with its errors on one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        usage_error(self.prog, message)
        raise SystemExit(2)


def usage_error(prog: str, message: str) -> int:
    """Print `prog: error: message` (one line) and return the exit status for it, 2."""
    print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
    return 2


def config_error(exc: BaseException, flags: Mapping[str, str] | None = None) -> str:
    """A config that does not load, in one line: the setting (as the flag that sets it, when
    one does) and what it expects."""
    if not isinstance(exc, ValidationError):
        if isinstance(exc, OSError) and exc.filename:
            return f"--config {exc.filename}: {exc.strerror}"
        return _first_line(exc)
    errors = exc.errors()
    first = errors[0]
    key = ".".join(str(p) for p in first["loc"])
    name = (flags or {}).get(key, key) or "config"
    if first["type"] == "missing":
        field = AppConfig.model_fields.get(key)
        hint = field.description.rstrip(".") if field and field.description else ""
        what = "is required" + (f" ({hint[:1].lower() + hint[1:]})" if hint else "")
    elif first["type"] == "extra_forbidden":
        what = "is not a setting"
    else:
        message = first["msg"].removeprefix("Value error, ")
        what = message[:1].lower() + message[1:]
        if key and "got " not in what:
            what += f", got {_short(first.get('input'))}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{name}: {what}{more}"


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def host_name(text: str) -> str:
    """An IP address or a DNS name to bind or reach (a validator and an argparse type)."""
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit() or len(text) > 253:
        raise BadValue(f"expected an IP address or a host name, got {text!r}")
    return text


def is_loopback(host: str) -> bool:
    """A host only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.rstrip(".").lower() == "localhost"


def check_model_dir(model: str) -> None:
    """Commands that start engines on this machine need the model directory here."""
    if not Path(model, "config.json").is_file():
        raise ValueError(f"model: expected a model directory with a config.json, got {model!r} "
                         f"(`disagg model tiny DIR` builds a small one)")


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (an argparse type)."""
    if not text.isdigit() or int(text) > 65535:
        raise BadValue(f"expected a port number 0-65535, got {text!r}")
    return int(text)


def positive_seconds(text: str) -> float:
    """A duration in seconds, more than 0 (an argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise BadValue(f"expected seconds (a number above 0), got {text!r}")
    return value


def host_ports(text: str) -> str:
    """`host:port,host:port` or nothing (an argparse type)."""
    for item in (a.strip() for a in text.split(",") if a.strip()):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise BadValue(f"expected host:port[,host:port...], got {item!r}")
    return text


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:1]) or type(exc).__name__
