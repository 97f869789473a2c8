"""Calibration and evaluation text, and the perplexity protocol.

Default corpus: Python's bundled documentation (``pydoc_data.topics``): real English, offline on
every machine with Python. Its 79 topics are sorted by name; every 4th topic (index % 4 == 3) is
the evaluation span, the rest the calibration span. The spans are disjoint by construction and
do not depend on the tokenizer. Topics are joined with a blank line.

Perplexity protocol (PPL_PROTOCOL, reported with every figure):
- tokenize the evaluation text once without special tokens; take the first ``max_tokens``;
- cut it into non-overlapping windows of ``window`` tokens (a last partial window is dropped);
- each window starts from an empty KV cache; if the tokenizer adds a BOS token by default, BOS is
  prepended and every window token is scored, else the first token is context only;
- the window runs through the runtime in chunks of ``chunk`` tokens (same function, less memory);
- ppl = exp(mean negative log-likelihood over all scored tokens).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm.auto import tqdm

from .errors import SparsedgeError

CORPUS_NAME = "pydoc-topics"
EVAL_EVERY = 4  # topic index % 4 == 3 -> evaluation


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(k, topics[k]) for k in sorted(topics)]


def calibration_text() -> str:
    return "\n\n".join(t for i, (_, t) in enumerate(_topics()) if i % EVAL_EVERY != EVAL_EVERY - 1)


def evaluation_text() -> str:
    return "\n\n".join(t for i, (_, t) in enumerate(_topics()) if i % EVAL_EVERY == EVAL_EVERY - 1)


def read_text_file(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SparsedgeError(f"no such text file: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SparsedgeError(f"{path} is not UTF-8 text")
    if not text.strip():
        raise SparsedgeError(f"{path} is empty")
    return text


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenize(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids [n] of a long text, without special tokens."""
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def adds_bos(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer prepends one by default, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


@dataclass
class PplProtocol:
    window: int = 512
    max_tokens: int = 8192
    chunk: int = 128

    def __post_init__(self) -> None:
        if self.window < 2 or self.max_tokens < self.window or self.chunk < 1:
            raise SparsedgeError(f"bad perplexity protocol {self}")


@dataclass
class PplResult:
    ppl: float
    eval_tokens: int  # tokens scored
    corpus: str
    corpus_hash: str
    protocol: dict
    # argmax of the logits at every scored position [eval_tokens] (for top-1 agreement)
    argmax: np.ndarray | None = field(default=None, repr=False)


def windows(ids: np.ndarray, proto: PplProtocol) -> list[np.ndarray]:
    ids = ids[: proto.max_tokens]
    n = len(ids) // proto.window
    if n == 0:
        raise SparsedgeError(f"text has {len(ids)} tokens, fewer than one window of {proto.window}")
    return [ids[i * proto.window : (i + 1) * proto.window] for i in range(n)]


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """NLL [k] of targets [k] under logits [k, vocab] (float64 for a stable sum)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return lse - z[np.arange(len(targets)), targets]


def window_logits(runtime: Any, inputs: np.ndarray, chunk: int) -> Iterable[np.ndarray]:
    """Run one window from an empty cache, yielding logits chunk by chunk ([<=chunk, vocab])."""
    runtime.reset()
    for s in range(0, len(inputs), chunk):
        yield runtime.forward(inputs[s : s + chunk])


def perplexity(
    model_or_runtime: Any,
    text: str | None = None,
    tokenizer: Any = None,
    protocol: PplProtocol | None = None,
    corpus: str | None = None,
    progress: bool = True,
) -> PplResult:
    """Perplexity of a Runtime (or a model argument / LoadedModel, run on the torch runtime)."""
    from .runtimes import Runtime, open_runtime
    from .sources import LoadedModel, load

    proto = protocol or PplProtocol()
    if isinstance(model_or_runtime, Runtime):
        runtime = model_or_runtime
        if tokenizer is None:
            raise SparsedgeError("perplexity of a runtime needs its tokenizer")
    else:
        loaded = model_or_runtime if isinstance(model_or_runtime, LoadedModel) else load(model_or_runtime)
        tokenizer = tokenizer or loaded.tokenizer
        runtime = open_runtime(loaded, "torch")
    if text is None:
        text, corpus = evaluation_text(), corpus or f"{CORPUS_NAME}:eval"
    ids = tokenize(tokenizer, text)
    bos = adds_bos(tokenizer)
    nll_sum, count = 0.0, 0
    argmax: list[np.ndarray] = []
    for w in tqdm(windows(ids, proto), desc="perplexity", unit="win", disable=not progress):
        inputs = np.concatenate([[bos], w]) if bos is not None else w
        # logits at position j predict inputs[j + 1]
        targets = inputs[1:]
        pos = 0
        for logits in window_logits(runtime, inputs, proto.chunk):
            k = logits.shape[0]
            tgt = targets[pos : pos + k]
            nll = _log_softmax_nll(logits[: len(tgt)], tgt)
            nll_sum += float(nll.sum())
            argmax.append(logits[: len(tgt)].argmax(axis=1))
            count += len(tgt)
            pos += k
    runtime.reset()
    return PplResult(
        ppl=math.exp(nll_sum / count), eval_tokens=count, corpus=corpus or "user-text",
        corpus_hash=text_hash(text), protocol=asdict(proto), argmax=np.concatenate(argmax),
    )
