"""WINA: weight-informed criterion |x_i|·‖W[:, i]‖₂ at every linear input, with the column norms
of the consuming weight (stacked q/k/v, stacked gate/up, o, down). Thresholded at a calibrated
quantile like the others (not per-token top-k)."""

from .methods import Method, column_norms, register


def _scale(*names):
    def scale(layer, weights, stats):
        return column_norms(*(weights[f"layers.{layer}.{n}"] for n in names))
    return scale


METHOD = register(Method(
    name="wina",
    description="|x_i|·‖W[:,i]‖₂ at every linear input (WINA), calibrated threshold",
    sites={s: "|x_i|·‖W[:,i]‖₂" for s in ("qkv_in", "o_in", "ffn_in", "down_in")},
    attn_sites=("qkv_in", "o_in"),
    scales={"qkv_in": _scale("q", "k", "v"), "o_in": _scale("o"), "ffn_in": _scale("gate", "up"),
            "down_in": _scale("down")},
    ffn_site="down_in",
))
