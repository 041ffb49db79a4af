"""The paper's figures, redrawn from results.json's curves (matplotlib, Agg backend, PNG files).

- fig2_1_loss_vs_step.png: training loss vs step, one column per rank, LoRA against PiSSA, with a row
  zoomed on the first steps (the paper's Figure 2.1);
- fig2_2_final_loss_vs_rank.png: final loss vs rank for every method (Figure 2.2);
- fig3_components.png: principal vs middle vs minor singular components, LoRA as a dashed reference,
  one column per rank (Figure 3);
- fig_qpissa_vs_qlora.png: QLoRA against QPiSSA (simulated NF4), laid out as Figure 2.1, with the
  full-precision LoRA and PiSSA curves dashed when they were run.
"""
from __future__ import annotations

import math
import os
import textwrap

from .methods import ALL_METHOD_NAMES, METHODS, QUANT_METHODS

def _style(name: str) -> tuple[str, str]:
    m = METHODS.get(name)
    if m is not None:
        return m.label, m.color
    return name, "#7f7f7f"


def _ordered(names) -> list[str]:
    return sorted(names, key=lambda n: ALL_METHOD_NAMES.index(n) if n in ALL_METHOD_NAMES else 99)


def _finite(values):
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else float("nan") for v in values]


def _zoom_steps(steps: int) -> int | None:
    """How many first steps the zoom row shows; None when the whole run is short enough to read as is."""
    zoom = max(4, steps // 4)
    return zoom if steps > 2 * zoom else None


def _loss_panels(plt, curves, methods, ranks, title, references=()):
    """One column per rank: loss vs step on top and, for longer runs, the first steps zoomed below (a row
    of its own rather than an inset, so it never hides the curves). `references` are drawn dashed and
    paler, behind the compared methods."""
    from matplotlib.ticker import MaxNLocator

    steps = max((len(curves[n][r]) for n in [*methods, *references] if n in curves for r in ranks
                 if r in curves[n]), default=0)
    zoom = _zoom_steps(steps)
    rows = 2 if zoom else 1
    fig, axes = plt.subplots(rows, len(ranks), figsize=(5.0 * len(ranks), 3.6 * rows + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2] if zoom else [1]})
    # ~8 characters of a 12-point title per inch: wrap rather than cut it off on a one-rank figure
    fig.suptitle(textwrap.fill(title, width=int(8 * 5.0 * len(ranks))), fontsize=12)
    for col, rank in enumerate(ranks):
        lines = []
        for name in references:
            if rank in curves.get(name, {}):
                label, color = _style(name)
                lines.append((f"{label} (reference)", _finite(curves[name][rank]), color, "--", 0.55))
        for name in methods:
            if rank in curves.get(name, {}):
                label, color = _style(name)
                lines.append((label, _finite(curves[name][rank]), color, "-", 1.0))
        ax = axes[0][col]
        for label, ys, color, ls, alpha in lines:
            ax.plot(range(1, len(ys) + 1), ys, color=color, lw=1.6, ls=ls, alpha=alpha, label=label)
        ax.set_title(f"rank r = {rank}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (answer tokens)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=8, loc="best")
        if zoom:
            zax = axes[1][col]
            for label, ys, color, ls, alpha in lines:
                zax.plot(range(1, min(zoom, len(ys)) + 1), ys[:zoom], color=color, lw=1.6, ls=ls, alpha=alpha,
                         marker="o", ms=3)
            zax.set_title(f"zoom: first {zoom} steps, r = {rank}", fontsize=10)
            zax.set_xlabel("step")
            zax.set_ylabel("training loss")
            zax.xaxis.set_major_locator(MaxNLocator(integer=True))
            zax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_plots(results: dict, out_dir: str) -> list[str]:
    """Draw every figure the results allow into out_dir; return the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = results["curves"]
    ranks = sorted({r for per in curves.values() for r in per}, key=int)
    model = results.get("model", {}).get("name", "model").split(" (")[0]  # the short name fits a title
    written = []

    main = _ordered(n for n in curves if n in ("lora", "pissa"))
    if main and ranks:
        fig = _loss_panels(plt, curves, main, ranks, f"Training loss, LoRA vs PiSSA ({model})")
        fig.savefig(os.path.join(out_dir, "fig2_1_loss_vs_step.png"), dpi=110)
        plt.close(fig)
        written.append("fig2_1_loss_vs_step.png")

    finals = results.get("final_loss", {})
    if finals and ranks:
        fig, ax = plt.subplots(figsize=(6.2, 4.4))
        for name in _ordered(finals):
            pts = sorted(((int(r), v) for r, v in finals[name].items()
                          if isinstance(v, (int, float)) and math.isfinite(v)))
            if not pts:
                continue
            label, color = _style(name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=1.6, label=label,
                    marker="s" if name in QUANT_METHODS else "o")
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(r) for r in ranks])
        ax.set_xticklabels(ranks)
        ax.set_xlabel("rank r")
        window = results.get("final_window", 1)
        ax.set_ylabel(f"final training loss (mean of last {window} steps)")
        ax.set_title(f"Final loss vs rank ({model})", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "fig2_2_final_loss_vs_rank.png"), dpi=110)
        plt.close(fig)
        written.append("fig2_2_final_loss_vs_rank.png")

    comps = [n for n in ("pissa", "pissa_middle", "pissa_minor") if n in curves]
    if any(n in curves for n in ("pissa_middle", "pissa_minor")):
        comp_ranks = sorted({r for n in comps for r in curves[n]}, key=int)
        fig = _loss_panels(plt, curves, comps, comp_ranks,
                           f"Principal vs middle vs minor singular components ({model})",
                           references=("lora",) if "lora" in curves else ())
        fig.savefig(os.path.join(out_dir, "fig3_components.png"), dpi=110)
        plt.close(fig)
        written.append("fig3_components.png")

    quant = [n for n in ("qlora", "qpissa") if n in curves]
    if quant:
        quant_ranks = sorted({r for n in quant for r in curves[n]}, key=int)
        fig = _loss_panels(plt, curves, quant, quant_ranks,
                           f"QLoRA vs QPiSSA, NF4 simulated in float32 ({model})",
                           references=tuple(n for n in ("lora", "pissa") if n in curves))
        fig.savefig(os.path.join(out_dir, "fig_qpissa_vs_qlora.png"), dpi=110)
        plt.close(fig)
        written.append("fig_qpissa_vs_qlora.png")
    return written
