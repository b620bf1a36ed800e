"""Figures of sweep.py and finetune.py, drawn with matplotlib's Agg canvas (no display, no pyplot state).

    plot_sweep(rows, "sweep.png", train_res=64, predicted=79, best=row, crop_pct=0.875)  # top-1 against test size,
                                                 # and the paired difference against 64 px; a line per crop_pct
    plot_crop_grid(rows, "sweep_crop.png", train_res=64, crop_pct=0.875, best=row)  # heat map: size by crop_pct
    plot_sweep_activations(rows, edges, "activations.png", train_res=64)  # the paper's CDF figure
    plot_speed(rows, "sweep_speed.png", batch_size=64, budget={"max_latency_ms": 5}, best=80)  # top-1 against speed
    plot_activation_cdfs([("before", hist), ("after", hist2)], edges, "activations.png", title="...")  # finetune.py
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter

from fixres.fileio import atomic_write
from fixres.report import several_crops
from fixres.throughput import meets


def _save(fig: Figure, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_sweep(rows: list[dict], path: Path, *, train_res: int, predicted: int, best: dict, crop_pct: float,
               title: str = "") -> None:
    """Top-1 against test size, a line per crop_pct (the reference `crop_pct`'s bold); the
    training size, the `best` row and the predicted best marked. Below it, when the rows carry
    them (stats.add_differences), the paired difference against (train_res, crop_pct) with its
    95% interval as error bars."""
    crops = sorted({r["crop_pct"] for r in rows})
    several = len(crops) > 1
    if "diff_low" in rows[0]:
        fig = Figure(figsize=(6.4, 6.2))
        ax, ax_diff = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    else:
        fig = Figure(figsize=(6.4, 4.2))
        ax, ax_diff = fig.add_subplot(), None
    sizes = [r["size"] for r in rows]
    nudge = 0.01 * (max(sizes) - min(sizes) or 1)  # error bars of several crop_pcts side by side, not on top
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.85, len(crops))) if several else ["tab:blue"]
    for j, (crop, colour) in enumerate(zip(crops, colours)):
        mine = [r for r in rows if r["crop_pct"] == crop]
        x = np.array([r["size"] for r in mine], dtype=float)
        label = (f"crop_pct {crop:g}" + (" (reference)" if crop == crop_pct else "")) if several else "measured"
        ax.plot(x, [100 * r["top1"] for r in mine], "o-", color=colour, label=label,
                linewidth=2.4 if several and crop == crop_pct else 1.5)
        if ax_diff:
            diff = np.array([100 * r["diff_vs_train"] for r in mine])
            low, high = (np.array([100 * r[k] for r in mine]) for k in ("diff_low", "diff_high"))
            ax_diff.errorbar(x + (j - (len(crops) - 1) / 2) * nudge, diff, yerr=[diff - low, high - diff], fmt="o",
                             color=colour, capsize=4)
    for axis in (ax, ax_diff) if ax_diff else (ax,):
        axis.axvline(train_res, color="grey", linestyle="--", label=f"trained at {train_res} px")
        axis.axvline(predicted, color="tab:orange", linestyle=":", label=f"predicted best {predicted} px")
        axis.grid(alpha=0.3)
    best_at = f" at {best['crop_pct']:g}" if several else ""
    ax.plot([best["size"]], [100 * best["top1"]], "*", color="tab:red", markersize=15,
            label=f"measured best {best['size']} px{best_at} ({100 * best['top1']:.1f}%)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "top-1 against test resolution")
    ax.legend(fontsize="small")
    if ax_diff:
        ax_diff.axhline(0, color="black", linewidth=0.8)
        reference = f"{train_res} px" + (f" at {crop_pct:g}" if several else "")
        ax_diff.set_ylabel(f"top-1 vs {reference} (points)\npaired, 95% interval")
    (ax_diff or ax).set_xlabel("test size (px)")
    _save(fig, path)


def plot_crop_grid(rows: list[dict], path: Path, *, train_res: int, crop_pct: float, best: dict,
                   title: str = "") -> None:
    """A crop_pct sweep's heat map: top-1 (%) at every test size (up) and crop_pct (across),
    written in each cell; the best pair outlined in red, the reference (train_res, `crop_pct`)
    in white, dashed."""
    crops, sizes = sorted({r["crop_pct"] for r in rows}), sorted({r["size"] for r in rows})
    grid = np.full((len(sizes), len(crops)), np.nan)
    for r in rows:
        grid[sizes.index(r["size"]), crops.index(r["crop_pct"])] = 100 * r["top1"]
    fig = Figure(figsize=(2.6 + 1.1 * len(crops), 1.6 + 0.42 * len(sizes)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    fig.colorbar(image, ax=ax, label="top-1 (%)")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize="small",
                color="white" if image.norm(value) < 0.5 else "black")
    for (size, crop), style in (((train_res, crop_pct), {"edgecolor": "white", "linestyle": "--"}),
                                ((best["size"], best["crop_pct"]), {"edgecolor": "tab:red"})):
        if size in sizes and crop in crops:
            ax.add_patch(Rectangle((crops.index(crop) - 0.5, sizes.index(size) - 0.5), 1, 1, fill=False, linewidth=2.5,
                                   **style))
    ax.set_xticks(range(len(crops)), [f"{c:g}" for c in crops])
    ax.set_yticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set_xlabel("crop_pct (Resize(int(size / crop_pct)) + CenterCrop(size))")
    ax.set_ylabel("test size (px)")
    ax.set_title(title or f"top-1 (%); best (red) {best['size']} px at {best['crop_pct']:g}, "
                          f"reference (dashed) {train_res} px at {crop_pct:g}", fontsize="medium")
    _save(fig, path)


def plot_sweep_figures(rows: list[dict], out: Path, *, train_res: int, crop_pct: float, predicted: int, best: dict,
                       act_edges: list[float] | None, title: str) -> list[str]:
    """sweep.py's figures in `out`: sweep.png; sweep_crop.png with several crop_pcts;
    activations.png with `act_edges` (the rows carry histograms). Returns the names written."""
    several = several_crops(rows)
    plot_sweep(rows, out / "sweep.png", train_res=train_res, predicted=predicted, best=best, crop_pct=crop_pct,
               title=title + ("" if several else f", crop_pct {crop_pct}"))
    written = ["sweep.png"]
    if several:
        plot_crop_grid(rows, out / "sweep_crop.png", train_res=train_res, crop_pct=crop_pct, best=best)
        written.append("sweep_crop.png")
    if act_edges is not None:
        plot_sweep_activations(rows, act_edges, out / "activations.png", train_res=train_res, crop_pct=crop_pct)
        written.append("activations.png")
    return written


def plot_activation_cdfs(curves: list[tuple[str, list[int]]], edges: list[float], path: Path, *, title: str,
                         styles: list[dict] | None = None, legend_title: str | None = None) -> None:
    """Cumulative distributions of the pooled features, one per (label, histogram) of `curves`,
    from exact histograms (hist[j] counts values in (edges[j-1], edges[j]]); `styles`: one
    dict of Axes.plot keywords per curve (default: lines 1.8 wide)."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    x = np.asarray(edges)
    lo, hi = 0.0, 0.0
    for (label, hist), style in zip(curves, styles or [{"linewidth": 1.8}] * len(curves)):
        counts = np.asarray(hist, dtype=np.float64)
        cdf = np.cumsum(counts)[:-1] / counts.sum()   # P(X <= edges[j])
        lo = min(lo, x[np.searchsorted(cdf, 0.002)])  # the x range holds the middle 99.3%
        hi = max(hi, x[min(np.searchsorted(cdf, 0.995), len(x) - 1)])
        ax.plot(x, cdf, label=label, **style)
    ax.set_xlim(lo, hi if hi > lo else lo + 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("pooled activation before the classifier")
    ax.set_ylabel("cumulative fraction")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title=legend_title)
    _save(fig, path)


def plot_sweep_activations(rows: list[dict], edges: list[float], path: Path, *, train_res: int,
                           crop_pct: float | None = None) -> None:
    """The sweep's activations.png: one curve per test size (per pair, with several crop_pcts),
    the training size's (at `crop_pct`) bold."""
    several = len({r.get("crop_pct") for r in rows}) > 1
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(rows)))
    trained = [row["size"] == train_res and (crop_pct is None or row["crop_pct"] == crop_pct) for row in rows]
    curves = [(f"{row['size']} px" + (f" at {row['crop_pct']:g}" if several else "") + (" (trained)" if bold else ""),
               row["act_hist"]) for row, bold in zip(rows, trained)]
    styles = [{"color": colour, "linewidth": 2.5 if bold else 1.2} for colour, bold in zip(colours, trained)]
    plot_activation_cdfs(curves, edges, path, title="pooled-feature distribution by test size", styles=styles,
                         legend_title="test size")


def _one_two_five(value: float, _) -> str:
    """A log axis's tick label: plain numbers at 1, 2 and 5 times a power of ten (0.5, 2000), none between."""
    return f"{value:g}" if f"{value:.0e}"[0] in "125" else ""


def plot_speed(rows: list[dict], path: Path, *, batch_size: int, budget: dict, best: int, title: str = "") -> None:
    """sweep_speed.png: top-1 against images/s at `batch_size` (left) and against milliseconds
    at batch 1 (right), log x, each point labelled with its size; a budget's limit drawn on its
    panel, the sizes outside it hollow, `best` (the best within the budget, or overall) starred."""
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    top1 = [100 * r["top1"] for r in rows]
    inside = [meets({"images_per_s": r["images_per_s_batch"], "latency_ms": r["latency_ms"]}, budget) for r in rows]
    panels = ((axes[0], "images_per_s_batch", f"images/s at batch {batch_size} (forward pass)", "min_images_per_s"),
              (axes[1], "latency_ms", "ms per image at batch 1 (forward pass)", "max_latency_ms"))
    for ax, key, label, limit in panels:
        x = [r[key] for r in rows]
        ax.plot(x, top1, "-", color="tab:blue", alpha=0.4)
        for xi, yi, r, ok in zip(x, top1, rows, inside):
            ax.plot([xi], [yi], "o", color="tab:blue", markerfacecolor="tab:blue" if ok else "white")
            ax.annotate(f"{r['size']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize="small")
            if r["size"] == best:
                ax.plot([xi], [yi], "*", color="tab:red", markersize=15,
                        label=f"best{' within budget' if budget else ''}: {best} px ({yi:.1f}%)")
        if budget.get(limit) is not None:
            ax.axvline(budget[limit], color="tab:red", linestyle="--",
                       label=f"--{limit.replace('_', '-')} {budget[limit]:g}")
        ax.set_xscale("log")
        for set_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            set_formatter(FuncFormatter(_one_two_five))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    axes[0].set_ylabel("top-1 (%)")
    fig.suptitle((title or "top-1 against speed") + ": one point per test size (px)"
                 + ("; hollow: outside the budget" if budget else ""))
    _save(fig, path)
