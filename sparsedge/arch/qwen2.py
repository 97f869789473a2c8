"""Qwen2 family (Qwen2, Qwen2.5, Qwen2.5-Coder): Llama's pre-norm SwiGLU GQA decoder plus additive
biases on the q, k and v projections (none on o_proj or in the MLP)."""

from __future__ import annotations

from typing import Any

from ..errors import SparsedgeError
from . import Arch, ModelSpec, register
from .llama import HF_NAMES as LLAMA_NAMES
from .llama import llama_like_fields

HF_NAMES = {
    **LLAMA_NAMES,
    # [n_heads * head_dim], [n_kv_heads * head_dim], [n_kv_heads * head_dim]
    "layers.{i}.q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.v_bias": "model.layers.{i}.self_attn.v_proj.bias",
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
    return ModelSpec(arch="qwen2", qkv_bias=True, **llama_like_fields(c))


ARCH = register(Arch("qwen2", ("qwen2",), spec_from_hf, HF_NAMES))
