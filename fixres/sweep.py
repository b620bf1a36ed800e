"""The test-resolution sweep: one checkpoint evaluated at many test sizes.

    accelerate launch sweep.py --checkpoint runs/<name>            # a ladder of sizes around train_res
    python sweep.py --checkpoint runs/<name> --sizes 64 128 224 384 480 --crop-pct 0.8 --activations

    from fixres.sweep import run_sweep                               # in-memory model (finetune --res auto)
    rows = run_sweep(model, meta, split, [64, 80, 96], 0.875, accelerator)

Each size is evaluated as train.py evaluates: Resize(int(size / crop_pct)) + CenterCrop(size).
Decode once: every validation image is decoded once per sweep and resized to every size
from that decode. Sharding: the validation split is cut into batches, and batch b goes to
process b mod N, so each image is counted once at every size (no padding), a batch holds
the same images whatever N is, and N processes share the work of every size. Counts and
histograms are summed across processes exactly; only the loss sum's last float bits can
depend on N (it is printed to 4 decimals).

Paired differences: every row also holds which images were right (`per_image_correct`;
each process fills in the images it evaluated, a sum across processes assembles them
exactly), and sweep.py compares every size with the training size on the same images:
the difference in top-1 with its 95% interval (fixres.stats: a paired bootstrap over the
validation images, 10,000 resamples, fixed seed) and the counts behind it, gained and
lost (images right only at that size / only at the training size). The training size is
always swept: it is the reference. The numbers are the same with 1 and N processes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from fixres.config import RUNS, ConfigError, _opt
from fixres.data import (DataError, ImageDataset, collate_skipping, load_split, loader_options, open_image,
                         round_batches, worker_count)
from fixres.device_decode import ReadForDevice, ResizeSpec, resolve_decode
from fixres.engine import to_device_batch, top5_hits, top5_k
from fixres.models import (check_model_name, classifier_name, create_model, load_run_model, load_weights_into,
                           pretrained_preprocessing, read_state_dict)
from fixres.resolution import recommended_test_res, resize_size
from fixres.stats import METHOD as STATS_METHOD
from fixres.stats import paired_difference_of
from fixres.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

MAX_SIZE = 2048  # larger is almost surely a typo (and a 64-image batch of it is ~3 GB)
# Pooled-activation histogram: log-spaced bins over +-[1e-4, 1e4] (25 per decade) plus the
# bins below, between and above, so no range has to be agreed between processes first.
_POS_EDGES = torch.logspace(-4, 4, 201, dtype=torch.float64)
ACT_EDGES = torch.cat([-_POS_EDGES.flip(0), _POS_EDGES])


@dataclass
class SweepConfig:
    # what to evaluate
    checkpoint: str | None = _opt(None, "run folder, checkpoint folder or .safetensors file written by train.py or "
                                        f"finetune.py (default: the newest run under {RUNS}/)")
    which: str = _opt("best", "which weights of a run folder: best (with --model-ema the raw or the EMA weights, "
                              "whichever scored higher), last, or ema (the EMA after the last epoch)",
                      ("best", "last", "ema"))
    model: str | None = _opt(None, "with --weights: timm model name, or tv:<name>")
    weights: str | None = _opt(None, "plain state dict (.safetensors or .pth, no fixres metadata) instead of --checkpoint; needs --model")
    train_res: int | None = _opt(None, "with --weights: the resolution they were trained at (default 224; a checkpoint knows its own)")
    min_scale: float | None = _opt(None, "RandomResizedCrop min scale of training, for the prediction (default: the weights' metadata, else the run's config, else 0.08)")
    # data
    data: str | None = _opt(None, "CSV split or ImageFolder root (default: the data in the run's config.json)")
    images: str | None = _opt(None, "image folder for a CSV split (default: the run's, else beside the CSV)")
    # the sweep
    sizes: list[int] | None = _opt(None, "test sizes (default: about 0.5x to 2x the training res, with it and the predicted best)")
    crop_pct: float | None = _opt(None, "Resize(int(size / crop_pct)) + CenterCrop(size); 0.8 = the Cassava post's Resize(1.25 x size) (default: the run's; with --weights, the library's "
                                          "for the model's pretrained weights, as mean, std and interpolation; else 0.875)")
    activations: bool = _opt(False, "also collect the pooled features that feed the classifier: stats per size and activations.png")
    # runtime
    batch_size: int = _opt(64, "images per process per forward pass")
    workers: int | None = _opt(None, "data loader worker processes per rank (default: from the CPU count)")
    decode: str = _opt("auto", "cpu: the workers decode and resize; gpu: they read the files, each image is decoded "
                               "once on the model's device and resized there to every size (pip install torchcodec); "
                               "auto: gpu on CUDA when torchcodec is installed", ("auto", "cpu", "gpu"))
    mixed_precision: str | None = _opt(None, "autocast dtype (default: Accelerate's config / launch flag, else none)", ("no", "bf16", "fp16"))
    cpu: bool = _opt(False, "run on the CPU even when a GPU is present")
    output: str | None = _opt(None, "folder for sweep.csv, sweep.json and the plots (default: the run folder)")
    write_best: bool = _opt(False, "record the best size as the run's test size: in the swept weights' metadata "
                                   "(test_res, with the sweep's crop_pct) and in the run's timm export "
                                   "(test_input_size), which is written again from those weights")

    def __post_init__(self):
        if self.checkpoint is not None and self.weights is not None:
            raise ConfigError("give --checkpoint (a fixres run) or --weights FILE with --model NAME, not both")
        if self.weights and not self.model:
            raise ConfigError("--weights needs --model NAME (the checkpoint's model is only known to fixres runs)")
        if self.model and not self.weights:
            raise ConfigError("--model goes with --weights; a --checkpoint names its own model")
        if self.write_best and self.weights:
            raise ConfigError("--write-best records the size in a fixres run: give --checkpoint, not --weights")
        for name in ("train_res", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.min_scale is not None and not 0 < self.min_scale <= 1:
            raise ConfigError(f"--min-scale must be in (0, 1], got {self.min_scale}")
        check_sizes(self.sizes or [], self.crop_pct if self.crop_pct is not None else 0.875)
        if self.sizes:
            self.sizes = sorted(set(self.sizes))
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_sizes(sizes, crop_pct: float) -> None:
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    for size in sizes:
        if not 0 < size <= MAX_SIZE:
            raise ConfigError(f"--sizes: each size must be between 1 and {MAX_SIZE} pixels, got {size}")


def default_sizes(train_res: int, predicted: int) -> list[int]:
    """About 0.5x..2x the training res in multiples of 8, in steps of 1/8 between 0.75x and
    1.5x where the best size is expected (a coarser ladder can step over the peak), plus the
    training res and the prediction exactly (a ladder step within 4 px of either is dropped)."""
    factors = (0.5, 0.75, 0.875, 1.0, 1.125, 1.25, 1.375, 1.5, 1.75, 2.0)
    ladder = {8 * max(1, round(f * train_res / 8)) for f in factors}
    ladder = {s for s in ladder if min(abs(s - train_res), abs(s - predicted)) > 4}
    return sorted(s for s in ladder | {train_res, predicted} if s <= MAX_SIZE)


def split_at_float(transform: v2.Compose) -> tuple[v2.Compose, v2.Compose]:
    """eval_transform cut where it turns uint8 into float: (resize, crop, to tensor) for the
    loader workers, (scale, normalize) for the whole batch on the device. The same elementwise
    operations give the same numbers, and workers ship a quarter of the bytes."""
    steps = transform.transforms
    k = next(i for i, step in enumerate(steps) if isinstance(step, v2.ToDtype))
    return v2.Compose(steps[:k]), v2.Compose(steps[k:])


class MultiSizeDataset(torch.utils.data.Dataset):
    """(path, label) samples -> ([one tensor per transform], label) from a single decode."""

    def __init__(self, samples, transforms):
        self.samples, self.transforms = samples, transforms

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = open_image(path)  # the only decode of this image in the sweep (tests count the calls)
        return [transform(img) for transform in self.transforms], label


def shard_indices(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """This process's samples: whole batches b = rank, rank + world, ... of range(n)."""
    return [i for batch in round_batches(n, batch_size, rank, world) for i in batch]


def run_sweep(model, meta: dict, split, sizes, crop_pct: float, accelerator, *, batch_size: int = 64,
              workers: int = 0, activations: bool = False, progress=None, samples=None,
              decode: str = "cpu") -> list[dict]:
    """Evaluate `model` on split.val (or on `samples`, (path, label) pairs) at every size;
    one row per size, equal on every process. `decode` "gpu": the workers read the files, and
    each batch is decoded once on the device and resized there to every size (fixres.device_decode).

    `meta` gives the preprocessing (interpolation, mean, std; fixres weights metadata).
    The model is unwrapped (no DDP: ranks run different numbers of batches), moved to the
    device in channels_last (outside inference mode, so it can still be trained after) and put
    in eval mode; its train/eval modes are restored after.
    Rows: size, resize, top1, top5 (top-k, k = min(5, classes)), loss, correct, correct5, count, per_image_correct (a bool tensor in the
    images' order, for paired comparisons), forward_seconds (slowest process),
    images_per_s (forward pass only, all processes), loader_seconds and seconds (whole sweep,
    slowest process, shared by all rows); with `activations`, act_zero_frac, act_mean,
    act_std and act_hist (counts in the bins cut by ACT_EDGES)."""
    sizes = list(sizes)
    check_sizes(sizes, crop_pct)
    net = accelerator.unwrap_model(model)
    modes = {m: m.training for m in net.modules()}
    device = accelerator.device
    net.to(device, memory_format=torch.channels_last).eval()
    preprocess = dict(crop_pct=crop_pct, interpolation=meta.get("interpolation", "bilinear"),
                      mean=meta.get("mean", IMAGENET_MEAN), std=meta.get("std", IMAGENET_STD))
    per_image, per_batch = zip(*(split_at_float(eval_transform(size=s, **preprocess)) for s in sizes))
    samples = split.val if samples is None else samples
    if decode == "gpu":
        reader = ReadForDevice(ResizeSpec(tuple(sizes), crop_pct, preprocess["interpolation"]))
        dataset, collate = ImageDataset(samples, reader), collate_skipping
    else:
        dataset, collate = MultiSizeDataset(samples, per_image), None
    mine = shard_indices(len(dataset), batch_size, accelerator.process_index, accelerator.num_processes)
    mine_on_device = torch.tensor(mine, dtype=torch.long, device=device)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         pin_memory=device.type == "cuda", collate_fn=collate,
                                         **loader_options(workers, persistent=False))  # read once
    n = len(sizes)
    # per size: correct, count, loss sum | zeros, sum, sum of squares, count of features | top-5 correct | histogram
    stats = torch.zeros(n, 8 + len(ACT_EDGES) + 1, dtype=torch.float64, device=device)
    # each image is on one process only: the sum over processes puts every image's result in place
    per_image_correct = torch.zeros(n, len(dataset), dtype=torch.int32, device=device)
    done = 0
    edges = ACT_EDGES.to(device)
    forward_s = [0.0] * n
    captured = []
    hook = None
    if activations:
        head = net.get_submodule(classifier_name(net))
        hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    start = waited = time.perf_counter()
    loader_s = 0.0
    try:
        with torch.inference_mode():
            for batch, labels, *_ in loader:
                loader_s += time.perf_counter() - waited
                if decode == "gpu":
                    batch = batch.decode(device)[0]  # a file nothing decodes raised BadImageError: none dropped
                labels = labels.to(device)
                indices = mine_on_device[done:done + labels.numel()]  # the loader keeps the shard's order
                done += labels.numel()
                for k, images in enumerate(batch):
                    images = to_device_batch(per_batch[k](images.to(device, non_blocking=True)), channels_last=True)
                    t0 = time.perf_counter()
                    with accelerator.autocast():
                        logits = net(images).float()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # so that the time is this size's forward pass
                    forward_s[k] += time.perf_counter() - t0
                    hits = logits.argmax(1) == labels
                    stats[k, 0] += hits.sum()
                    per_image_correct[k, indices] = hits.int()
                    stats[k, 1] += labels.numel()
                    stats[k, 2] += F.cross_entropy(logits, labels, reduction="none").double().sum()
                    stats[k, 7] += top5_hits(logits, labels).sum()
                    if activations:
                        feats = captured[-1].detach().double().flatten()
                        captured.clear()
                        stats[k, 3] += (feats == 0).sum()
                        stats[k, 4] += feats.sum()
                        stats[k, 5] += feats.square().sum()
                        stats[k, 6] += feats.numel()
                        stats[k, 8:] += torch.bincount(torch.bucketize(feats, edges), minlength=len(edges) + 1)
                if progress is not None:
                    progress(labels.numel() * accelerator.num_processes, None)
                waited = time.perf_counter()
    finally:
        if hook is not None:
            hook.remove()
        for module, training in modes.items():
            module.train(training)
    stats = accelerator.reduce(stats, "sum").cpu()
    per_image_correct = accelerator.reduce(per_image_correct, "sum").cpu().bool()
    times = torch.tensor(forward_s + [loader_s, time.perf_counter() - start], dtype=torch.float64, device=device)
    times = accelerator.gather(times[None]).view(-1, n + 2).amax(0).tolist()  # the slowest process
    rows = []
    for k, size in enumerate(sizes):
        correct, count, loss_sum, zeros, total, squares, values, correct5 = stats[k, :8].tolist()
        row = {"size": size, "resize": resize_size(size, crop_pct), "top1": correct / count, "top5": correct5 / count,
               "loss": loss_sum / count, "correct": int(correct), "correct5": int(correct5), "count": int(count),
               "per_image_correct": per_image_correct[k],
               "forward_seconds": times[k],
               "images_per_s": count / max(times[k], 1e-9), "loader_seconds": times[n], "seconds": times[n + 1]}
        if activations:
            mean = total / values
            row.update(act_zero_frac=zeros / values, act_mean=mean,
                       act_std=math.sqrt(max(squares / values - mean * mean, 0.0)),
                       act_hist=[int(c) for c in stats[k, 8:].tolist()])
        rows.append(row)
    return rows


def trained_min_scale(meta: dict, run_cfg: dict) -> float:
    """The RandomResizedCrop min scale the weights were trained with: their metadata (the
    weights alone suffice), else their run's config.json, else torchvision's 0.08."""
    return meta.get("min_scale") or run_cfg.get("min_scale") or 0.08


def best_row(rows: list[dict]) -> dict:
    """Highest top-1; among equals, the lowest loss."""
    return max(rows, key=lambda r: (r["top1"], -r["loss"]))


def add_differences(rows: list[dict], train_res: int) -> list[dict]:
    """Give every row its paired difference in top-1 against the training size's row (the
    same images): diff_vs_train with its 95% interval diff_low..diff_high, and the counts
    behind it, gained / lost (images right only at this size / only at the training size)."""
    reference = next(r for r in rows if r["size"] == train_res)["per_image_correct"]
    for r in rows:
        d = paired_difference_of(r["per_image_correct"], reference)
        r.update(diff_vs_train=d["diff"], diff_low=d["low"], diff_high=d["high"], gained=d["gained"], lost=d["lost"])
    return rows


def _run_folder(weights_path: Path) -> Path | None:
    """The run folder that holds a weights file: beside it, or above checkpoints/<name>/."""
    for folder in (weights_path.parent, weights_path.parent.parent.parent):
        if (folder / "config.json").is_file():
            return folder
    return None


def load_for_sweep(cfg: SweepConfig, accelerator):
    """(model, meta, split, run folder or None, run config dict); every user error is raised
    here, before any evaluation work."""
    run_dir, run_cfg = None, {}
    if cfg.checkpoint:
        model, meta = load_run_model(cfg.checkpoint, cfg.which)
        run_dir = _run_folder(Path(meta["weights_path"]))
        if run_dir is not None:
            try:
                run_cfg = json.loads((run_dir / "config.json").read_text())
            except (OSError, ValueError) as err:
                raise ConfigError(f"{run_dir / 'config.json'}: cannot read ({err})") from None
    else:
        check_model_name(cfg.model)
        # plain weights: most often a library's pretrained ones, preprocessed as they were made
        meta = {"model": cfg.model, "train_res": cfg.train_res or 224, "weights_path": str(cfg.weights),
                **pretrained_preprocessing(cfg.model)}
    if cfg.data:
        data, images = cfg.data, cfg.images
    elif "data" not in run_cfg:
        raise ConfigError("--data is needed: there is no run config.json beside the weights to take it from")
    elif run_cfg["data"] is None:  # the run used the built-in dataset
        from fixres.shapes import ensure_shapes
        with accelerator.local_main_process_first():
            data, images = str(ensure_shapes(seed=run_cfg.get("seed", 0))), None
    else:
        data, images = run_cfg["data"], cfg.images or run_cfg.get("images")
    split = load_split(data, images, classes=meta.get("classes"))
    if cfg.weights:
        state = read_state_dict(cfg.weights)
        model = create_model(cfg.model, len(split.classes))
        head = state.get(classifier_name(model) + ".weight")
        if head is not None and head.shape[0] != len(split.classes):
            raise DataError(f"{split.source}: {len(split.classes)} classes, but --weights {cfg.weights} "
                            f"has a {head.shape[0]}-class classifier")
        load_weights_into(model, state, source=str(cfg.weights), replace_classifier=False)
        meta["classes"] = split.classes
    return model, meta, split, run_dir, run_cfg


def sweep(cfg: SweepConfig, command: str = "") -> dict:
    """The job sweep.py runs: load, evaluate every size, print, write the files."""
    from accelerate import Accelerator

    from fixres.report import EpochProgress, activation_table, config_table, make_console, sweep_table

    from fixres.checkpoint import newest_run

    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    console = make_console(accelerator.is_main_process)
    decode = resolve_decode(cfg.decode, accelerator.device)  # before any work
    if cfg.checkpoint is None and cfg.weights is None:
        cfg = dataclasses.replace(cfg, checkpoint=str(newest_run(Path(RUNS))))
        console.print(f"--checkpoint not given: using the newest run {cfg.checkpoint}")
    model, meta, split, run_dir, run_cfg = load_for_sweep(cfg, accelerator)
    crop_pct = cfg.crop_pct or meta.get("crop_pct") or 0.875
    train_res = int(meta["train_res"])
    min_scale = cfg.min_scale or trained_min_scale(meta, run_cfg)
    predicted = recommended_test_res(train_res=train_res, crop_pct=crop_pct, scale=(min_scale, 1.0))
    sizes = sorted(set(cfg.sizes or default_sizes(train_res, predicted)) | {train_res})  # the reference
    out = Path(cfg.output or run_dir or Path(meta["weights_path"]).parent)
    workers = worker_count(cfg.workers)
    console.print(config_table({
        "weights": meta["weights_path"], "model": meta["model"], "dataset": split.source,
        "val images": len(split.val), "classes": len(split.classes), "sizes": " ".join(map(str, sizes))
        + ("" if not cfg.sizes or train_res in cfg.sizes else f" (with {train_res}, the training size: the reference)"),
        "crop_pct": crop_pct, "trained at": train_res, "predicted best": f"{predicted} (RRC min scale {min_scale})",
        "processes": accelerator.num_processes, "device": accelerator.device,
        "mixed precision": accelerator.mixed_precision, "workers": workers, "decoding on": decode, "output": out},
        title="fixres sweep: resolved config"))
    with EpochProgress(console, f"sweep ({len(sizes)} sizes)", len(split.val)) as bar:
        rows = run_sweep(model, meta, split, sizes, crop_pct, accelerator, batch_size=cfg.batch_size,
                         workers=workers, activations=cfg.activations, progress=bar, decode=decode)
    add_differences(rows, train_res)
    best = best_row(rows)
    k = top5_k(len(split.classes))
    console.print(sweep_table(rows, train_res=train_res, predicted=predicted, best=best["size"], top5_label=f"top-{k}"))
    console.print(f"vs {train_res} px: the difference in top-1 from the training size, in points, on the same "
                  f"{len(split.val)} validation images; {STATS_METHOD}; gained / lost: images right only at that "
                  f"size / only at {train_res} px")
    console.print(f"forward img/s: forward passes only, all {accelerator.num_processes} process(es); decoding and "
                  f"resizing (shared by all sizes) kept the model waiting {rows[0]['loader_seconds']:.1f} s "
                  f"of the sweep's {rows[0]['seconds']:.1f} s")
    if cfg.activations:
        console.print(activation_table(rows))
    console.print(f"best: {best['size']} px (top-1 {100 * best['top1']:.1f}%), trained at {train_res} px, "
                  f"predicted {predicted} px")
    summary = {"train_res": train_res, "predicted_best": predicted, "measured_best": best["size"],
               "measured_best_top1": best["top1"], "crop_pct": crop_pct, "min_scale": min_scale,
               "weights": meta["weights_path"], "model": meta["model"], "data": split.source,
               "val_images": len(split.val), "difference_vs_train": STATS_METHOD,
               "processes": accelerator.num_processes, "device": str(accelerator.device),
               "mixed_precision": accelerator.mixed_precision, "loader_seconds": rows[0]["loader_seconds"],
               "seconds": rows[0]["seconds"], "top5_k": k, "command": command, "config": cfg.to_dict()}
    per_class = per_class_accuracy(rows, [label for _, label in split.val], split.classes)
    if accelerator.is_main_process:
        write_outputs(out, rows, summary, title=f"{meta['model']} trained at {train_res} px, crop_pct {crop_pct}",
                      per_class=per_class)
        console.print(f"wrote {out}/sweep.csv, sweep.json, sweep.png" + (", activations.png" if cfg.activations else ""))
        if cfg.write_best:
            write_best_size(Path(meta["weights_path"]), run_dir, best["size"], crop_pct, console)
    accelerator.wait_for_everyone()
    return {"rows": rows, "meta": summary, "output": str(out)}


CSV_COLUMNS = ("size", "resize", "top1", "top5", "loss", "correct", "correct5", "count", "diff_vs_train", "diff_low", "diff_high",
               "gained", "lost", "forward_seconds", "images_per_s", "act_zero_frac", "act_mean", "act_std")


def per_class_accuracy(rows: list[dict], labels: list[int], classes: list[str]) -> dict:
    """{size: {class: {"top1", "correct", "count"}}} from each row's per-image results (the
    validation images' order, `labels`): exact whatever the number of processes."""
    labels = torch.tensor(labels)
    table = {}
    for r in rows:
        correct = r["per_image_correct"]
        table[str(r["size"])] = {}
        for index, name in enumerate(classes):
            mine = labels == index
            n, right = int(mine.sum()), int(correct[mine].sum())
            table[str(r["size"])][name] = {"top1": right / n if n else None, "correct": right, "count": n}
    return table


def write_best_size(weights: Path, run_dir: Path | None, size: int, crop_pct: float, console) -> None:
    """--write-best: the swept weights' metadata says test_res = `size` (at the sweep's
    crop_pct), and the run's timm export is written again from them."""
    from fixres.checkpoint import update_metadata
    from fixres.export import write_run_export
    update_metadata(weights, test_res=size, input_size=[3, size, size], crop_pct=crop_pct)
    console.print(f"--write-best: {weights} now says test_res {size} px (crop_pct {crop_pct})")
    write_run_export(run_dir or weights.parent, console, weights=weights)


def write_outputs(out: Path, rows: list[dict], summary: dict, title: str, per_class: dict | None = None) -> None:
    """sweep.csv, sweep.json (rows, summary, per-class top-1, activation histograms), sweep.png,
    activations.png."""
    from fixres import plots
    from fixres.checkpoint import atomic_write, write_json_atomic
    table = [{k: r[k] for k in CSV_COLUMNS if k in r} for r in rows]
    lines = [",".join(CSV_COLUMNS)] + [",".join(str(r.get(k, "")) for k in CSV_COLUMNS) for r in table]
    atomic_write(out / "sweep.csv", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    record = {"meta": summary, "rows": table, **({"per_class": per_class} if per_class else {})}
    if "act_hist" in rows[0]:
        record["activations"] = {"edges": ACT_EDGES.tolist(), "hist": {str(r["size"]): r["act_hist"] for r in rows}}
        plots.plot_activation_cdfs(rows, ACT_EDGES.tolist(), out / "activations.png", train_res=summary["train_res"])
    write_json_atomic(out / "sweep.json", record)
    plots.plot_sweep(rows, out / "sweep.png", train_res=summary["train_res"], predicted=summary["predicted_best"],
                     title=title)
