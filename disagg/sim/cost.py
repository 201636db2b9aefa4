"""The cost model: how long an engine step takes, how many KV blocks an engine holds, and how long
moving a prompt's KV between engines takes. One JSON file per engine and machine: `disagg profile`
measures one, published GPU figures ship in `disagg/sim/profiles/`, and `disagg simulate` and
`disagg plan` read them.

A step of a vLLM engine runs one batch: prompt chunks (`prefill`) and one token for each decoding
sequence (`decode`), timed as

    step_s = max(prefill.base_s, decode.base_s)                  (whichever parts the step has)
           + prefill.per_token_s     * prompt tokens computed
           + prefill.per_attention_s * sum over chunks of (cached + new)^2 - cached^2
           + decode.per_seq_s        * decoding sequences
           + decode.per_context_token_s * their context tokens

all times `stack.step_scale` (1 but on a machine whose cores the stack's other processes share).

A chunk of `new` tokens after `cached` ones attends to the (cached + new)^2 - cached^2 cells of
the causal mask (twice its area): with nothing cached it is new^2, DistServe's quadratic term.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

PROFILES = Path(__file__).parent / "profiles"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class PrefillCost(_Model):
    base_s: float = Field(ge=0)
    per_token_s: float = Field(ge=0)
    per_attention_s: float = Field(ge=0)


class DecodeCost(_Model):
    base_s: float = Field(ge=0)
    per_seq_s: float = Field(ge=0)
    per_context_token_s: float = Field(ge=0)


class TransferCost(_Model):
    """Moving `n` bytes of KV between two engines takes latency_s + n / bandwidth_bytes_s."""

    latency_s: float = Field(ge=0)
    bandwidth_bytes_s: float = Field(gt=0)

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_s


class FitError(_Model):
    """How far the fitted line is from the points it was fitted on."""

    points: int
    rms_relative: float  # root mean square of (fit - measured) / measured
    max_relative: float


class EngineLimits(_Model):
    """vLLM's scheduler limits: a step's token budget, its sequences, and the KV cache."""

    block_size: int = Field(ge=1)
    num_blocks: int = Field(ge=1)
    max_num_seqs: int = Field(ge=1)
    max_num_batched_tokens: int = Field(ge=1)


class StackCost(_Model):
    """Time our stack adds around the engines, per request (not per token)."""

    request_s: float = Field(0.0, ge=0, description="client to router to decode: parse, tokenize, pick, hand over")
    prefill_call_s: float = Field(0.0, ge=0, description="decode's call to a prefill worker, and its answer")
    stream_s: float = Field(0.0, ge=0, description="a token from the decode engine to the client")
    step_scale: float = Field(1.0, gt=0, description="engine steps in the stack take this times the engine's alone")
    kv_lease_s: float = Field(30.0, gt=0, description="a prefill keeps handed-off blocks this long unread")


class CostModel(_Model):
    name: str
    model: str
    hardware: str
    dtype: str
    kv_bytes_per_token: int = Field(ge=1)
    prefill: PrefillCost
    decode: DecodeCost
    limits: EngineLimits
    transfer: dict[str, TransferCost]
    backend: str = Field(description="the transfer backend simulations use")
    stack: StackCost = Field(default_factory=StackCost)
    fit: dict[str, FitError] = Field(default_factory=dict)
    sources: dict[str, str] = Field(default_factory=dict, description="where each number comes from")
    # The measured points the fits came from (a profile measured here): name -> rows of numbers.
    points: dict[str, list[list[float]]] = Field(default_factory=dict)

    def step_s(self, prefill_tokens: int, attention: int, decode_seqs: int, context_tokens: int) -> float:
        """One engine step's seconds (the module docstring's formula)."""
        p, d = self.prefill, self.decode
        base = max(p.base_s if prefill_tokens else 0.0, d.base_s if decode_seqs else 0.0)
        return self.stack.step_scale * (base + p.per_token_s * prefill_tokens + p.per_attention_s * attention
                                        + d.per_seq_s * decode_seqs + d.per_context_token_s * context_tokens)

    def transfer_s(self, tokens: int) -> float:
        """Seconds to move `tokens` tokens of KV over the simulated backend."""
        return self.transfer[self.backend].seconds(tokens * self.kv_bytes_per_token)

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        """A profile file, or the name of a shipped one (`a100-opt-13b`)."""
        p = Path(path)
        if not p.exists() and (PROFILES / f"{path}.json").exists():
            p = PROFILES / f"{path}.json"
        return cls.model_validate_json(p.read_text())

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.model_dump_json(indent=1) + "\n")


def attention(cached: int, new: int) -> int:
    """The prefill attention term of a chunk of `new` tokens after `cached` ones."""
    return (cached + new) ** 2 - cached ** 2
