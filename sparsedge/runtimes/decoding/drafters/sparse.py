"""Self-speculation at high activation sparsity: the target's own weights with a second, sparser
recipe draft one token at a time, which is where the sparse kernels pay most (DESIGN.md §3).

The draft runs on the native engine when the target has a GGUF (same file, the drafting recipe
instead of the file's own), else on the torch reference with the recipe's hooks.
"""

from __future__ import annotations

from ....errors import SparsedgeError
from . import Target, register
from .model import RuntimeDrafter, target_gguf, torch_view


def open_sparse_view(target: Target, recipe):
    from ....sparsify.recipe import SparsityRecipe

    rec = recipe if isinstance(recipe, SparsityRecipe) else SparsityRecipe.load(recipe)
    threads = target.opts.get("threads")
    gguf = target_gguf(target)
    if gguf is not None:
        from ...native import NativeRuntime

        return NativeRuntime(gguf, threads=threads, recipe=rec)
    if rec.chunks is not None and rec.chunks.permutation:
        raise SparsedgeError("a chunk-permuted recipe drafts only on an artifact exported with it (native)")
    from ....sparsify.apply import apply

    rt = torch_view(target)
    apply(rt, rec)
    return rt


@register("sparse")
def _make(target: Target, arg: str | None) -> RuntimeDrafter:
    if not arg:
        raise SparsedgeError("the sparse drafter needs a recipe: --drafter sparse:RECIPE.json (make one with "
                             "'sparsedge calibrate MODEL --method teal --sparsity 0.7 -o RECIPE.json')")
    return RuntimeDrafter(open_sparse_view(target, arg), "sparse")
