"""Qwen2 family (Qwen2, Qwen2.5, Qwen2.5-Coder): Llama's pre-norm SwiGLU GQA decoder plus additive
biases on the q, k and v projections (none on o_proj or in the MLP)."""

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
    # [n_heads * head_dim], [n_kv_heads * head_dim], [n_kv_heads * head_dim]
    "layers.{i}.q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.o": "model.layers.{i}.self_attn.o_proj.weight",
    # as in Llama, "post_attention_layernorm" is the norm in front of the FFN
    "layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.gate": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.up": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.down": "model.layers.{i}.mlp.down_proj.weight",
}


def _check_sliding_window(c: Any) -> None:
    """Qwen2 configs carry a sliding window that is off in every released Qwen2.5 model. With
    use_sliding_window on, layers from max_window_layers up attend to the last sliding_window
    positions only; a window that covers the whole context is full attention, anything smaller is
    refused (the GGUF writer and llama.cpp's qwen2 graph know no sliding window)."""
    if not getattr(c, "use_sliding_window", False):
        return
    window = getattr(c, "sliding_window", None)
    types = getattr(c, "layer_types", None)
    if types is None:  # transformers 4.x before layer_types: sliding from max_window_layers up
        first = getattr(c, "max_window_layers", c.num_hidden_layers)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(c.num_hidden_layers)]
    ctx = getattr(c, "max_position_embeddings", None)
    if window and "sliding_attention" in types and (ctx is None or window < ctx):
        raise SparsedgeError(
            f"Qwen2 sliding-window attention (window {window} < context {ctx}) is not supported"
        )


def spec_from_hf(c: Any) -> ModelSpec:
    if getattr(c, "hidden_act", "silu") != "silu":
        raise SparsedgeError(f"Qwen2 activation {c.hidden_act!r} is not supported (only silu)")
    _check_sliding_window(c)
    rp = rope_params(c)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelSpec(
        arch="qwen2",
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
        qkv_bias=True,
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_ids=_eos_list(c),
    )


ARCH = register(Arch("qwen2", ("qwen2",), spec_from_hf, HF_NAMES))
