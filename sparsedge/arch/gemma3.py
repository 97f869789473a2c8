"""Gemma 3 text decoders (gemma-3-270m, 1b): GeGLU, sandwich norms, q/k norms, 5:1 local/global."""

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
    "layers.{i}.q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    # Unlike Llama, Gemma's "post_attention_layernorm" normalises the attention output.
    "layers.{i}.post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "layers.{i}.gate": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.up": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.down": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.post_ffn_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
}

_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}


def spec_from_hf(c: Any) -> ModelSpec:
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise SparsedgeError(f"Gemma 3 activation {act!r} is not supported")
    if getattr(c, "attn_logit_softcapping", None):
        raise SparsedgeError("attention logit soft-capping is not supported")
    if getattr(c, "use_bidirectional_attention", False):
        raise SparsedgeError("bidirectional Gemma 3 models are not supported")
    types = [_LAYER_TYPES[t] for t in c.layer_types]
    rp = getattr(c, "rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp:
        full, local = rope_params(c, "full_attention"), rope_params(c, "sliding_attention")
    else:  # transformers 4.x: rope_theta for global layers, rope_local_base_freq for local ones
        full = rope_params(c)
        local = {"rope_theta": getattr(c, "rope_local_base_freq", 10000.0), "rope_type": "default"}
    if local["rope_type"] != "default":
        raise SparsedgeError("RoPE scaling on Gemma 3 sliding-window layers is not supported")
    return ModelSpec(
        arch="gemma3",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_eps=float(c.rms_norm_eps),
        rope_theta=float(full["rope_theta"]),
        rope_linear_factor=float(full.get("factor", 1.0)) if full["rope_type"] == "linear" else 1.0,
        rope_theta_local=float(local["rope_theta"]),
        sliding_window=int(c.sliding_window),
        layer_types=types,
        act="gelu_tanh",
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        norm_offset=1.0,
        embed_scale=float(c.hidden_size) ** 0.5,
        qk_norm=True,
        sandwich_norm=True,
        attn_scale=float(c.query_pre_attn_scalar) ** -0.5,
        final_logit_softcap=getattr(c, "final_logit_softcapping", None),
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_ids=_eos_list(c),
    )


ARCH = register(Arch("gemma3", ("gemma3_text",), spec_from_hf, HF_NAMES))
