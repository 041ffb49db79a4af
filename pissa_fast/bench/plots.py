"""PNG plots of `pissa-fast bench` results (matplotlib, Agg backend: no display needed).

time_vs_niter.png   time against niter, one subplot per rank, pissa_fast vs the peft path
error_vs_niter.png  L1, rel_recon and excess against niter (log scale), rows = error, columns = rank
tradeoff.png        L1 against time (log-log), one curve per method through its niter points
"""
from __future__ import annotations

import math
import os

from .measure import INF
from .report import ERROR_TITLES, aggregate, niter_label

STYLE = {"pissa_fast": dict(color="tab:blue", marker="o", label="pissa_fast"),
         "peft": dict(color="tab:orange", marker="s", label="peft path")}
_SHORT = {"l1": "L1 vs exact factors", "rel_recon": "rel_recon", "excess": "excess residual"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _pos(v):
    return v if v is not None and math.isfinite(v) and v > 0 else math.nan


def _grid(n):
    cols = min(n, 4)
    return (n + cols - 1) // cols, cols


def _niter_axis(ax, niters):
    ax.set_xticks(range(len(niters)))
    ax.set_xticklabels([niter_label(n) for n in niters])
    ax.set_xlabel("niter")
    ax.grid(True, which="both", alpha=0.3)


def _series(ax, niters, values: dict, r, style):
    """A line through the finite niters and a separate marker for niter = inf (exact SVD)."""
    xs = [i for i, n in enumerate(niters) if n != INF]
    ys = [_pos(values.get((niters[i], r))) for i in xs]
    ax.plot(xs, ys, linestyle="-", **style)
    if INF in niters:  # both methods' exact points, side by side rather than on top of each other
        i = niters.index(INF) + (-0.1 if style["label"] == "pissa_fast" else 0.1)
        ax.plot([i], [_pos(values.get((INF, r)))], linestyle="none", color=style["color"], marker="*",
                markersize=11)


def plot_all(measurements, niters, ranks, out_dir, title: str) -> list[str]:
    plt = _pyplot()
    niters = list(niters)
    paths = []
    time = {m: aggregate(measurements, m, "time_s") for m in STYLE}
    err = {(m, k): aggregate(measurements, m, k) for m in STYLE for k in ERROR_TITLES}
    all_t = [v for d in time.values() for v in d.values()]
    scale, unit = (1.0, "s") if all_t and max(all_t) >= 1.0 else (1e3, "ms")
    time_s = {m: {k: v * scale for k, v in d.items()} for m, d in time.items()}

    # time vs niter
    rows, cols = _grid(len(ranks))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 0.6, 3.0 * rows + 0.9), squeeze=False)
    for ax, r in zip(axes.flat, ranks):
        for m, st in STYLE.items():
            _series(ax, niters, time_s[m], r, st)
        ax.set_yscale("log")
        ax.set_title(f"r = {r}")
        ax.set_ylabel(f"time ({unit})")
        _niter_axis(ax, niters)
    for ax in list(axes.flat)[len(ranks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"PiSSA init time, median of runs (star: exact SVD)\n{title}", fontsize=10)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "time_vs_niter.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # errors vs niter
    keys = [k for k in ("l1", "rel_recon", "excess")]
    fig, axes = plt.subplots(len(keys), len(ranks), figsize=(3.3 * len(ranks) + 0.8, 2.7 * len(keys) + 0.9),
                             squeeze=False)
    for i, k in enumerate(keys):
        for j, r in enumerate(ranks):
            ax = axes[i][j]
            for m, st in STYLE.items():
                _series(ax, niters, err[(m, k)], r, st)
            ax.set_yscale("log")
            if i == 0:
                ax.set_title(f"r = {r}")
            if j == 0:
                ax.set_ylabel(_SHORT[k])
            _niter_axis(ax, niters)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Error vs the exact float64 SVD (log scale; star: exact float32 SVD)\n{title}", fontsize=10)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "error_vs_niter.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # error vs time
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols + 0.6, 3.2 * rows + 0.9), squeeze=False)
    for ax, r in zip(axes.flat, ranks):
        for m, st in STYLE.items():
            pts = [(n, _pos(time_s[m].get((n, r))), _pos(err[(m, "l1")].get((n, r)))) for n in niters]
            fin = [p for p in pts if p[0] != INF]
            ax.plot([p[1] for p in fin], [p[2] for p in fin], linestyle="-", **st)
            for n, x, y in pts:
                if n == INF:
                    ax.plot([x], [y], linestyle="none", color=st["color"], marker="*", markersize=11)
                if math.isfinite(x) and math.isfinite(y):  # pissa_fast's labels below left, peft's above right
                    off = (-9, -10) if m == "pissa_fast" else (4, 3)
                    ax.annotate(niter_label(n), (x, y), textcoords="offset points", xytext=off, fontsize=7,
                                color=st["color"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"r = {r}")
        ax.set_xlabel(f"time ({unit})")
        ax.set_ylabel("L1 vs exact factors")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(ranks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Accuracy vs time (labels: niter; lower left is better)\n{title}", fontsize=10)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "tradeoff.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
