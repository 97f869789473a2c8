"""Llama family (Llama 2/3 without RoPE scaling, SmolLM2, TinyLlama): pre-norm, SwiGLU, GQA."""

from __future__ import annotations

from typing import Any

from ..errors import SparsedgeError
from . import Arch, ModelSpec, _eos_list, register, rope_params

HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.q": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.k": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.v": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.o": "model.layers.{i}.self_attn.o_proj.weight",
    # Llama's "post_attention_layernorm" is the norm in front of the FFN.
    "layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.gate": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.up": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.down": "model.layers.{i}.mlp.down_proj.weight",
}


def llama_like_fields(c: Any) -> dict[str, Any]:
    """ModelSpec fields of a Llama-shaped transformers config (Llama, Qwen2): every field but arch."""
    rp = rope_params(c)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim,
        rms_eps=float(c.rms_norm_eps),
        rope_theta=float(rp["rope_theta"]),
        rope_linear_factor=float(rp.get("factor", 1.0)) if rp["rope_type"] == "linear" else 1.0,
        act="silu",
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_ids=_eos_list(c),
    )


def spec_from_hf(c: Any) -> ModelSpec:
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise SparsedgeError("Llama models with attention or MLP biases are not supported")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise SparsedgeError(f"Llama activation {c.hidden_act!r} is not supported (only silu)")
    return ModelSpec(arch="llama", **llama_like_fields(c))


ARCH = register(Arch("llama", ("llama",), spec_from_hf, HF_NAMES))
