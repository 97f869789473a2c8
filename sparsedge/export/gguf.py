"""GGUF writer: a LoadedModel (and optional sparsity recipe) -> one llama.cpp-loadable .gguf file.

    write_gguf(loaded, path, quant="q4_0", weights=None, recipe=None) -> report dict

One flat class per architecture (Llama, Gemma 3, Qwen2) overrides three hooks: ``check`` (refuse
what llama.cpp would compute differently), ``hparams`` (metadata keys) and ``to_gguf`` (a weight's
layout in llama.cpp: Llama's rotary permutation of q/k, Gemma's (1 + w) norms). Tensor names are a
data table canonical name -> gguf-py MODEL_TENSOR (".bias" for biases), checked against gguf-py's
list of the tensors llama.cpp loads for the architecture, so the file never carries a tensor
llama.cpp does not expect (DESIGN.md §2). The recipe travels as JSON under ``sparsedge.recipe``;
llama.cpp ignores it and runs the (neuron-permuted, when chunked) dense weights.

The file is written under a temporary name in the destination folder and renamed at the end: a
failed or interrupted write leaves nothing at ``path`` (and an older file there untouched).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm

from ..arch import ModelSpec
from ..errors import SparsedgeError
from ..quantize.gguf import (
    check_quant, llamacpp_quantize, measure_file, quantize_tensor, report_entry, summarise, tensor_type,
)

RECIPE_KEY = "sparsedge.recipe"
VERSION_KEY = "sparsedge.version"

# canonical name -> gguf-py MODEL_TENSOR member ("{i}" is the layer index). A member names a
# ".weight" tensor; "MEMBER.bias" names the bias of the same layer (blk.N.attn_q.bias).
_COMMON = {
    "embed": "TOKEN_EMBD",
    "norm": "OUTPUT_NORM",
    "lm_head": "OUTPUT",
    "layers.{i}.attn_norm": "ATTN_NORM",
    "layers.{i}.q": "ATTN_Q",
    "layers.{i}.k": "ATTN_K",
    "layers.{i}.v": "ATTN_V",
    "layers.{i}.o": "ATTN_OUT",
    "layers.{i}.gate": "FFN_GATE",
    "layers.{i}.up": "FFN_UP",
    "layers.{i}.down": "FFN_DOWN",
}
LLAMA_TENSORS = {**_COMMON, "layers.{i}.ffn_norm": "FFN_NORM"}
GEMMA3_TENSORS = {
    **_COMMON,
    "layers.{i}.q_norm": "ATTN_Q_NORM",
    "layers.{i}.k_norm": "ATTN_K_NORM",
    "layers.{i}.post_attn_norm": "ATTN_POST_NORM",
    "layers.{i}.ffn_norm": "FFN_PRE_NORM",
    "layers.{i}.post_ffn_norm": "FFN_POST_NORM",
}
QWEN2_TENSORS = {
    **LLAMA_TENSORS,
    "layers.{i}.q_bias": "ATTN_Q.bias",
    "layers.{i}.k_bias": "ATTN_K.bias",
    "layers.{i}.v_bias": "ATTN_V.bias",
}


def rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF q/k rows (per head: the first half of the rotary pairs, then the second half) -> llama.cpp's
    interleaved pairs (x0, x_{d/2}, x1, x_{d/2+1}, ...). w: [n_heads * head_dim, in]."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def rope_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of ``rope_permute``."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Canonical name -> torch shape ([out, in] for linear weights) of every weight of ``spec``."""
    h, f, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    per_layer = {
        "attn_norm": (h,), "ffn_norm": (h,),
        "q": (spec.n_heads * hd, h), "k": (spec.n_kv_heads * hd, h), "v": (spec.n_kv_heads * hd, h),
        "o": (h, spec.n_heads * hd),
        "gate": (f, h), "up": (f, h), "down": (h, f),
    }
    if spec.qk_norm:
        per_layer.update(q_norm=(hd,), k_norm=(hd,))
    if spec.sandwich_norm:
        per_layer.update(post_attn_norm=(h,), post_ffn_norm=(h,))
    if spec.qkv_bias:
        per_layer.update(q_bias=(spec.n_heads * hd,), k_bias=(spec.n_kv_heads * hd,), v_bias=(spec.n_kv_heads * hd,))
    out: dict[str, tuple[int, ...]] = {"embed": (spec.vocab_size, h), "norm": (h,)}
    if not spec.tie_embeddings:
        out["lm_head"] = (spec.vocab_size, h)
    for i in range(spec.n_layers):
        for k, s in per_layer.items():
            out[f"layers.{i}.{k}"] = s
    return out


class GGUFArch:
    """One architecture's GGUF spelling. Subclasses set ``name`` and ``tensors``, override hooks."""

    name: str = ""
    tensors: dict[str, str] = {}

    def check(self, spec: ModelSpec) -> None:
        """Raise SparsedgeError for what llama.cpp would compute differently from the torch reference."""

    def hparams(self, w, spec: ModelSpec, context_length: int) -> None:
        w.add_context_length(context_length)
        w.add_embedding_length(spec.hidden_size)
        w.add_block_count(spec.n_layers)
        w.add_feed_forward_length(spec.intermediate_size)
        w.add_head_count(spec.n_heads)
        w.add_head_count_kv(spec.n_kv_heads)
        w.add_layer_norm_rms_eps(spec.rms_eps)
        w.add_rope_freq_base(spec.rope_theta)
        w.add_vocab_size(spec.vocab_size)
        if spec.rope_linear_factor != 1.0:
            import gguf

            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(spec.rope_linear_factor)

    def to_gguf(self, canon: str, arr: np.ndarray, spec: ModelSpec) -> np.ndarray:
        return arr

    def gguf_names(self, spec: ModelSpec) -> dict[str, str]:
        """Canonical name -> GGUF tensor name for every weight of ``spec``, checked against the list
        of tensors llama.cpp loads for this architecture (gguf-py MODEL_TENSORS)."""
        import gguf

        allowed = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH[self.name.upper()]])
        out = {}
        for canon in expected_shapes(spec):
            template = "layers.{i}." + canon.split(".", 2)[2] if canon.startswith("layers.") else canon
            if template not in self.tensors:
                raise SparsedgeError(f"no GGUF name for {canon!r} in {self.name}")
            member, _, suffix = self.tensors[template].partition(".")
            t = gguf.MODEL_TENSOR[member]
            if t not in allowed:  # a table error, not a user error: llama.cpp would refuse the file
                raise AssertionError(f"llama.cpp's {self.name} does not load {t.name}")
            bid = int(canon.split(".")[1]) if canon.startswith("layers.") else None
            out[canon] = gguf.TENSOR_NAMES[t].format(bid=bid) + "." + (suffix or "weight")
        return out


def _refuse(cond: bool, what: str, arch: str) -> None:
    if cond:
        raise SparsedgeError(f"cannot write a {arch} GGUF: {what} (llama.cpp would compute another function)")


def _check_llama_like(spec: ModelSpec, arch: str) -> None:
    """What llama.cpp's Llama-shaped graphs (llama, qwen2) do not compute."""
    _refuse(spec.act != "silu", f"activation {spec.act}", arch)
    _refuse(spec.qk_norm or spec.sandwich_norm or spec.norm_offset != 0.0 or spec.embed_scale != 1.0,
            "Gemma-style norms or embedding scale", arch)
    _refuse(spec.attn_scale is not None and abs(spec.attn_scale * spec.head_dim**0.5 - 1) > 1e-6,
            f"attention scale {spec.attn_scale}", arch)
    _refuse(spec.final_logit_softcap is not None, "final logit soft-capping", arch)
    _refuse(spec.sliding_window is not None, "sliding-window attention", arch)


class LlamaGGUF(GGUFArch):
    name = "llama"
    tensors = LLAMA_TENSORS

    def check(self, spec: ModelSpec) -> None:
        _check_llama_like(spec, self.name)
        _refuse(spec.qkv_bias, "q/k/v biases", self.name)

    def hparams(self, w, spec: ModelSpec, context_length: int) -> None:
        super().hparams(w, spec, context_length)
        w.add_rope_dimension_count(spec.head_dim)
        if spec.head_dim * spec.n_heads != spec.hidden_size:
            w.add_key_length(spec.head_dim)
            w.add_value_length(spec.head_dim)

    def to_gguf(self, canon: str, arr: np.ndarray, spec: ModelSpec) -> np.ndarray:
        # llama.cpp's Llama graph uses the "normal" (interleaved) rotary layout
        if canon.endswith(".q"):
            return rope_permute(arr, spec.n_heads)
        if canon.endswith(".k"):
            return rope_permute(arr, spec.n_kv_heads)
        return arr


class Gemma3GGUF(GGUFArch):
    """Gemma 3 text decoders. llama.cpp's gemma3 graph uses NEOX rotary (the HF layout: no q/k
    permutation), multiplies embeddings by sqrt(hidden) itself, reads norms as plain w (so they are
    stored as 1 + w), and takes the attention scale from head_dim (n_embd / n_head at 62 layers)."""

    name = "gemma3"
    tensors = GEMMA3_TENSORS

    def check(self, spec: ModelSpec) -> None:
        _refuse(spec.act != "gelu_tanh", f"activation {spec.act}", self.name)
        _refuse(not (spec.qk_norm and spec.sandwich_norm and spec.norm_offset == 1.0),
                "norm layout other than Gemma 3's", self.name)
        _refuse(abs(spec.embed_scale - spec.hidden_size**0.5) > 1e-4 * spec.hidden_size**0.5,
                f"embedding scale {spec.embed_scale}", self.name)
        d = spec.hidden_size / spec.n_heads if spec.n_layers == 62 else spec.head_dim
        _refuse(abs(spec.scale * d**0.5 - 1) > 1e-6, f"attention scale {spec.scale} (llama.cpp uses {d}^-0.5)",
                self.name)
        _refuse(spec.final_logit_softcap is not None, "final logit soft-capping", self.name)
        _refuse(spec.qkv_bias, "q/k/v biases", self.name)

    def hparams(self, w, spec: ModelSpec, context_length: int) -> None:
        super().hparams(w, spec, context_length)
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
        if spec.sliding_window is not None and "sliding" in spec.layer_types:
            w.add_sliding_window(spec.sliding_window)
            # per layer, true = sliding window (llama.cpp otherwise assumes 5 local : 1 global)
            w.add_sliding_window_pattern([t == "sliding" for t in spec.layer_types])
            if spec.rope_theta_local is not None:
                w.add_rope_freq_base_swa(spec.rope_theta_local)

    def to_gguf(self, canon: str, arr: np.ndarray, spec: ModelSpec) -> np.ndarray:
        if arr.ndim == 1:  # every 1-D Gemma weight is an RMSNorm scale applied as (1 + w)
            return arr + np.float32(spec.norm_offset)
        return arr


class Qwen2GGUF(GGUFArch):
    """Qwen2 / Qwen2.5. llama.cpp's qwen2 graph is Llama's plus the q/k/v bias adds, but with NEOX
    rotary (rotate-half, the HF layout): q/k weights and their biases are stored as they are, with
    no rotary permutation (the base to_gguf). The biases are 1-D ([n_heads * head_dim],
    [n_kv_heads * head_dim]) and so stay F32 in every quant type, like the norms (tensor_type).
    The hparams are the base class's: llama.cpp's rope dimension and key length default to
    hidden / heads, which ``check`` requires."""

    name = "qwen2"
    tensors = QWEN2_TENSORS

    def check(self, spec: ModelSpec) -> None:
        _check_llama_like(spec, self.name)
        # llama.cpp's qwen2 shapes attn_q and attn_output as [hidden, hidden] and derives head_dim
        # as hidden / heads (the biases themselves are optional there)
        _refuse(spec.n_heads * spec.head_dim != spec.hidden_size,
                f"{spec.n_heads} heads of {spec.head_dim} for hidden size {spec.hidden_size}", self.name)


ARCHS: dict[str, GGUFArch] = {a.name: a for a in (LlamaGGUF(), Gemma3GGUF(), Qwen2GGUF())}


def gguf_arch(spec: ModelSpec) -> GGUFArch:
    if spec.arch not in ARCHS:
        raise SparsedgeError(f"no GGUF writer for architecture {spec.arch!r} (supported: {', '.join(ARCHS)})")
    return ARCHS[spec.arch]


# ----------------------------------------------------------------------------- tokenizer

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) by the steps of the HF pre-tokenizer they
# reproduce: ("ByteLevel", use_regex) | ("Digits", individual_digits) | ("Split", regex).
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# Qwen2 / Qwen2.5: Llama 3's split, but digits one by one (\p{N}, not \p{N}{1,3})
_QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
BPE_PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_REGEX), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_REGEX), ("ByteLevel", False)): "qwen2",
}


def _pre_steps(pt: Mapping[str, Any] | None) -> tuple:
    if pt is None:
        return ()
    if pt["type"] == "Sequence":
        return tuple(s for p in pt["pretokenizers"] for s in _pre_steps(p))
    if pt["type"] == "ByteLevel":
        return (("ByteLevel", bool(pt.get("use_regex", True))),)
    if pt["type"] == "Digits":
        return (("Digits", bool(pt.get("individual_digits", False))),)
    if pt["type"] == "Split":
        pat = pt.get("pattern", {})
        return (("Split", pat.get("Regex", pat.get("String"))),)
    return ((pt["type"], None),)


@dataclass
class TokenizerMeta:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) | "llama" (SentencePiece-style)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None


def _adds_special(tok: Any, which: str) -> bool:
    tid = getattr(tok, f"{which}_token_id", None)
    if tid is None:
        return False
    try:
        ids = tok("a", add_special_tokens=True)["input_ids"]
    except Exception:  # a tokenizer that cannot encode plain text has nothing to add either
        return False
    return bool(ids) and ids[0 if which == "bos" else -1] == tid


def tokenizer_meta(tok: Any, n_vocab: int, spec: ModelSpec | None = None) -> TokenizerMeta:
    """GGUF tokenizer metadata from a fast (tokenizers-backed) HF tokenizer."""
    import gguf

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise SparsedgeError("GGUF export needs a fast (tokenizer.json) tokenizer")
    j = json.loads(backend.to_str())
    model = j["model"]
    added = {int(a["id"]): a for a in j.get("added_tokens", [])}
    T = gguf.TokenType
    byte_level = any(s[0] == "ByteLevel" for s in _pre_steps(j.get("pre_tokenizer"))) or (
        (j.get("decoder") or {}).get("type") == "ByteLevel"
    )
    if model["type"] == "Unigram":
        pieces = {i: p for i, (p, _) in enumerate(model["vocab"])}
        scores_by_id = {i: float(s) for i, (_, s) in enumerate(model["vocab"])}
    elif model["type"] in ("BPE", "WordPiece", "WordLevel"):
        pieces = {int(i): p for p, i in model["vocab"].items()}
        scores_by_id = None
    else:
        raise SparsedgeError(f"tokenizer model {model['type']!r} is not supported for GGUF")
    for i, a in added.items():
        pieces[i] = a["content"]
    if pieces and max(pieces) >= n_vocab:
        raise SparsedgeError(f"the tokenizer has ids up to {max(pieces)} but the model only {n_vocab} embeddings")

    if model["type"] == "BPE" and byte_level and not model.get("byte_fallback"):
        kind = "gpt2"
        steps = _pre_steps(j.get("pre_tokenizer"))
        pre = BPE_PRE_TOKENIZERS.get(steps)
        if pre is None:
            raise SparsedgeError(f"no llama.cpp pre-tokenizer reproduces {steps}; cannot write its GGUF")
    elif model["type"] in ("BPE", "Unigram") and not byte_level:
        kind, pre = "llama", None  # SentencePiece-style (Llama 2, Gemma): "▁" for spaces, <0xNN> bytes
    else:
        raise SparsedgeError(f"a {model['type']} tokenizer without a byte-level or SentencePiece layout "
                             "is not supported for GGUF")

    unk = getattr(tok, "unk_token_id", None)
    tokens, types, scores = [], [], []
    n_normal = 0
    for i in range(n_vocab):
        p = pieces.get(i)
        if p is None:  # embedding rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(p)
            if i in added:
                types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
            elif i == unk:
                types.append(T.UNKNOWN)
            elif kind == "llama" and len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
                types.append(T.BYTE)
            else:
                types.append(T.NORMAL)
        if kind == "llama":
            # Unigram keeps its piece scores. For BPE-type SentencePiece (Gemma, Llama 2) a normal
            # piece scores -(its rank among normal pieces), so earlier merges win, bytes 0 and every
            # other piece -1000, as in SentencePiece's own model files.
            if types[-1] == T.NORMAL:
                scores.append(scores_by_id.get(i, 0.0) if scores_by_id is not None else -float(n_normal))
                n_normal += 1
            else:
                scores.append(0.0 if types[-1] == T.BYTE else -1000.0)

    merges = []
    if kind == "gpt2":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    special = {}
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{name}_token_id", None)
        if tid is None and spec is not None:
            tid = spec.bos_token_id if name == "bos" else (spec.eos_token_ids[0] if name == "eos" and
                                                           spec.eos_token_ids else None)
        if tid is not None and 0 <= int(tid) < n_vocab:
            special[name] = int(tid)

    add_space_prefix = False
    if kind == "llama":
        norm = json.dumps(j.get("normalizer"))
        pt = j.get("pre_tokenizer") or {}
        add_space_prefix = '"Prepend"' in norm or (
            pt.get("type") == "Metaspace" and pt.get("prepend_scheme", "always") in ("always", "first")
        )
    tmpl = getattr(tok, "chat_template", None)
    return TokenizerMeta(
        model=kind, pre=pre, tokens=tokens, types=[int(t) for t in types],
        scores=scores if kind == "llama" else None, merges=merges, special=special,
        add_bos=_adds_special(tok, "bos"), add_eos=_adds_special(tok, "eos"),
        add_space_prefix=add_space_prefix, chat_template=tmpl if isinstance(tmpl, str) else None,
    )


def _add_tokenizer(w, meta: TokenizerMeta) -> None:
    import gguf

    w.add_tokenizer_model(meta.model)
    if meta.pre:
        w.add_tokenizer_pre(meta.pre)
    w.add_token_list(meta.tokens)
    w.add_token_types(meta.types)
    if meta.scores is not None:
        w.add_token_scores(meta.scores)
    if meta.model == "gpt2":
        # llama.cpp requires the key even when a tiny BPE learned no merges (an empty array)
        w.add_key_value(gguf.Keys.Tokenizer.MERGES, list(meta.merges), gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType.STRING)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id}
    for name, tid in meta.special.items():
        adders[name](tid)
    w.add_add_bos_token(meta.add_bos)
    w.add_add_eos_token(meta.add_eos)
    w.add_add_space_prefix(meta.add_space_prefix)
    if meta.chat_template:
        w.add_chat_template(meta.chat_template)


# ----------------------------------------------------------------------------- writer


def _writer_class():
    import gguf

    class Writer(gguf.GGUFWriter):
        """gguf-py refuses empty arrays; GGUF and llama.cpp accept them (a BPE without merges)."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def _context_length(loaded: Any) -> int:
    cfg = getattr(loaded, "hf_config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    if n is None and getattr(loaded, "path", None) is not None:
        p = Path(loaded.path) / "config.json"
        if p.is_file():
            n = json.loads(p.read_text()).get("max_position_embeddings")
    return int(n or 4096)


def _model_name(loaded: Any) -> str:
    name = str(getattr(loaded, "name", "") or "model")
    return Path(name).name if ("/" in name or os.sep in name) and Path(name).exists() else name


def _as_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(t, dtype=np.float32)


def _gguf_weights(spec: ModelSpec, arch: GGUFArch, weights: Mapping[str, Any]) -> dict[str, tuple[str, np.ndarray]]:
    """Canonical name -> (GGUF name, fp32 array in llama.cpp's layout), validating every weight."""
    shapes, names = expected_shapes(spec), arch.gguf_names(spec)
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise SparsedgeError(f"weights lack {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    out = {}
    for canon, shape in shapes.items():
        arr = _as_numpy(weights[canon])
        if arr.shape != shape:
            raise SparsedgeError(f"weight {canon} has shape {tuple(arr.shape)}, expected {shape}")
        if not np.isfinite(arr).all():
            raise SparsedgeError(f"weight {canon} holds NaN or inf values")
        out[canon] = (names[canon], arch.to_gguf(canon, arr, spec))
    return out


def write_gguf(
    loaded: Any,
    path: str | Path,
    quant: str = "f32",
    weights: Mapping[str, Any] | None = None,
    recipe: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``loaded`` (its spec, tokenizer, and ``weights`` or its own state dict) as a GGUF at
    ``path`` in quant type ``quant``. Returns a report: quant, file type, bytes, seconds, and the
    quantization error per tensor with its summary."""
    import gguf

    from .. import __version__

    q = check_quant(quant)
    spec: ModelSpec = loaded.spec
    arch = gguf_arch(spec)
    arch.check(spec)
    path = Path(path).expanduser()
    if path.is_dir():
        raise SparsedgeError(f"{path} is a folder; give the .gguf file to write")
    if recipe is not None:
        recipe.validate(spec)
    tok_meta = tokenizer_meta(loaded.tokenizer, spec.vocab_size, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp_src = tmp.with_name(tmp.name + ".f32") if q.via_llamacpp else None
    try:
        w_src = weights if weights is not None else loaded.state_dict()
        tensors = _gguf_weights(spec, arch, w_src)
        writer = _writer_class()(str(tmp_src or tmp), arch.name)
        writer.add_type("model")
        writer.add_name(_model_name(loaded))
        arch.hparams(writer, spec, _context_length(loaded))
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if q.via_llamacpp else q.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, tok_meta)
        writer.add_string(VERSION_KEY, __version__)
        if recipe is not None:
            writer.add_string(RECIPE_KEY, json.dumps(recipe.to_dict(), sort_keys=True))

        output_name = "lm_head" if "lm_head" in tensors else "embed"
        entries: dict[str, dict[str, Any]] = {}
        src_for_llamacpp = q.via_llamacpp
        bar = tqdm(tensors.items(), desc=f"gguf {q.name}", unit="tensor", disable=not progress, leave=False)
        for canon, (gname, arr) in bar:
            if src_for_llamacpp:
                writer.add_tensor(gname, arr)
                continue
            ttype = tensor_type(q, arr.shape, is_output=canon == output_name)
            data, err = quantize_tensor(arr, ttype)
            raw = None if ttype in ("F32", "F16") else gguf.GGMLQuantizationType[ttype]
            writer.add_tensor(gname, data, raw_dtype=raw)
            entries[gname] = report_entry(ttype, err)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        if q.via_llamacpp:
            llamacpp_quantize(tmp_src, tmp, q)
            entries = measure_file(tmp, {g: a for g, a in tensors.values()})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if tmp_src is not None:
            tmp_src.unlink(missing_ok=True)
    os.chmod(path, 0o644)  # mkstemp makes it private; a model file is an ordinary file
    return {
        "format": "gguf",
        "quant": q.name,
        "file_type": gguf.LlamaFileType(q.file_type).name,
        "arch": arch.name,
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - t0, 2),
        "errors": summarise(entries),
        "tensors": entries,
    }
