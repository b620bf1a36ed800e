"""What the jobs print and tabulate: a progress bar while an epoch runs, one line per
epoch, a final table; the sweep's sweep.csv and sweep.json. Only the main process
prints; the other ranks get a silent console.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fixres.fileio import atomic_write, write_json_atomic
from fixres.stats import METHOD as STATS_METHOD

LOG_WIDTH = 160  # columns of a table printed to a file or pipe (rich's own default there is 80)


def make_console(is_main: bool) -> Console:
    # soft_wrap: a long path in a line stays on one line in logs
    console = Console(quiet=not is_main, soft_wrap=True, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH  # the sweep table's rows stay one line each, not 80 columns of wrapped cells
    return console


class EpochProgress:
    """A rich progress bar fed with (images, loss) per batch; shows images/s and loss."""

    def __init__(self, console: Console, description: str, total_images: int):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]:>7.1f} img/s  loss {task.fields[loss]}"),
                                 TimeRemainingColumn(), console=console, transient=True,
                                 disable=console.quiet or not console.is_terminal)
        self.task = self.progress.add_task(description, total=total_images, rate=0.0, loss="-")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, images: int, loss: float | None) -> None:
        task = self.progress.tasks[self.task]
        fields = {"rate": task.speed or 0.0}
        if loss is not None:
            fields["loss"] = f"{loss:.3f}"
        self.progress.update(self.task, advance=images, **fields)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"  # None: training accuracy under Mixup/CutMix


def epoch_line(record: dict) -> str:
    parts = [f"epoch {record['epoch']:>3}",
             f"train loss {record['train_loss']:.4f} acc {_percent(record['train_acc'])}",
             f"val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}%"
             + (f" top-5 {100 * record['val_top5']:.2f}%" if "val_top5" in record else "") + f" (n={record['val_count']})",
             f"lr {record['lr']:.2e}", f"{record['images_per_s']:.1f} img/s", f"{record['seconds']:.0f}s"]
    if "ema_val_acc" in record:
        parts.insert(3, f"EMA val loss {record['ema_val_loss']:.4f} acc {100 * record['ema_val_acc']:.2f}%")
    if "data_wait_frac" in record:  # the training epoch's time spent waiting for the loader (older runs: absent)
        parts.append(f"data wait {100 * record['data_wait_frac']:.0f}%")
    if record.get("skipped"):
        parts.append(f"skipped {record['skipped']} bad images")
    return " | ".join(parts)


def metrics_table(records: list[dict], title: str, top5_label: str = "val top-5") -> Table:
    """One row per epoch; `top5_label` names top-k with k = min(5, classes) ("val top-3")."""
    table = Table(title=title)
    ema = any("ema_val_acc" in r for r in records)
    for column in ("epoch", "train loss", "train acc", "val loss", "val acc", top5_label,
                   *(("EMA loss", "EMA acc") if ema else ()), "img/s", "seconds"):
        table.add_column(column, justify="right")
    for r in records:
        top5 = f"{100 * r['val_top5']:.2f}%" if "val_top5" in r else "-"  # epochs of a run made before top-5
        ema_cells = (f"{r['ema_val_loss']:.4f}", f"{100 * r['ema_val_acc']:.2f}%") if ema else ()
        table.add_row(str(r["epoch"]), f"{r['train_loss']:.4f}", _percent(r["train_acc"]),
                      f"{r['val_loss']:.4f}", f"{100 * r['val_acc']:.2f}%", top5, *ema_cells,
                      f"{r['images_per_s']:.1f}",
                      f"{r['seconds']:.0f}")
    return table


def config_table(values: dict, title: str) -> Table:
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in values.items():
        table.add_row(key, str(value))
    return table


def difference_cell(diff: float, low: float, high: float) -> str:
    """A difference in top-1 and its interval, in points: "+2.40 [+1.20, +3.60]"."""
    return f"{100 * diff:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def _speed_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"  # --no-speed: "-"


def several_crops(rows: list[dict]) -> bool:
    """Whether the sweep's rows hold more than one crop_pct (a crop_pct sweep)."""
    return len({r["crop_pct"] for r in rows}) > 1


def row_key(row: dict, several: bool) -> str:
    """A row's key in sweep.json's per_class and activations: its size ("80"), or with several
    crop_pcts its pair ("80@0.95")."""
    return f"{row['size']}@{row['crop_pct']}" if several else str(row["size"])


def sweep_table(rows: list[dict], *, train_res: int, crop_pct: float, predicted: int, best: dict,
                top5_label: str = "top-5", within: dict | None = None, speed_batch: int | None = None,
                target: int | None = None) -> Table:
    """One line per (size, crop_pct) pair; the reference is (train_res, `crop_pct`), and
    `predicted` the predicted best size at that crop_pct; `best` is the best row; `top5_label`:
    top-k with k = min(5, classes) ("top-3"); `within`: the best row within a speed budget;
    `speed_batch`: the batch of the measured images/s (fixres.throughput); `target`: the test
    size the run was trained for (train.py --for-test-res)."""
    table = Table(title="fixres sweep")
    versus = f"vs {train_res} px" + (f" at {crop_pct:g}" if several_crops(rows) else "") + " (95% CI)"
    for column in ("size", "crop_pct", "resize", "top-1", versus, "gained", "lost", top5_label, "loss", "images",
                   "forward img/s", f"img/s b{speed_batch or '-'}", "ms b1", ""):
        table.add_column(column, justify="right" if column else "left")
    for r in rows:
        own = r["crop_pct"] == crop_pct
        # a budget's best: "best in budget", or "best (in budget)" when the best overall meets it
        notes = [name for name, hit in (("trained", own and r["size"] == train_res),
                                        ("predicted", own and r["size"] == predicted),
                                        ("target", own and r["size"] == target),
                                        ("best (in budget)" if within is best else "best", r is best),
                                        ("best in budget", r is within and within is not best)) if hit]
        difference = ("reference" if own and r["size"] == train_res
                      else difference_cell(r["diff_vs_train"], r["diff_low"], r["diff_high"]))
        table.add_row(str(r["size"]), f"{r['crop_pct']:g}", str(r["resize"]), f"{100 * r['top1']:.2f}%", difference,
                      str(r["gained"]), str(r["lost"]), f"{100 * r['top5']:.2f}%", f"{r['loss']:.4f}", str(r["count"]),
                      f"{r['images_per_s']:.1f}", _speed_cell(r.get("images_per_s_batch")),
                      _speed_cell(r.get("latency_ms")), ", ".join(notes))
    return table


def crop_grid(rows: list[dict], *, train_res: int, crop_pct: float, best: dict) -> Table:
    """A crop_pct sweep's top-1 at a glance: a line per size, a column per crop_pct; the best
    pair and the reference (train_res, `crop_pct`) marked."""
    crops = sorted({r["crop_pct"] for r in rows})
    table = Table(title="top-1 by test size and crop_pct", caption="best: the highest top-1, then the lower "
                  "loss, then the first in order (smaller size, then smaller crop_pct)")
    for column in ("size", *(f"crop_pct {c:g}" for c in crops)):
        table.add_column(column, justify="right")
    cells = {(r["size"], r["crop_pct"]): r for r in rows}
    marks = lambda r: (" best" if r is best else "") + (  # noqa: E731
        " ref" if (r["size"], r["crop_pct"]) == (train_res, crop_pct) else "")
    for size in dict.fromkeys(r["size"] for r in rows):
        table.add_row(str(size), *(f"{100 * cells[size, c]['top1']:.2f}%{marks(cells[size, c])}" for c in crops))
    return table


def finetune_table(stages: list[tuple[str, dict]], differences: dict, title: str, also=(),
                   top5_label: str = "top-5") -> Table:
    """finetune.py's result: (label, row) at the training size, before and after, each with
    its paired differences (finetune's `differences`, keyed "after_vs_before" and so on);
    `also`: further (label, row) lines without differences (the last epoch's)."""
    def cell(key):
        d = differences[key]
        return difference_cell(d["diff"], d["low"], d["high"])

    table = Table(title=title)
    for column in ("", "top-1", "vs training size (95% CI)", "vs before (95% CI)", top5_label, "loss"):
        table.add_column(column, justify="right" if column else "left")
    versus = [("reference", ""), (cell("before_vs_train_res"), "reference"),
              (cell("after_vs_train_res"), cell("after_vs_before"))]
    top5 = lambda r: f"{100 * r['top5']:.2f}%" if r.get("top5") is not None else "-"  # noqa: E731
    for (label, r), (vs_train, vs_before) in zip(stages, versus):
        table.add_row(label, f"{100 * r['top1']:.2f}%", vs_train, vs_before, top5(r), f"{r['loss']:.4f}")
    for label, r in also:
        table.add_row(label, f"{100 * r['top1']:.2f}%", "", "", top5(r), f"{r['loss']:.4f}")
    return table


def activation_table(rows: list[dict]) -> Table:
    table = Table(title="pooled features before the classifier")
    for column in ("size", "crop_pct", "zeros", "mean", "std"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["size"]), f"{r['crop_pct']:g}", f"{100 * r['act_zero_frac']:.2f}%", f"{r['act_mean']:.4f}",
                      f"{r['act_std']:.4f}")
    return table


CSV_COLUMNS = ("size", "crop_pct", "resize", "top1", "top5", "loss", "correct", "correct5", "count", "diff_vs_train",
               "diff_low", "diff_high", "gained", "lost", "forward_seconds", "images_per_s", "images_per_s_batch",
               "latency_ms", "act_zero_frac", "act_mean", "act_std")


def per_class_accuracy(rows: list[dict], labels: list[int], classes: list[str]) -> dict:
    """{size: {class: {"top1", "correct", "count"}}} from each row's per-image results (the
    validation images' order, `labels`): exact whatever the number of processes. With several
    crop_pcts, keyed by pair ("80@0.95", row_key)."""
    labels = torch.tensor(labels)
    several = several_crops(rows)
    table = {}
    for r in rows:
        correct = r["per_image_correct"]
        table[row_key(r, several)] = classes_of = {}
        for index, name in enumerate(classes):
            mine = labels == index
            n, right = int(mine.sum()), int(correct[mine].sum())
            classes_of[name] = {"top1": right / n if n else None, "correct": right, "count": n}
    return table


def write_sweep_tables(out: Path, rows: list[dict], summary: dict, *, act_edges: list[float],
                       per_class: dict | None = None) -> None:
    """sweep.csv (CSV_COLUMNS) and sweep.json: the summary, the rows, per-class top-1 and, when
    the rows carry them, the activation histograms with their bin edges."""
    table = [{k: r[k] for k in CSV_COLUMNS if k in r} for r in rows]
    lines = [",".join(CSV_COLUMNS)] + [",".join(str(r.get(k, "")) for k in CSV_COLUMNS) for r in table]
    atomic_write(out / "sweep.csv", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    record = {"meta": summary, "rows": table, **({"per_class": per_class} if per_class else {})}
    if "act_hist" in rows[0]:
        several = several_crops(rows)
        record["activations"] = {"edges": act_edges, "hist": {row_key(r, several): r["act_hist"] for r in rows}}
    write_json_atomic(out / "sweep.json", record)


def print_sweep(console: Console, rows: list[dict], *, train_res: int, crop_pct: float, predicted: int, best: dict,
                top5_label: str, processes: int, within: dict | None = None, speed_batch: int | None = None,
                target: int | None = None) -> None:
    """The sweep's table and the lines that say what its columns mean; with several crop_pcts
    a grid of top-1 by size and crop_pct; then the best pair."""
    several = several_crops(rows)
    console.print(sweep_table(rows, train_res=train_res, crop_pct=crop_pct, predicted=predicted, best=best,
                              top5_label=top5_label, within=within, speed_batch=speed_batch, target=target))
    at, header_at = (f" at crop_pct {crop_pct:g}", f" at {crop_pct:g}") if several else ("", "")
    console.print(f"vs {train_res} px{header_at}: the difference in top-1 from the training size{at}, in points, "
                  f"on the same {rows[0]['count']} validation images; {STATS_METHOD}; gained / lost: images right only "
                  f"at that {'pair' if several else 'size'} / only at {train_res} px{at}")
    console.print(f"forward img/s: forward passes only, all {processes} process(es); decoding and "
                  f"resizing (shared by all sizes) kept the model waiting {rows[0]['loader_seconds']:.1f} s "
                  f"of the sweep's {rows[0]['seconds']:.1f} s")
    if speed_batch:
        console.print(f"img/s b{speed_batch}, ms b1: the forward pass alone on synthetic input, one process's device, "
                      f"at batch {speed_batch} (images/s) and at batch 1 (milliseconds), medians, measured before "
                      f"the sweep")
    if "act_zero_frac" in rows[0]:
        console.print(activation_table(rows))
    if several:
        console.print(crop_grid(rows, train_res=train_res, crop_pct=crop_pct, best=best))
    best_at = f" at crop_pct {best['crop_pct']:g}" if several else ""
    console.print(f"best: {best['size']} px{best_at} (top-1 {100 * best['top1']:.1f}%), trained at {train_res} px{at}, "
                  f"predicted {predicted} px")
    if target:  # the size a deployment fixed: its row against the training size's, whatever was best
        row = next(r for r in rows if r["size"] == target and r["crop_pct"] == crop_pct)
        console.print(f"target: {target} px (train.py --for-test-res {target}), top-1 {100 * row['top1']:.2f}%, vs "
                      f"{train_res} px {difference_cell(row['diff_vs_train'], row['diff_low'], row['diff_high'])}")
