"""Figures of the sweep, drawn with matplotlib's Agg canvas (no display, no pyplot state).

    plot_sweep(rows, "sweep.png", train_res=64, predicted=79)     # top-1 against test size, and the
                                                                   # paired difference against 64 px
    plot_activation_cdfs(rows, edges, "activations.png", train_res=64)   # the paper's CDF figure
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from fixres.checkpoint import atomic_write


def _save(fig: Figure, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_sweep(rows: list[dict], path: Path, *, train_res: int, predicted: int, title: str = "") -> None:
    """Top-1 against test size; the training size, the measured best and the predicted best
    marked. Below it, when the rows carry them (sweep.add_differences), the paired
    difference against the training size with its 95% interval as error bars."""
    sizes = [r["size"] for r in rows]
    best = max(rows, key=lambda r: (r["top1"], -r["loss"]))
    if "diff_low" in rows[0]:
        fig = Figure(figsize=(6.4, 6.2))
        ax, ax_diff = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    else:
        fig = Figure(figsize=(6.4, 4.2))
        ax, ax_diff = fig.add_subplot(), None
    ax.plot(sizes, [100 * r["top1"] for r in rows], "o-", color="tab:blue", label="measured")
    for axis in (ax, ax_diff) if ax_diff else (ax,):
        axis.axvline(train_res, color="grey", linestyle="--", label=f"trained at {train_res} px")
        axis.axvline(predicted, color="tab:orange", linestyle=":", label=f"predicted best {predicted} px")
        axis.grid(alpha=0.3)
    ax.plot([best["size"]], [100 * best["top1"]], "*", color="tab:red", markersize=15,
            label=f"measured best {best['size']} px ({100 * best['top1']:.1f}%)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "top-1 against test resolution")
    ax.legend(fontsize="small")
    if ax_diff:
        diff = np.array([100 * r["diff_vs_train"] for r in rows])
        low, high = (np.array([100 * r[k] for r in rows]) for k in ("diff_low", "diff_high"))
        ax_diff.axhline(0, color="black", linewidth=0.8)
        ax_diff.errorbar(sizes, diff, yerr=[diff - low, high - diff], fmt="o", color="tab:blue", capsize=4)
        ax_diff.set_ylabel(f"top-1 vs {train_res} px (points)\npaired, 95% interval")
    (ax_diff or ax).set_xlabel("test size (px)")
    _save(fig, path)


def plot_activation_cdfs(rows: list[dict], edges: list[float], path: Path, *, train_res: int) -> None:
    """One cumulative distribution of the pooled features per test size, from the exact
    histograms (row["act_hist"][j] counts values in (edges[j-1], edges[j]])."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(rows)))
    x = np.asarray(edges)
    lo, hi = 0.0, 0.0
    for row, colour in zip(rows, colours):
        counts = np.asarray(row["act_hist"], dtype=np.float64)
        cdf = np.cumsum(counts)[:-1] / counts.sum()   # P(X <= edges[j])
        lo = min(lo, x[np.searchsorted(cdf, 0.002)])
        hi = max(hi, x[min(np.searchsorted(cdf, 0.995), len(x) - 1)])
        trained = row["size"] == train_res
        ax.plot(x, cdf, color=colour, linewidth=2.5 if trained else 1.2,
                label=f"{row['size']} px" + (" (trained)" if trained else ""))
    ax.set_xlim(lo, hi if hi > lo else lo + 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("pooled activation before the classifier")
    ax.set_ylabel("cumulative fraction")
    ax.set_title("pooled-feature distribution by test size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title="test size")
    _save(fig, path)


def plot_activations(curves, edges, path: Path, *, title: str) -> None:
    """Cumulative distributions of the pooled features, from sweep.py's exact histograms."""
    x = np.asarray(edges, dtype=np.float64)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    lo = hi = 0.0
    for (label, hist), style in zip(curves, ("-", "--", "-")):
        counts = np.asarray(hist, dtype=np.float64)
        cdf = np.cumsum(counts)[:-1] / counts.sum()
        lo = min(lo, x[np.searchsorted(cdf, 0.002)])
        hi = max(hi, x[min(np.searchsorted(cdf, 0.995), len(x) - 1)])
        ax.plot(x, cdf, style, linewidth=1.8, label=label)
    ax.set_xlim(lo, hi if hi > lo else lo + 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("pooled activation before the classifier")
    ax.set_ylabel("cumulative fraction")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
