"""CHESS: channel-wise FFN thresholds plus selective attention sparsification.

FFN: importance of neuron i for a token is |act(gate)_i|·E|up_i| (E over calibration tokens, a
first pass); T is the layer's target quantile of importance (second pass), t_i = T / E|up_i|.
Attention: only the inputs of q_proj and o_proj are thresholded (k_proj, v_proj stay dense).
"""

from .methods import Method, register


def _up_mean(layer, weights, stats):
    return stats.up_mean[layer]  # [ffn] E|up_i| over every calibration token


METHOD = register(Method(
    name="chess",
    description="channel-wise |act(gate)_i|·E|up_i| on the FFN + |x| at q_proj and o_proj inputs (CHESS)",
    sites={"gate_act": "|act(gate)_i|·E|up_i|", "q_in": "|x|", "o_in": "|x|"},
    attn_sites=("q_in", "o_in"),
    scales={"gate_act": _up_mean},
    ffn_site="gate_act",
    needs_up_stats=True,
))
