"""sparsedge: an edge/on-device compilation toolkit for causal language models.

Public verbs:
    load(model)                      -> LoadedModel (built-in name, HF folder, .gguf, hub id)
    pull(name)                       -> cached HF folder of a built-in model
    open_runtime(model, runtime)     -> Runtime (forward / keep / truncate / reset)
    generate(runtime, ids, config)   -> iterator of new token ids
    perplexity(model_or_runtime)     -> PplResult under the documented protocol
"""

from .data import PplProtocol, perplexity
from .errors import SparsedgeError
from .runtimes import open_runtime
from .runtimes.decoding import GenerationConfig, generate
from .sources import DEFAULT_MODEL, load, pull

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "GenerationConfig", "PplProtocol", "SparsedgeError", "__version__",
    "generate", "load", "open_runtime", "perplexity", "pull",
]
