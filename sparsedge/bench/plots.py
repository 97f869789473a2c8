"""The report's PNG plots (matplotlib, no display needed):

- tokens_per_s.png   decode tok/s per configuration (median, min-max whiskers), by runtime
- speedup_vs_ppl.png decode speedup over the same runtime's dense greedy vs perplexity cost
                     (ppl / dense ppl), one point per recipe and runtime (greedy decoding)
- acceptance.png     tokens per verification step and acceptance rate per drafter and runtime
"""

from __future__ import annotations

from pathlib import Path

from .report import FILES

def _label(c: dict) -> str:
    q = f" {c['quant']}" if c.get("quant") else ""
    return f"{c['runtime']}{q} / {c['variant']} / {c['decode']}"


_COLORS = {"native": "tab:blue", "llamacpp": "tab:orange", "onnxruntime": "tab:green", "genai": "tab:purple",
           "torch": "tab:gray"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def plot_tokens(report: dict, path: Path) -> None:
    plt = _plt()
    cs = report["configs"]
    fig, ax = plt.subplots(figsize=(8, 0.4 * max(len(cs), 3) + 1.2))
    labels = [_label(c) for c in cs]
    vals = [c["decode_tok_s"] for c in cs]
    err = [[c["decode_tok_s"] - c["decode_tok_s_min"] for c in cs],
           [c["decode_tok_s_max"] - c["decode_tok_s"] for c in cs]]
    y = list(range(len(cs)))[::-1]
    ax.barh(y, vals, xerr=err, color=[_COLORS.get(c["runtime"], "tab:red") for c in cs], capsize=3)
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {v:.0f}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("decode tokens/s (median over repeats, min-max whiskers)")
    ax.set_title(f"{report['model']}: decode speed per configuration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup(report: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    greedy = [c for c in report["configs"] if c["decode"] == "greedy" and c["speedup"] is not None]
    plotted = 0
    for c in greedy:
        if c["ppl_vs_dense"] is None:
            continue
        x = 100 * (c["ppl_vs_dense"] - 1)
        ax.scatter([x], [c["speedup"]], color=_COLORS.get(c["runtime"], "tab:red"),
                   marker="o" if c["variant"] == "dense" else "D", s=50)
        if c["variant"] != "dense":  # every dense point sits at (0, 1): labelled once below
            ax.annotate(f"{c['runtime']} {c['variant']}", (x, c["speedup"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        plotted += 1
    if plotted:
        ax.annotate("dense (every runtime)", (0, 1), fontsize=8, xytext=(4, -12), textcoords="offset points")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    if not plotted:
        ax.text(0.5, 0.5, "no perplexity measured", ha="center", transform=ax.transAxes)
    ax.set_xlabel("perplexity cost: ppl / dense ppl - 1 (%), same runtime")
    ax.set_ylabel("decode speedup over dense greedy, same runtime")
    ax.set_title("speedup vs perplexity cost (one point per recipe)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_acceptance(report: dict, path: Path) -> None:
    plt = _plt()
    spec = [c for c in report["configs"] if c["drafter"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 0.4 * max(len(spec), 3) + 1.4), sharey=True)
    labels = [_label(c) for c in spec]
    y = list(range(len(spec)))[::-1]
    colors = [_COLORS.get(c["runtime"], "tab:red") for c in spec]
    a1.barh(y, [c["mean_accepted"] for c in spec], color=colors)
    a1.axvline(1.0, color="gray", lw=0.8, ls="--")
    a1.set_xlabel("tokens per verification step")
    a2.barh(y, [c["acceptance_rate"] for c in spec], color=colors)
    a2.set_xlabel("acceptance rate (accepted / drafted)")
    a2.set_xlim(0, 1)
    a1.set_yticks(y, labels, fontsize=8)
    if not spec:
        a1.text(0.5, 0.5, "no speculative configuration", ha="center", transform=a1.transAxes)
    fig.suptitle("acceptance per drafter")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(report: dict, out: Path) -> None:
    plot_tokens(report, out / FILES["tokens"])
    plot_speedup(report, out / FILES["speedup"])
    plot_acceptance(report, out / FILES["acceptance"])
