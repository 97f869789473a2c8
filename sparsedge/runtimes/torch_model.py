"""A small decoder definition in torch for every architecture in sparsedge.arch, driven by ModelSpec.

Why our own and not transformers' modules: the reference runtime needs a per-token tree mask over
a KV cache, arbitrary positions, in-place cache compaction (``keep``) and named points where a
sparsity recipe acts (``SITES``). Tests pin it to transformers' logits on tiny random configs.

Batch size is 1 throughout: activations are [k, hidden] for the k new tokens.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..arch import ModelSpec
from ..errors import SparsedgeError

# Where a sparsity recipe can act, per layer. Each is the input of one or more linear layers,
# except gate_act, the activated gate (|SiLU(gate(x))| for CATS / CHESS), which masks up and down.
#   qkv_in  [k, hidden]         input of q_proj, k_proj, v_proj
#   q_in    [k, hidden]         input of q_proj alone (CHESS leaves k_proj / v_proj dense)
#   o_in    [k, heads*head_dim] input of o_proj
#   ffn_in  [k, hidden]         input of gate_proj, up_proj
#   gate_act[k, ffn]            act(gate(x)), before the product with up(x)
#   down_in [k, ffn]            input of down_proj
SITES = ("qkv_in", "q_in", "o_in", "ffn_in", "gate_act", "down_in")

# A hook takes (layer index, activation) and returns the activation to use (same shape).
Hook = Callable[[int, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    # computed in float32 like transformers, whatever the weight dtype
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (w.float() + offset)).to(x.dtype)


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float, factor: float) -> torch.Tensor:
    """Rotate-half RoPE (transformers' layout). x [k, heads, head_dim], pos [k]."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = (pos.to(torch.float32) / factor)[:, None] * inv[None, :]  # [k, hd/2]
    emb = torch.cat([ang, ang], dim=-1)[:, None, :]  # [k, 1, hd]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos + rot * sin


_ACTS: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class KVCache:
    """Per-layer K and V, [kv_heads, capacity, head_dim], plus the position of every entry."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, capacity: int = 256):
        self.spec, self.dtype = spec, dtype
        self.n = 0
        self._alloc(capacity)

    def _alloc(self, cap: int) -> None:
        s = self.spec
        shape = (s.n_kv_heads, cap, s.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype) for _ in range(s.n_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype) for _ in range(s.n_layers)]
        self.pos = torch.zeros(cap, dtype=torch.int64)
        self.cap = cap

    def reserve(self, n: int) -> None:
        if n <= self.cap:
            return
        old_k, old_v, old_pos, used = self.k, self.v, self.pos, self.n
        self._alloc(max(n, 2 * self.cap))
        for i in range(self.spec.n_layers):
            self.k[i][:, :used] = old_k[i][:, :used]
            self.v[i][:, :used] = old_v[i][:, :used]
        self.pos[:used] = old_pos[:used]

    @torch.inference_mode()  # buffers grown inside forward() are inference tensors
    def compact(self, start: int, idx: torch.Tensor) -> None:
        """Move entries start+idx to start, start+1, ... (idx: [m] int64)."""
        src = start + idx
        dst = slice(start, start + idx.numel())
        for i in range(self.spec.n_layers):
            self.k[i][:, dst] = self.k[i][:, src]
            self.v[i][:, dst] = self.v[i][:, src]
        self.pos[dst] = self.pos[src]


class Decoder(torch.nn.Module):
    """The decoder of any registered architecture. Weights use canonical names (sparsedge.arch)."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]):
        super().__init__()
        self.spec = spec
        if spec.act not in _ACTS:
            raise SparsedgeError(f"activation {spec.act!r} is not supported by the torch runtime")
        self.act = _ACTS[spec.act]
        self.w: dict[str, torch.Tensor] = dict(weights)
        if "lm_head" not in self.w:
            if not spec.tie_embeddings:
                raise SparsedgeError("model has no lm_head and does not tie embeddings")
            self.w["lm_head"] = self.w["embed"]
        # hooks[site] applies to every layer; installed by a sparsity recipe or a calibrator
        self.hooks: dict[str, Hook] = {}
        self.skip: frozenset[int] = frozenset()  # layers not computed (self-speculative drafting)

    def _hook(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        h = self.hooks.get(site)
        return x if h is None else h(layer, x)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """tokens [k], pos [k], mask bool [k, k] over the new tokens; returns logits [k, vocab].

        Appends k entries to ``cache`` (which must already hold cache.n earlier entries, all visible).
        """
        s, w = self.spec, self.w
        k = tokens.shape[0]
        start = cache.n
        cache.reserve(start + k)
        total = start + k
        cache.pos[start:total] = pos
        # visibility [k, total]: every earlier entry, plus the tree mask over the new ones
        vis = torch.ones(k, total, dtype=torch.bool)
        vis[:, start:] = mask
        x = F.embedding(tokens, w["embed"])
        if s.embed_scale != 1.0:
            x = x * torch.tensor(s.embed_scale, dtype=x.dtype)
        nh, nkv, hd = s.n_heads, s.n_kv_heads, s.head_dim
        for i in range(s.n_layers):
            if i in self.skip:
                continue
            p = f"layers.{i}."
            h = rms_norm(x, w[p + "attn_norm"], s.rms_eps, s.norm_offset)
            h = self._hook("qkv_in", i, h)
            q = self._hook("q_in", i, h) @ w[p + "q"].T  # [k, nh*hd]
            kk = h @ w[p + "k"].T  # [k, nkv*hd]
            v = h @ w[p + "v"].T  # [k, nkv*hd]
            if s.qkv_bias:  # Qwen2: biases before RoPE (they rotate with q and k)
                q, kk, v = q + w[p + "q_bias"], kk + w[p + "k_bias"], v + w[p + "v_bias"]
            q, kk, v = q.view(k, nh, hd), kk.view(k, nkv, hd), v.view(k, nkv, hd)
            if s.qk_norm:
                q = rms_norm(q, w[p + "q_norm"], s.rms_eps, s.norm_offset)
                kk = rms_norm(kk, w[p + "k_norm"], s.rms_eps, s.norm_offset)
            theta = s.theta(i)
            q = rope(q, pos, theta, s.rope_linear_factor)
            kk = rope(kk, pos, theta, s.rope_linear_factor)
            cache.k[i][:, start:total] = kk.transpose(0, 1)
            cache.v[i][:, start:total] = v.transpose(0, 1)
            allowed = vis
            win = s.window(i)
            if win is not None:  # sliding window by position: key visible if q_pos - k_pos < window
                allowed = vis & ((pos[:, None] - cache.pos[None, :total]) < win)
            keys = cache.k[i][:, :total].repeat_interleave(nh // nkv, dim=0)  # [nh, total, hd]
            vals = cache.v[i][:, :total].repeat_interleave(nh // nkv, dim=0)
            a = F.scaled_dot_product_attention(
                q.transpose(0, 1), keys, vals, attn_mask=allowed[None], scale=s.scale
            )  # [nh, k, hd]
            a = a.transpose(0, 1).reshape(k, nh * hd)
            a = self._hook("o_in", i, a)
            a = a @ w[p + "o"].T
            if s.sandwich_norm:
                a = rms_norm(a, w[p + "post_attn_norm"], s.rms_eps, s.norm_offset)
            x = x + a
            h = rms_norm(x, w[p + "ffn_norm"], s.rms_eps, s.norm_offset)
            h = self._hook("ffn_in", i, h)
            g = self._hook("gate_act", i, self.act(h @ w[p + "gate"].T))
            m = self._hook("down_in", i, g * (h @ w[p + "up"].T))
            f = m @ w[p + "down"].T
            if s.sandwich_norm:
                f = rms_norm(f, w[p + "post_ffn_norm"], s.rms_eps, s.norm_offset)
            x = x + f
        cache.n = total
        x = rms_norm(x, w["norm"], s.rms_eps, s.norm_offset)
        logits = x @ w["lm_head"].T
        if s.final_logit_softcap:
            c = s.final_logit_softcap
            logits = torch.tanh(logits / c) * c
        return logits.float()


def required_names(spec: ModelSpec) -> list[str]:
    names = ["embed", "norm"] + ([] if spec.tie_embeddings else ["lm_head"])
    per = ["attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down"]
    if spec.qk_norm:
        per += ["q_norm", "k_norm"]
    if spec.sandwich_norm:
        per += ["post_attn_norm", "post_ffn_norm"]
    if spec.qkv_bias:
        per += ["q_bias", "k_bias", "v_bias"]
    names += [f"layers.{i}.{n}" for i in range(spec.n_layers) for n in per]
    return names


def check_shapes(spec: ModelSpec, w: Mapping[str, torch.Tensor]) -> None:
    """Every tensor the spec needs is there with the shape it implies."""
    H, I, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    expect = {
        "embed": (spec.vocab_size, H), "norm": (H,), "lm_head": (spec.vocab_size, H),
        "attn_norm": (H,), "ffn_norm": (H,), "post_attn_norm": (H,), "post_ffn_norm": (H,),
        "q": (spec.n_heads * hd, H), "k": (spec.n_kv_heads * hd, H), "v": (spec.n_kv_heads * hd, H),
        "o": (H, spec.n_heads * hd), "q_norm": (hd,), "k_norm": (hd,),
        "q_bias": (spec.n_heads * hd,), "k_bias": (spec.n_kv_heads * hd,), "v_bias": (spec.n_kv_heads * hd,),
        "gate": (I, H), "up": (I, H), "down": (H, I),
    }
    for name in required_names(spec):
        if name not in w:
            raise SparsedgeError(f"weights lack tensor {name!r}")
        want = expect[name.rsplit(".", 1)[-1]]
        if tuple(w[name].shape) != want:
            raise SparsedgeError(f"tensor {name!r} has shape {tuple(w[name].shape)}, expected {want}")
    if not math.isfinite(spec.rms_eps):
        raise SparsedgeError("rms_eps is not finite")
