"""Builds a small, seeded, random-weight Llama that vLLM loads offline.

No model can be downloaded here, so the demo, the tests and the benchmarks use one we make: a
Llama config, safetensors weights drawn from a seeded generator, a byte-level BPE tokenizer
trained locally with `tokenizers`, and a chat template. The same seed gives the same model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype: str


# "tiny" is for tests (a few MB, loads in seconds); "bench" (~100M parameters) makes a long
# prefill take hundreds of milliseconds on one core, which is when disaggregation matters.
SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=512, dtype="float32"),
    "bench": ModelSize(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2560, vocab=2048, dtype="bfloat16"),
}


def _corpus() -> list[str]:
    """English-like training text for the tokenizer: deterministic and shipped with Python."""
    import codecs
    import contextlib
    import io
    import keyword

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
        import this
    zen = codecs.decode(this.s, "rot13")
    words = " ".join(keyword.kwlist)
    filler = (
        "The quick brown fox jumps over the lazy dog. Prefill computes the prompt; decode "
        "streams the answer. Key and value blocks move between workers over UCX. "
        "You are a helpful assistant. Please answer the question about the document below. "
        "0123456789 + - * / = ( ) [ ] { } , . ; : ! ? ' \" "
    )
    return [zen, words, filler] * 20


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _weights(size: ModelSize, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head_dim = size.hidden // size.heads
    std = 0.02

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": normal(vocab, size.hidden),
        "model.norm.weight": np.ones(size.hidden, np.float32),
        "lm_head.weight": normal(vocab, size.hidden),
    }
    for i in range(size.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(size.hidden, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(size.hidden, np.float32)
        w[p + "self_attn.q_proj.weight"] = normal(size.heads * head_dim, size.hidden)
        w[p + "self_attn.k_proj.weight"] = normal(size.kv_heads * head_dim, size.hidden)
        w[p + "self_attn.v_proj.weight"] = normal(size.kv_heads * head_dim, size.hidden)
        w[p + "self_attn.o_proj.weight"] = normal(size.hidden, size.heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = normal(size.intermediate, size.hidden)
        w[p + "mlp.up_proj.weight"] = normal(size.intermediate, size.hidden)
        w[p + "mlp.down_proj.weight"] = normal(size.hidden, size.intermediate)
    return w


def _save_weights(weights: dict[str, np.ndarray], dtype: str, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    save_file({k: torch.from_numpy(v).to(torch_dtype).contiguous() for k, v in weights.items()}, str(path))


def build_tiny_model(out_dir: str | Path, size: str = "tiny", seed: int = 0, max_position: int = 4096) -> Path:
    """Write a loadable Llama model directory; returns its path. Rebuilding with the same
    arguments gives byte-identical weights."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = _train_tokenizer(spec.vocab)
    vocab = tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.hidden // spec.heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab,
        "bos_token_id": ids["<s>"],
        "eos_token_id": ids["</s>"],
        "tie_word_embeddings": False,
        "torch_dtype": spec.dtype,
        "attention_bias": False,
        "mlp_bias": False,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"]}, indent=2)
    )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_position,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, indent=2)
    )
    _save_weights(_weights(spec, vocab, seed), spec.dtype, out / "model.safetensors")
    return out
