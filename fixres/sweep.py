"""The test-resolution sweep: one checkpoint evaluated at many test sizes.

    accelerate launch sweep.py --checkpoint runs/<name>            # a ladder of sizes around train_res
    python sweep.py --checkpoint runs/<name> --sizes 64 128 224 384 480 --crop-pct 0.8 --activations
    python sweep.py --checkpoint runs/<name> --crop-pcts 0.875 0.95 1.0   # every (size, crop_pct) pair

    from fixres.sweep import run_sweep                               # in-memory model (finetune --res auto)
    rows = run_sweep(model, meta, split, [64, 80, 96], 0.875, accelerator)
    rows = run_sweep(model, meta, split, [64, 80], 0.875, accelerator, crop_pcts=[0.95, 1.0])  # 6 pairs

Each size is evaluated as train.py evaluates: Resize(int(size / crop_pct)) + CenterCrop(size).
Decode once: every validation image is decoded once per sweep and resized to every size (every
(size, crop_pct) pair) from that decode. Sharding: batch b of the validation split goes to
process b mod N, so each image is counted once at every size (no padding) and a batch holds
the same images whatever N is. Counts, histograms and which images were right
(`per_image_correct`) are summed across processes exactly; only the loss sum's last float bits
can depend on N. Every size is
compared with the training size (at the reference crop_pct: --crop-pct, else the run's), always
swept, on the same images (fixres.stats.add_differences).
sweep() times every size first (fixres.throughput: images/s, ms at batch 1; a speed budget's best).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fixres import plots
from fixres.checkpoint import RunFolder
from fixres.classifiers import classifier_names
from fixres.config import RUNS, ConfigError, SweepConfig
from fixres.data import built_in_dataset, load_split
from fixres.device_decode import resolve_decode
from fixres.engine import to_device_batch, top5_hits, top5_k
from fixres.export import write_best_size
from fixres.layers import layered, sweep_config
from fixres.loaders import ImageDataset, MultiSizeDataset, collate_skipping, loader_options, shard_indices, worker_count
from fixres.model_sizes import sizes_it_takes
from fixres.models import check_model_name, pretrained_preprocessing
from fixres.options import check_sizes
from fixres.preprocessing import create_transform
from fixres.report import EpochProgress, config_table, make_console, per_class_accuracy, print_sweep, write_sweep_tables
from fixres.resolution import default_sizes, recommended_test_res, resize_size
from fixres.runtime import make_accelerator
from fixres.stats import METHOD as STATS_METHOD
from fixres.stats import add_differences, best_of
from fixres.throughput import add_speeds, best_within, budget_line, budget_of, speed_record, timed_sizes
from fixres.trained_model import load_plain_weights, load_run_model

# Pooled-activation histogram: log-spaced bins over +-[1e-4, 1e4] (25 per decade) plus the
# bins below, between and above, so no range has to be agreed between processes first.
_POS_EDGES = torch.logspace(-4, 4, 201, dtype=torch.float64)
ACT_EDGES = torch.cat([-_POS_EDGES.flip(0), _POS_EDGES])


def sweep_pairs(sizes, crop_pct: float, crop_pcts=None) -> list[tuple[int, float]]:
    """Every (size, crop_pct) pair a sweep evaluates: each size in its order, and for each size
    `crop_pct` and `crop_pcts` (duplicates once) from the smallest crop_pct up."""
    crops = sorted({float(crop_pct), *map(float, crop_pcts or ())})
    return [(size, crop) for size in sizes for crop in crops]


def sweep_loader(samples, pairs, meta: dict, accelerator, *, batch_size: int, workers: int, decode: str):
    """(a loader of this process's batches, each image at every (size, crop_pct) pair as uint8,
    all from one decode, with the interpolation of `meta`; their indices in `samples`)."""
    transform = create_transform(meta, "sweep", pairs=pairs, decode=decode)
    if decode == "gpu":
        dataset, collate = ImageDataset(samples, transform), collate_skipping
    else:
        dataset, collate = MultiSizeDataset(samples, transform), None
    mine = shard_indices(len(dataset), batch_size, accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         pin_memory=accelerator.device.type == "cuda", collate_fn=collate,
                                         **loader_options(workers, persistent=False))  # read once
    return loader, mine


class SizeTally:
    """This process's sums per (size, crop_pct) pair; each image is on one process only, so the
    sum over processes puts every image's result in place."""

    def __init__(self, pairs: int, images: int, device: torch.device):
        # per pair: correct, count, loss sum | zeros, sum, sum of squares, count of features | top-5 correct | histogram
        self.stats = torch.zeros(pairs, 8 + len(ACT_EDGES) + 1, dtype=torch.float64, device=device)
        self.per_image_correct = torch.zeros(pairs, images, dtype=torch.int32, device=device)
        self.forward_s = [0.0] * pairs
        self.edges = ACT_EDGES.to(device)

    def add(self, k: int, logits, labels, indices, features=None) -> None:
        stats = self.stats[k]
        hits = logits.argmax(1) == labels
        stats[0] += hits.sum()
        self.per_image_correct[k, indices] = hits.int()
        stats[1] += labels.numel()
        stats[2] += F.cross_entropy(logits, labels, reduction="none").double().sum()
        stats[7] += top5_hits(logits, labels).sum()
        if features is not None:
            feats = features.detach().double().flatten()
            stats[3] += (feats == 0).sum()
            stats[4] += feats.sum()
            stats[5] += feats.square().sum()
            stats[6] += feats.numel()
            stats[8:] += torch.bincount(torch.bucketize(feats, self.edges), minlength=len(self.edges) + 1)


def score_batches(net, loader, mine: list[int], to_float, tally: SizeTally, accelerator, *, decode: str,
                  captured: list, progress=None) -> float:
    """Every batch of `loader` at every pair into `tally`; returns the seconds spent waiting for the loader."""
    device = accelerator.device
    mine_on_device = torch.tensor(mine, dtype=torch.long, device=device)
    done, loader_s = 0, 0.0
    waited = time.perf_counter()
    for batch, labels, *_ in loader:
        loader_s += time.perf_counter() - waited
        if decode == "gpu":
            batch = batch.decode(device)[0]  # a file nothing decodes raised BadImageError: none dropped
        labels = labels.to(device)
        indices = mine_on_device[done:done + labels.numel()]  # the loader keeps the shard's order
        done += labels.numel()
        for k, images in enumerate(batch):
            images = to_device_batch(to_float(images.to(device, non_blocking=True)), channels_last=True)
            t0 = time.perf_counter()
            with accelerator.autocast():
                logits = net(images).float()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # so that the time is this pair's forward pass
            tally.forward_s[k] += time.perf_counter() - t0
            features = torch.cat(captured) if captured else None
            captured.clear()
            tally.add(k, logits, labels, indices, features)
        if progress is not None:
            progress(labels.numel() * accelerator.num_processes, None)
        waited = time.perf_counter()
    return loader_s


def run_sweep(model, meta: dict, split, sizes, crop_pct: float, accelerator, *, crop_pcts=None, batch_size: int = 64,
              workers: int = 0, activations: bool = False, progress=None, samples=None,
              decode: str = "cpu") -> list[dict]:
    """Evaluate `model` on split.val (or on `samples`, (path, label) pairs) at every size, at
    `crop_pct` and every one of `crop_pcts`: one row per (size, crop_pct) pair (sweep_pairs: by
    size, then crop_pct), equal on every process; every image is decoded once for all of them.
    `decode` "gpu": the workers read the files, and each batch is decoded once on the device
    and resized there to every pair (fixres.device_decode).

    `meta` gives the preprocessing (interpolation, mean, std; fixres weights metadata).
    The model is unwrapped (no DDP: ranks run different numbers of batches), moved to the
    device in channels_last (outside inference mode, so it can still be trained after) and put
    in eval mode; its train/eval modes are restored after.
    Rows: size, crop_pct, resize, top1, top5 (top-k, k = min(5, classes)), loss, correct, correct5, count,
    per_image_correct (a bool tensor in the images' order, for paired comparisons),
    forward_seconds (slowest process), images_per_s (forward pass only, all processes),
    loader_seconds and seconds (whole sweep, slowest process, shared by all rows); with
    `activations`, act_zero_frac, act_mean, act_std and act_hist (counts in the bins cut by ACT_EDGES)."""
    pairs = sweep_pairs(list(sizes), crop_pct, crop_pcts)
    for crop in {c for _, c in pairs}:
        check_sizes(list(sizes), crop)
    net = accelerator.unwrap_model(model)
    modes = {m: m.training for m in net.modules()}
    net.to(accelerator.device, memory_format=torch.channels_last).eval()
    samples = split.val if samples is None else samples
    loader, mine = sweep_loader(samples, pairs, meta, accelerator, batch_size=batch_size, workers=workers,
                                decode=decode)
    to_float = create_transform(meta, "normalize")
    tally = SizeTally(len(pairs), len(samples), accelerator.device)
    captured = []  # with `activations`, the input of every classifier (a distilled DeiT: two) at every forward pass
    hooks = [net.get_submodule(head).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
             for head in (classifier_names(net) if activations else [])]
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            loader_s = score_batches(net, loader, mine, to_float, tally, accelerator, decode=decode,
                                     captured=captured, progress=progress)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.train(training)
    return sweep_rows(tally, pairs, accelerator, activations=activations, loader_s=loader_s, start=start)


def sweep_rows(tally: SizeTally, pairs: list[tuple[int, float]], accelerator, *, activations: bool,
               loader_s: float, start: float) -> list[dict]:
    """run_sweep's rows from every process's tally (summed) and times (the slowest process's)."""
    n = len(pairs)
    stats = accelerator.reduce(tally.stats, "sum").cpu()
    per_image_correct = accelerator.reduce(tally.per_image_correct, "sum").cpu().bool()
    times = torch.tensor(tally.forward_s + [loader_s, time.perf_counter() - start], dtype=torch.float64,
                         device=accelerator.device)
    times = accelerator.gather(times[None]).view(-1, n + 2).amax(0).tolist()
    rows = []
    for k, (size, crop_pct) in enumerate(pairs):
        correct, count, loss_sum, zeros, total, squares, values, correct5 = stats[k, :8].tolist()
        row = {"size": size, "crop_pct": crop_pct, "resize": resize_size(size, crop_pct), "top1": correct / count,
               "top5": correct5 / count, "loss": loss_sum / count, "correct": int(correct), "correct5": int(correct5),
               "count": int(count), "per_image_correct": per_image_correct[k],
               "forward_seconds": times[k],
               "images_per_s": count / max(times[k], 1e-9), "loader_seconds": times[n], "seconds": times[n + 1]}
        if activations:
            mean = total / values
            row.update(act_zero_frac=zeros / values, act_mean=mean,
                       act_std=math.sqrt(max(squares / values - mean * mean, 0.0)),
                       act_hist=[int(c) for c in stats[k, 8:].tolist()])
        rows.append(row)
    return rows


def load_for_sweep(cfg: SweepConfig, accelerator):
    """(model, meta, split, run folder or None, run config dict); every user error is raised
    here, before any evaluation work."""
    run_dir, run_cfg = None, {}
    if cfg.checkpoint:
        model, meta = load_run_model(cfg.checkpoint, cfg.which)
        folder = RunFolder.holding(meta["weights_path"])
        if folder is not None:
            run_dir, run_cfg = folder.path, folder.read_config()
    else:
        check_model_name(cfg.model)
        # plain weights: most often a library's pretrained ones, preprocessed as they were made
        meta = {"model": cfg.model, "train_res": cfg.train_res or 224, "weights_path": str(cfg.weights),
                **pretrained_preprocessing(cfg.model)}
    if cfg.data:
        data, images = cfg.data, cfg.images
    elif "data" not in run_cfg:
        raise ConfigError("--data is needed: there is no run config.json beside the weights to take it from")
    elif run_cfg["data"] is None:  # the run used the built-in dataset: the version it recorded
        _, csv = built_in_dataset(run_cfg.get("shapes"), run_dir / "config.json", accelerator,
                                  seed=run_cfg.get("seed", 0), remedy="give --data with")
        data, images = str(csv), None
    else:
        data, images = run_cfg["data"], cfg.images or run_cfg.get("images")
    split = load_split(data, images, classes=meta.get("classes"))
    if cfg.weights:
        model = load_plain_weights(cfg.model, cfg.weights, split.classes, data=split.source)
        meta["classes"] = split.classes
    return model, meta, split, run_dir, run_cfg


def draw_figures(out: Path, rows: list[dict], summary: dict, *, best: dict, chosen: dict, activations: bool) -> list[str]:
    """sweep.py's figures (fixres/plots.py) from its rows and sweep.json's summary: the names written."""
    train_res, model = summary["train_res"], summary["model"]
    written = plots.plot_sweep_figures(rows, out, train_res=train_res, crop_pct=summary["crop_pct"],
                                       predicted=summary["predicted_best"], best=best,
                                       act_edges=ACT_EDGES.tolist() if activations else None,
                                       title=f"{model} trained at {train_res} px")
    if summary["speed"]:  # one point per size: the chosen row's crop_pct
        plots.plot_speed([r for r in rows if r["crop_pct"] == chosen["crop_pct"]], out / "sweep_speed.png",
                         batch_size=summary["speed"]["batch_size"], budget=summary["budget"] or {},
                         best=chosen["size"], title=f"{model} on {summary['speed']['device']}")
        written.append("sweep_speed.png")
    return written


# the figures sweep.py can write (activations.png also finetune.py: a fine-tuned run's folder holds one)
SWEEP_FIGURES = ("sweep.png", "sweep_crop.png", "sweep_speed.png", "activations.png")


def note_other_figures(out: Path, written: list[str], console) -> None:
    """Says in a line which figures in `out` this sweep did not write (an earlier sweep's with other
    options or without --no-plots, or a fine-tuning's): they do not show this sweep's numbers."""
    other = [name for name in SWEEP_FIGURES if name not in written and (out / name).exists()]
    if other:
        console.print(f"{', '.join(other)} in {out}: not from this sweep")


def sweep(given: dict, command: str = "") -> dict:
    """The job sweep.py runs, from the options given (fixres.layers.parse_command_line): load,
    evaluate every (size, crop_pct) pair, print, write the files."""
    cfg = layered(SweepConfig, given)
    accelerator = make_accelerator(cfg)
    console = make_console(accelerator.is_main_process)
    decode = resolve_decode(cfg.decode, accelerator.device)  # before any work
    if cfg.checkpoint is None and cfg.weights is None:
        cfg = dataclasses.replace(cfg, checkpoint=str(RunFolder.newest(Path(RUNS))))
        console.print(f"--checkpoint not given: using the newest run {cfg.checkpoint}")
    model, meta, split, run_dir, run_cfg = load_for_sweep(cfg, accelerator)
    cfg = sweep_config(given, meta, run_cfg, checkpoint=cfg.checkpoint)  # the run's crop_pct and crop scale
    crop_pct, min_scale = cfg.crop_pct, cfg.min_scale  # the reference's: (train_res, crop_pct)
    crop_pcts = sorted({crop_pct, *(cfg.crop_pcts or ())})
    train_res = int(meta["train_res"])
    predicted = recommended_test_res(train_res=train_res, crop_pct=crop_pct, scale=(min_scale, 1.0))
    target = run_cfg.get("for_test_res")  # train.py --for-test-res: the test size the run was trained for
    sizes = sorted(set(cfg.sizes or default_sizes(train_res, predicted)) | {train_res, *([target] if target else [])})
    sizes, dropped = sizes_it_takes(model, meta["model"], sizes)  # a ViT: multiples of its patch
    if dropped:
        console.print(dropped)
    out = Path(cfg.output or run_dir or Path(meta["weights_path"]).parent)
    workers = worker_count(cfg.workers)
    crops = (str(crop_pct) if len(crop_pcts) == 1 else " ".join(map(str, crop_pcts))
             + f" (the reference: {crop_pct}" + (", --crop-pct)" if "crop_pct" in given else ", the run's)"))
    console.print(config_table({
        "weights": meta["weights_path"], "model": meta["model"], "dataset": split.source,
        "val images": len(split.val), "classes": len(split.classes), "sizes": " ".join(map(str, sizes))
        + ("" if not cfg.sizes or train_res in cfg.sizes else f" (with {train_res}, the training size: the reference)"),
        "crop_pct": crops, "trained at": train_res, "predicted best": f"{predicted} (RRC min scale {min_scale})",
        "processes": accelerator.num_processes, "device": accelerator.device,
        "mixed precision": accelerator.mixed_precision, "workers": workers, "decoding on": decode, "output": out},
        title="fixres sweep: resolved config"))
    budget, speeds, speed_s = budget_of(cfg), None, 0.0
    if cfg.speed:  # before any evaluation: a budget that no size meets is refused here
        speeds, _, speed_s = timed_sizes(model, sizes, budget=budget, batch_size=cfg.batch_size,
                                         accelerator=accelerator, console=console, repeats=cfg.speed_repeats)
    pairs = f"{len(sizes)} sizes" + (f" x {len(crop_pcts)} crop_pcts" if len(crop_pcts) > 1 else "")
    with EpochProgress(console, f"sweep ({pairs})", len(split.val)) as bar:
        rows = run_sweep(model, meta, split, sizes, crop_pct, accelerator, crop_pcts=crop_pcts,
                         batch_size=cfg.batch_size, workers=workers, activations=cfg.activations, progress=bar,
                         decode=decode)
    add_speeds(add_differences(rows, train_res, crop_pct), speeds)
    best = best_of(rows)  # the rows by size, then crop_pct: a tie goes to the smaller size, then crop_pct
    chosen = best_within(rows, speeds, budget) if budget else best
    k = top5_k(len(split.classes))
    print_sweep(console, rows, train_res=train_res, crop_pct=crop_pct, predicted=predicted, best=best,
                top5_label=f"top-{k}", processes=accelerator.num_processes, within=chosen if budget else None,
                target=target, speed_batch=cfg.batch_size if speeds else None)
    if budget:
        console.print(budget_line(chosen, best, budget, batch_size=cfg.batch_size, crops=len(crop_pcts) > 1))
    summary = {"train_res": train_res, "predicted_best": predicted, "measured_best": best["size"],
               "measured_best_crop_pct": best["crop_pct"], "measured_best_top1": best["top1"], "crop_pct": crop_pct,
               "crop_pcts": crop_pcts, "target_test_res": target, "min_scale": min_scale,
               "weights": meta["weights_path"], "model": meta["model"], "data": split.source, "val_images": len(split.val),
               "difference_vs_train": STATS_METHOD, "processes": accelerator.num_processes,
               "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision,
               "loader_seconds": rows[0]["loader_seconds"], "seconds": rows[0]["seconds"], "top5_k": k,
               "command": command, "config": cfg.to_dict(),
               **speed_record(measured=bool(speeds), budget=budget, chosen=chosen, batch_size=cfg.batch_size,
                              repeats=cfg.speed_repeats, device=accelerator.device, seconds=speed_s)}
    per_class = per_class_accuracy(rows, [label for _, label in split.val], split.classes)
    if accelerator.is_main_process:
        write_sweep_tables(out, rows, summary, act_edges=ACT_EDGES.tolist(), per_class=per_class)
        figures = draw_figures(out, rows, summary, best=best, chosen=chosen,
                               activations=cfg.activations) if cfg.plots else []
        note_other_figures(out, figures, console)
        console.print(f"wrote {out}/" + ", ".join(["sweep.csv", "sweep.json", *figures]))
        if cfg.write_best:  # within the budget, when one is given
            if target and chosen["size"] != target:
                console.print(f"--write-best: the run was trained for a test at {target} px (--for-test-res), which "
                              f"finetune.py --res auto keeps; its weights' test size becomes {chosen['size']} px")
            write_best_size(Path(meta["weights_path"]), run_dir, chosen["size"], chosen["crop_pct"], console)
    accelerator.wait_for_everyone()
    return {"rows": rows, "meta": summary, "output": str(out)}
