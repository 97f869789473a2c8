"""Architectures: a typed, serialisable spec of the decoder and the tensor-name map of each family.

One flat module per architecture (llama.py, gemma3.py, qwen2.py) registers itself here with
``register(model_types)``. A module provides

- ``spec_from_hf(config) -> ModelSpec``: the hyper-parameters from a transformers config;
- ``HF_NAMES``: canonical tensor name -> Hugging Face state-dict name, as a data table.

Everything downstream (the torch reference, the GGUF writer, the native engine) speaks the
canonical names and the ModelSpec, never a family's own spelling.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import SparsedgeError

SPEC_VERSION = 1


@dataclass
class ModelSpec:
    """Everything a runtime needs to run a decoder, and nothing about where the weights came from."""

    arch: str  # registry key: "llama" | "gemma3" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float  # rotary base of full-attention layers
    act: str  # "silu" | "gelu_tanh"
    tie_embeddings: bool = True
    rope_theta_local: float | None = None  # rotary base of sliding-window layers (Gemma 3)
    rope_linear_factor: float = 1.0  # linear RoPE scaling: positions / factor
    sliding_window: int | None = None
    # "full" or "sliding", one per layer
    layer_types: list[str] = field(default_factory=list)
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden)
    qk_norm: bool = False  # per-head RMSNorm of q and k (Gemma 3)
    sandwich_norm: bool = False  # extra norms after attention and after the FFN (Gemma 2/3)
    # additive biases of q, k and v (Qwen2): [n_heads * head_dim], [n_kv_heads * head_dim] twice,
    # added before RoPE; o_proj and the FFN have none
    qkv_bias: bool = False
    attn_scale: float | None = None  # None: head_dim ** -0.5
    final_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = ["full"] * self.n_layers
        if len(self.layer_types) != self.n_layers:
            raise SparsedgeError(
                f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers"
            )
        if self.n_heads % self.n_kv_heads:
            raise SparsedgeError(f"{self.n_heads} heads do not divide into {self.n_kv_heads} KV heads")

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def theta(self, layer: int) -> float:
        if self.layer_types[layer] == "sliding" and self.rope_theta_local is not None:
            return self.rope_theta_local
        return self.rope_theta

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        if d.get("version", SPEC_VERSION) > SPEC_VERSION:
            raise SparsedgeError(f"model spec version {d['version']} is newer than this sparsedge")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SparsedgeError(f"unknown model spec fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class Arch:
    name: str
    model_types: tuple[str, ...]
    spec_from_hf: Callable[[Any], ModelSpec]
    hf_names: dict[str, str]  # canonical -> HF state-dict key; "{i}" stands for the layer index


_REGISTRY: dict[str, Arch] = {}
_BY_MODEL_TYPE: dict[str, Arch] = {}
# Imported lazily so that adding an architecture is one new module and one line here.
_MODULES = ("llama", "gemma3", "qwen2")


def register(arch: Arch) -> Arch:
    if arch.name in _REGISTRY:
        raise ValueError(f"architecture {arch.name!r} registered twice")
    _REGISTRY[arch.name] = arch
    for mt in arch.model_types:
        _BY_MODEL_TYPE[mt] = arch
    return arch


def _load_all() -> None:
    # every module, not only while the registry is empty: one architecture module may import
    # another (qwen2 builds on llama), which would leave the registry partly filled
    if len(_REGISTRY) < len(_MODULES):
        for m in _MODULES:
            importlib.import_module(f"{__name__}.{m}")


def supported_model_types() -> list[str]:
    _load_all()
    return sorted(_BY_MODEL_TYPE)


def get(name: str) -> Arch:
    _load_all()
    if name not in _REGISTRY:
        raise SparsedgeError(f"unknown architecture {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def for_hf_config(config: Any) -> Arch:
    """The architecture of a transformers config, or a clear error naming what is supported."""
    _load_all()
    mt = getattr(config, "model_type", None)
    if mt not in _BY_MODEL_TYPE:
        raise SparsedgeError(
            f"architecture {mt!r} is not supported (supported model types: "
            f"{', '.join(supported_model_types())})"
        )
    return _BY_MODEL_TYPE[mt]


def spec_from_hf(config: Any) -> ModelSpec:
    return for_hf_config(config).spec_from_hf(config)


def layer_names(arch: Arch, n_layers: int) -> dict[str, str]:
    """Expand the per-layer "{i}" templates: canonical name -> HF name for every tensor."""
    out: dict[str, str] = {}
    for canon, hf in arch.hf_names.items():
        if "{i}" in canon:
            for i in range(n_layers):
                out[canon.format(i=i)] = hf.format(i=i)
        else:
            out[canon] = hf
    return out


def canonical_weights(spec: ModelSpec, hf_state_dict) -> dict:
    """Canonical-name tensors from a transformers state dict (a tied lm_head is left out)."""
    names = layer_names(get(spec.arch), spec.n_layers)
    out = {c: hf_state_dict[h].detach().contiguous() for c, h in names.items() if h in hf_state_dict}
    if spec.tie_embeddings:
        out.pop("lm_head", None)
    return out


def _eos_list(config: Any) -> list[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def rope_params(config: Any, kind: str | None = None) -> dict[str, Any]:
    """Rotary parameters from a transformers config (v5 `rope_parameters` or v4 `rope_theta`)."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and kind is not None and kind in rp:
        rp = rp[kind]
    if isinstance(rp, dict) and "rope_theta" in rp:
        params = dict(rp)
    else:
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0)}
        scaling = getattr(config, "rope_scaling", None)
        if scaling:
            params.update(scaling)
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if rtype not in ("default", "linear"):
        raise SparsedgeError(f"RoPE scaling {rtype!r} is not supported (supported: default, linear)")
    params["rope_type"] = rtype
    return params
