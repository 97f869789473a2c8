"""A draft model on its own runtime: any artifact or model with the same tokenizer.

``RuntimeDrafter`` is the shared part of every drafter that runs a model (this one, layerskip,
sparse): it keeps the draft runtime's cache in step with the committed context (reusing what it
drafted and the target accepted), then drafts a chain one forward per token, adding the draft's
runner-up tokens as leaf siblings under greedy decoding. It stops when the chain's estimated
probability drops below the verifier's ``min_prob`` (SpecDec++-style early stop).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ....errors import SparsedgeError
from ..generate import prefill
from ..sampling import SamplingConfig, probs
from ..tree import Draft
from . import Drafter, DraftRequest, Rates, Target, register


_UNTEMPERED = SamplingConfig(temperature=1.0)  # the draft's own confidence under greedy decoding


class RuntimeDrafter(Drafter):
    sequential = True

    def __init__(self, runtime: Any, name: str, max_depth: int = 8, siblings: int = 1):
        self.rt, self.name, self.max_depth, self.siblings = runtime, name, max_depth, siblings
        self.seen: list[int] = []  # the tokens in the draft runtime's cache
        self.rates = Rates()  # sampled drafts: acceptance per depth (no cheap closed form)
        self.forwards = 0

    def begin(self, prompt) -> None:
        self.seen = []
        self.rt.reset()

    def _sync(self, context: list[int]) -> np.ndarray:
        """Bring the draft cache to ``context``; return the draft's logits after it, [vocab]."""
        c = 0
        n = min(len(self.seen), len(context))
        while c < n and self.seen[c] == context[c]:
            c += 1
        c = min(c, len(context) - 1)  # at least the root is forwarded, for its logits
        self.rt.truncate(c)
        logits = prefill(self.rt, np.asarray(context[c:], dtype=np.int64))
        self.forwards += 1
        self.seen = list(context)
        return logits

    def propose(self, req: DraftRequest) -> Draft:
        draft = Draft()
        logits = self._sync(req.context)
        parent, pp = -1, 1.0
        for d in range(min(self.max_depth, req.budget)):
            if req.sampling.greedy:
                p = probs(logits, _UNTEMPERED)
                top = np.argpartition(-p, self.siblings)[: self.siblings + 1]
                top = top[np.argsort(-p[top])]
                x, conf = int(top[0]), float(p[top[0]])
                node = draft.add(parent, x, conf, src=self.name)
                for alt in top[1:]:
                    draft.add(parent, int(alt), float(p[alt]), src=self.name)
            else:
                q = probs(logits, req.sampling)
                x = int(req.rng.choice(q.shape[0], p=q))
                conf = self.rates.get(min(d, 3))
                node = draft.add(parent, x, conf, q=q, src=self.name, tag=min(d, 3))
            pp *= conf
            if pp < req.min_prob or d == min(self.max_depth, req.budget) - 1:
                break
            logits = self.rt.forward([x])[-1]
            self.forwards += 1
            self.seen.append(x)
            parent = node
        return draft

    def observe(self, v, logits, path, next_token, context) -> None:
        self.rates.update(v, path, self.name)

    def close(self) -> None:
        close = getattr(self.rt, "close", None)
        if close:
            close()


def check_same_tokenizer(a: Any, b: Any) -> None:
    """Drafts are token ids: the two vocabularies must be the same, token for token."""
    if a is None or b is None:
        return
    if a.get_vocab() != b.get_vocab():
        raise SparsedgeError("the draft model's tokenizer differs from the target's; a drafter must "
                             "share the target's vocabulary")


def default_runtime(loaded: Any) -> str:
    """Where a drafter over an artifact runs: the native engine when it has a GGUF, else torch."""
    if loaded.manifest is not None and loaded.manifest.get("gguf_quants"):
        return "native"
    return "torch"


# the artifact format each runtime runs; a draft model that is not an artifact yet is exported to it
RUNTIME_FORMATS = {"native": "gguf", "llamacpp": "gguf", "onnxruntime": "onnx"}
DEFAULT_QUANTS = {"gguf": "q4_0", "onnx": "int4"}


def _target_quant(target: Target, fmt: str) -> str:
    """The quant the target runs in ``fmt``: its --quant, else its artifact's first one, else the
    export default (q4_0 / int4), so that draft and target read weights of one kind."""
    from ....sources import LoadedModel

    q = target.opts.get("quant")
    m = target.model
    if q is None and isinstance(m, LoadedModel) and m.manifest is not None:
        q = next(iter(m.manifest.get(f"{fmt}_quants") or []), None)
    if q is None and isinstance(m, (str, Path)) and str(m).endswith(".gguf") and fmt == "gguf":
        q = Path(m).stem.rpartition(".")[2] or None  # model.q8_0.gguf -> q8_0
    return q or DEFAULT_QUANTS[fmt]


def draft_artifact(loaded: Any, fmt: str, quant: str, progress: bool = False) -> Path:
    """The draft model as an artifact of one format and quant, exported on first use and cached
    under home()/drafts/ (keyed by the source's files, the format, the quant and the sparsedge
    version): a draft is exported once, not per run."""
    from .... import __version__
    from ....export.artifact import ExportConfig, export
    from ....sources import home

    src = Path(loaded.path)
    h = hashlib.sha256(f"{src.resolve()}|{fmt}|{quant}|{__version__}".encode())
    for f in sorted(src.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"|{f.name} {st.st_size} {st.st_mtime_ns}".encode())
    name = "".join(c if c.isalnum() or c in "-._" else "_" for c in loaded.name.split("/")[-1])
    out = home() / "drafts" / f"{name}-{fmt}-{quant}-{h.hexdigest()[:12]}"
    if not (out / "manifest.json").is_file():  # export writes to a temp folder and renames
        formats = ExportConfig(formats=(fmt,), gguf_quants=(quant,) if fmt == "gguf" else (),
                               onnx_quants=(quant,) if fmt == "onnx" else ())
        export(loaded, out, formats, progress=progress)
    return out


@register("model")
def _make(target: Target, arg: str | None) -> RuntimeDrafter:
    """``model:NAME[@RUNTIME]``: NAME is a built-in (e.g. qwen2.5-coder-0.5b), an HF folder, a
    .gguf or an artifact. A model that is not an artifact runs on the target's runtime, exported
    once in the target's quant (draft_artifact); RUNTIME overrides where it runs."""
    from ... import open_runtime
    from ....sources import load

    if not arg:
        raise SparsedgeError("the model drafter needs a model: --drafter model:NAME|PATH[@RUNTIME]")
    path, _, runtime = arg.partition("@")
    loaded = load(path)
    tgt_tok = getattr(target.model, "tokenizer", None)
    check_same_tokenizer(tgt_tok, loaded.tokenizer)
    if loaded.spec.vocab_size != target.runtime.vocab_size:
        raise SparsedgeError(f"draft vocabulary {loaded.spec.vocab_size} != target's {target.runtime.vocab_size}")
    if loaded.manifest is None and not runtime:
        runtime = target.runtime_name
    runtime = runtime or default_runtime(loaded)
    opts = {"threads": target.opts.get("threads")}
    fmt = RUNTIME_FORMATS.get(runtime)
    if loaded.manifest is None and fmt is not None:
        quant = _target_quant(target, fmt)
        loaded = load(str(draft_artifact(loaded, fmt, quant)), progress=False)
        opts["quant"] = quant
    rt = open_runtime(loaded, runtime, **opts)
    return RuntimeDrafter(rt, "model")


def target_gguf(target: Target):
    """The GGUF file the target runs (or its artifact's best one), or None."""
    from ....sources import LoadedModel, artifact_file

    m = target.model
    if isinstance(m, (str, Path)) and str(m).endswith(".gguf"):
        return Path(m)
    if isinstance(m, LoadedModel) and m.manifest is not None and m.manifest.get("gguf_quants"):
        q = target.opts.get("quant")
        q = q if q in m.manifest["gguf_quants"] else None
        return artifact_file(m.path, m.manifest, "gguf", q)
    return None


def torch_view(target: Target, **opts):
    """A torch runtime over the target's weights: shared tensors when the target is torch itself."""
    from ...torch_ref import TorchRuntime
    from ....sources import load

    rt = target.runtime
    if getattr(rt, "name", "") == "torch":
        w = {k: v for k, v in rt.model.w.items() if k != "lm_head" or not rt.spec.tie_embeddings}
        return TorchRuntime(rt.spec, w, **opts)
    if target.model is None:
        raise SparsedgeError("this drafter needs to know which model the target runs")
    loaded = target.model if hasattr(target.model, "state_dict") else load(str(target.model), progress=False)
    return TorchRuntime.from_loaded(loaded, **opts)
