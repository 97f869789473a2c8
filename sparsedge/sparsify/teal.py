"""TEAL-style: magnitude thresholds on the input of every linear layer (q/k/v share one input,
gate/up share one), one scalar per layer and site."""

from .methods import Method, register

METHOD = register(Method(
    name="teal",
    description="|x| at the input of every linear layer (TEAL-style)",
    sites={"qkv_in": "|x|", "o_in": "|x|", "ffn_in": "|x|", "down_in": "|x|"},
    attn_sites=("qkv_in", "o_in"),
    scales={},
    ffn_site="down_in",
))
