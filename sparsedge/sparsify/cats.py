"""CATS: threshold |act(gate(x))| per layer. The gate runs dense; up and down only on active
neurons (the zeroed gate zeroes the product, so up's rows and down's columns are skipped)."""

from .methods import Method, register

METHOD = register(Method(
    name="cats",
    description="|act(gate(x))| per layer (CATS); gate dense, up/down on active neurons",
    sites={"gate_act": "|act(gate(x))|"},
    attn_sites=(),
    scales={},
    ffn_site="gate_act",
))
