"""FixRes fine-tuning: adapt a trained classifier to a new test resolution.

    accelerate launch finetune.py --checkpoint runs/<name> --res 384
    python finetune.py --checkpoint runs/<name>                       # --res auto: choose, then fine-tune
    python finetune.py --checkpoint runs/<name> --method bn-stats     # no gradients, seconds
    python finetune.py --checkpoint runs/<name> --method parametric   # the paper's Frechet map

Fine-tuning (the paper's main method): every parameter is frozen except the
classifier's (and with --train-bn-affine the last BatchNorm's weight and bias); the
model is in eval mode except that last BatchNorm before the global pooling, which
normalises with batch statistics and re-estimates its running ones at the new
resolution. Nothing before it requires grad, so autograd records nothing there and
a step costs little more than a forward pass. That BatchNorm is replaced by
`SyncedBatchNorm2d` (same state dict), whose statistics are those of the global
batch on every backend, gloo included, where torch.nn.SyncBatchNorm refuses to run.

The run folder is train.py's; its weights say train_res = the original K_train,
test_res = input_size = the new resolution, crop_pct, interpolation and min_scale (the
source's, unless given on the command line), so sweep.py and any fixres evaluation
preprocess for the new resolution and predict from the source's training crops.

--res auto chooses the size on --choice-images training images (1000, drawn with --seed),
swept at every candidate size, and the validation split, which the choice never sees,
reports before and after: choosing on the reported images would add the luck of the
choice to the reported gain. finetune.json says which images did what ("chosen_on",
"reported_on") and keeps the choice sweep's rows ("choice_sweep"). It holds the accuracies at
the training resolution, at the new one before and after, and the paired differences
after - before and after - training resolution (and before - training resolution) on the
same validation images with their 95% intervals (fixres.stats). "after" is measured on the
weights the run ships (best.safetensors: the best epoch on validation, `after_epoch`), and
`last_epoch` keeps the last epoch's numbers when that is another epoch. activations.png:
the distributions of the pooled features there.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2

from fixres import adapt
from fixres import checkpoint as ckpt
from fixres.adapt import (SyncedBatchNorm2d, find_last_bn, finetune_modes, freeze_for_finetuning,  # noqa: F401
                          install_synced_bn, prepare_for_finetuning)
from fixres.config import FINETUNE_SHAPES_PRESET, RUNS, ConfigError, FinetuneConfig
from fixres.data import DataError, EpochSampler, ImageDataset, collate_skipping, round_batches, worker_count
from fixres.device_decode import CropSpec, ReadForDevice, ResizeSpec, resolve_decode
from fixres.engine import top5_k
from fixres.export import write_run_export
from fixres.models import ModelError, load_run_model
from fixres.report import EpochProgress, config_table, finetune_table, make_console
from fixres.resolution import recommended_test_res, resize_size
from fixres.stats import METHOD as STATS_METHOD
from fixres.stats import paired_difference_of
from fixres.sweep import (ACT_EDGES, SweepConfig, _run_folder, add_differences, default_sizes,
                          load_for_sweep, run_sweep, trained_min_scale)
from fixres.training import Job, make_accelerator, new_run_dir, resumed_config, train, weights_meta
from fixres.transforms import INTERPOLATIONS, IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform


class HorizontalShiftCrop(nn.Module):
    """A size x size crop at the vertical centre and a random horizontal offset: the centre
    crop's framing, translated sideways (the FixRes v2 fine-tuning crop). The offset is
    uniform over the whole margin; the reference's `center_crop_new` draws centre +- a
    uniform integer, the same range with the centre offset twice as likely (README says why
    this one is kept)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img):
        height, width = v2.functional.get_size(img)
        top = int(round((height - self.size) / 2.0))
        left = int(torch.randint(0, max(width - self.size, 0) + 1, ()).item())
        return v2.functional.crop(img, top, left, self.size, self.size)


def finetune_transform(*, aug: str, size: int, crop_pct: float = 0.875, interpolation: str = "bilinear",
                       min_scale: float = 0.08, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """test: the test-time preprocessing at `size`; test+: the same framing with a flip, a
    horizontal shift and ColorJitter(0.05, 0.05, 0.05); rrc: RandomResizedCrop(size)."""
    if aug == "test":
        return eval_transform(size=size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
    if aug == "rrc":
        return train_transform(size=size, min_scale=min_scale, interpolation=interpolation, mean=mean, std=std)
    if aug != "test+":
        raise ConfigError(f"--aug must be one of test, test+, rrc, got {aug!r}")
    return v2.Compose([
        v2.Resize(resize_size(size, crop_pct), interpolation=INTERPOLATIONS[interpolation], antialias=True),
        HorizontalShiftCrop(size), v2.RandomHorizontalFlip(), v2.ColorJitter(0.05, 0.05, 0.05),
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


# ---------------------------------------------------------------------------------------------
# The job finetune.py runs: source run -> (sweep) -> before -> method -> after -> run folder.

def finetune(cfg: FinetuneConfig, explicit: set[str] = frozenset()) -> dict:
    """Load the source run, choose the resolution (--res auto), evaluate before, apply the
    method, evaluate after, write the run folder, finetune.json and activations.png."""
    accelerator = make_accelerator(cfg)
    console = make_console(accelerator.is_main_process)
    decode = resolve_decode(cfg.decode, accelerator.device)  # --decode gpu without torchcodec: refused before any work
    if cfg.checkpoint is None and cfg.resume is None:  # right after train.py: its newest run, not a fine-tuned one
        cfg = dataclasses.replace(cfg, checkpoint=str(ckpt.newest_run(Path(cfg.output or RUNS), trained_only=True)))
        console.print(f"--checkpoint not given: using the newest train.py run {cfg.checkpoint}")
    if cfg.resume == "auto":  # a requeued SLURM job: the run of its --name, if it got as far as a checkpoint
        output = Path(cfg.output) if cfg.output else beside_source(ckpt.find_weights(Path(cfg.checkpoint)))
        found = ckpt.resolve_resume("auto", output, name=cfg.name)
        if found is None:
            console.print(f"--resume auto: no checkpoint under {output / cfg.name}/, starting fresh")
        cfg = dataclasses.replace(cfg, resume=str(found) if found else None)
    if cfg.resume:
        resume_from = ckpt.resolve_resume(cfg.resume, Path(cfg.output or "."))
        cfg = dataclasses.replace(resumed_config(resume_from, cfg, explicit), resume=str(resume_from))
        decode = resolve_decode(cfg.decode, accelerator.device)  # the resumed run's own
        if cfg.checkpoint is None:
            raise ConfigError(f"--resume {cfg.resume}: not a finetune.py run (its config names no --checkpoint)")
    source_meta(cfg.checkpoint)
    try:
        model, meta, split, source_dir, source_cfg = load_for_sweep(
            SweepConfig(checkpoint=cfg.checkpoint, data=cfg.data, images=cfg.images), accelerator)
    except DataError as err:
        if str(err).endswith("the validation split is empty"):
            raise ConfigError(f"finetune.py measures before and after on the validation split, and there is none "
                              f"({err})") from None
        raise
    if "data" in source_cfg and source_cfg["data"] is None and not cfg.resume:  # the built-in data: its preset
        cfg = dataclasses.replace(cfg, **{k: v for k, v in FINETUNE_SHAPES_PRESET.items() if k not in explicit})
    if cfg.method == "parametric" and hasattr(model, adapt.ADAPTER):
        raise ConfigError(f"--method parametric: {meta['weights_path']} carries a parametric adapter already; "
                          f"adapt the run it came from ({meta.get('finetuned_from', 'its source')})")
    output = cfg.output or str(beside_source(Path(meta["weights_path"])))
    if cfg.name and not cfg.resume:  # before the sweep: refuse now, not minutes later
        _check_free(Path(output) / cfg.name)
    train_res = int(meta["train_res"])
    # the source's preprocessing and crop scale, unless given on this command line: --aug rrc
    # crops as the source was trained, and the new run's weights and config say so
    crop_pct = cfg.crop_pct if "crop_pct" in explicit else meta.get("crop_pct", cfg.crop_pct)
    interpolation = cfg.interpolation if "interpolation" in explicit else meta.get("interpolation", cfg.interpolation)
    min_scale = cfg.min_scale if "min_scale" in explicit else trained_min_scale(meta, source_cfg)
    eval_meta = {**meta, "interpolation": interpolation}
    last_bn = find_last_bn(model, input_size=train_res)
    workers = worker_count(cfg.workers)
    sweep = dict(batch_size=cfg.batch_size, workers=workers, activations=True, decode=decode)

    # before: the training resolution and the new one (--res auto: every size of the sweep)
    predicted = recommended_test_res(train_res=train_res, crop_pct=crop_pct, scale=(min_scale, 1.0))
    if cfg.res == "auto":
        res, why, choice_rows = _choose_res(cfg, model, eval_meta, split, crop_pct, accelerator, console, sweep,
                                            train_res=train_res, predicted=predicted, last_bn=last_bn)
        chosen_on = f"{choice_rows[0]['count']} training images"
        console.print(why)
    else:
        res, why, choice_rows, chosen_on = cfg.res, f"--res {cfg.res}", [], None
    # before: the training resolution and the new one, on the validation split the choice never saw
    reported_on = f"validation split ({len(split.val)} images)"
    sizes = sorted({train_res, res})
    with EpochProgress(console, f"before: {len(sizes)} size(s)", len(split.val)) as bar:
        # a copy: run_sweep moves the model inside inference_mode, after which it cannot be trained
        rows = run_sweep(copy.deepcopy(model), eval_meta, split, sizes, crop_pct, accelerator, progress=bar, **sweep)
    by_size = {r["size"]: r for r in rows}

    source_name = source_dir.name if source_dir else Path(meta["weights_path"]).stem
    cfg = dataclasses.replace(
        cfg, res=res, model=meta["model"], output_stride=meta.get("output_stride"), train_res=train_res,
        test_res=res, crop_pct=crop_pct, interpolation=interpolation, min_scale=min_scale,
        # the source's normalisation, as its weights' metadata records it (runs before it did: ImageNet's)
        mean=list(meta.get("mean", IMAGENET_MEAN)), std=list(meta.get("std", IMAGENET_STD)),
        # the built-in data's CSV as the source's sweep found it (its images depend on the source's seed)
        data=cfg.data or source_cfg.get("data") or split.source,
        images=cfg.images or source_cfg.get("images"),
        output=output,
        name=cfg.name or f"{source_name}-{cfg.method}-{res}px-{time.strftime('%Y%m%d-%H%M%S')}")
    extra = dict(finetune_res=res, finetune_method=cfg.method, finetuned_from=meta["weights_path"], last_bn=last_bn)
    start = time.perf_counter()
    records, shipped = [], {}
    if cfg.method == "finetune":
        result = _finetune(cfg, explicit, model, meta, extra, accelerator, decode)
        if result["stopped"]:
            return result
        run_dir, records = Path(result["run_dir"]), result["records"]
        # the run ships its best epoch on validation (best.safetensors, what sweep.py loads),
        # not the last one in memory: "after" is measured on those weights
        model, shipped = load_run_model(run_dir, "best")
    else:
        run_dir = _check_free(new_run_dir(cfg, "", accelerator))
        console.print(config_table({**cfg.to_dict(), "run folder": run_dir, "dataset": split.source,
                                    "processes": accelerator.num_processes, "device": accelerator.device},
                                   title="fixres finetune: resolved config"))
        model.to(accelerator.device)
        if cfg.channels_last is None:  # as train.py: on for GPUs, off on CPUs
            cfg = dataclasses.replace(cfg, channels_last=accelerator.device.type == "cuda")
        adapt_args = (cfg, model, split, accelerator, console, workers)
        extra.update(_bn_stats(cfg, model, split, eval_meta, accelerator, console, workers, last_bn)
                     if cfg.method == "bn-stats" else _parametric(*adapt_args))
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_json_atomic(run_dir / "config.json", cfg.to_dict())
            ckpt.write_json_atomic(run_dir / "classes.json", split.classes)
            for which in ("best", "last"):
                ckpt.save_weights(run_dir / f"{which}.safetensors", model.state_dict(),
                                  weights_meta(cfg, split.classes, **extra))
            write_run_export(run_dir, console)  # train() writes it for --method finetune
    seconds = time.perf_counter() - start

    with EpochProgress(console, f"after: {res} px", len(split.val)) as bar:
        after = run_sweep(model, eval_meta, split, [res], crop_pct, accelerator, progress=bar, **sweep)[0]
    after_epoch = shipped.get("epoch")
    stages = [(f"trained resolution {train_res} px, as trained", by_size[train_res]),
              (f"{res} px, before", by_size[res]),
              (f"{res} px, after {cfg.method}" + (f", epoch {after_epoch} (best.safetensors)" if after_epoch else "")
               + f" ({seconds:.0f} s)", after)]
    last = records[-1] if records and records[-1]["epoch"] != after_epoch else None
    if last:  # numbers from train.py's evaluation of that epoch, the same preprocessing
        last = {"epoch": last["epoch"], "top1": last["val_acc"], "top5": last.get("val_top5"), "loss": last["val_loss"]}
    correct = {key: row["per_image_correct"] for key, (_, row) in zip(("train_res", "before", "after"), stages)}
    differences = {f"{a}_vs_{b}": paired_difference_of(correct[a], correct[b])  # the same validation images
                   for a, b in (("after", "before"), ("after", "train_res"), ("before", "train_res"))}
    summary = {"source": meta["weights_path"], "model": meta["model"], "method": cfg.method,
               "aug": cfg.aug if cfg.method == "finetune" else None, "train_res": train_res, "res": res,
               "res_choice": why, "chosen_on": chosen_on, "reported_on": reported_on, "predicted_res": predicted,
               "crop_pct": crop_pct, "last_bn": last_bn,
               "top1": {"train_res": by_size[train_res]["top1"], "before": by_size[res]["top1"], "after": after["top1"]},
               "top5": {"train_res": by_size[train_res]["top5"], "before": by_size[res]["top5"], "after": after["top5"]},
               "top5_k": top5_k(len(split.classes)),
               "loss": {"train_res": by_size[train_res]["loss"], "before": by_size[res]["loss"], "after": after["loss"]},
               "differences": {**differences, "interval": STATS_METHOD},
               "val_images": after["count"], "method_seconds": seconds, "processes": accelerator.num_processes,
               "device": str(accelerator.device), "sweep": [{k: r[k] for k in ("size", "top1", "top5", "loss")} for r in rows],
               "after_epoch": after_epoch, **({"last_epoch": last} if last else {}),
               "choice_sweep": [{k: r[k] for k in CHOICE_KEYS} for r in choice_rows],
               "epochs": records, **{k: v for k, v in extra.items() if k not in ("last_bn", "finetuned_from")}}
    last_row = [(f"{res} px, last epoch {last['epoch']} (last.safetensors)", last)] if last else []
    console.print(finetune_table(stages, differences, title=f"fixres finetune: {run_dir}", also=last_row,
                                 top5_label=f"top-{top5_k(len(split.classes))}"))
    console.print(f"vs: the difference in top-1, in points, on the same {after['count']} validation images; "
                  f"{STATS_METHOD}")
    console.print(f"chosen on: {chosen_on or 'given (--res)'}; reported on: {reported_on}")
    if accelerator.is_main_process:
        ckpt.write_json_atomic(run_dir / "finetune.json", summary)
        plot_activations([(label, r["act_hist"]) for label, r in stages], run_dir / "activations.png",
                         title=f"{meta['model']}: pooled features before the classifier")
        console.print(f"wrote {run_dir}/finetune.json, activations.png and the weights (test_res {res} px)")
    accelerator.wait_for_everyone()
    return {**summary, "run_dir": str(run_dir), "stopped": False}


CHOICE_KEYS = ("size", "top1", "top5", "loss", "count", "diff_vs_train", "diff_low", "diff_high", "gained", "lost")


def _choose_res(cfg, model, eval_meta, split, crop_pct, accelerator, console, sweep, *, train_res, predicted,
                last_bn):
    """--res auto: the size that does best on --choice-images training images (drawn with
    --seed) once the last BN's statistics are re-estimated there: a seconds-long stand-in for
    fine-tuning at every size, which moves the best size up (the paper's point; without it the
    choice stops where the untouched statistics still fit). Ties go to the larger size. Never
    the validation images that then report before and after: a size chosen on those would
    carry the luck of the choice into the reported gain.
    Returns (size, the printed reason, the sweep's rows)."""
    # FixRes tests higher: the default ladder from the training size up (--sizes: any)
    sizes = sorted(set(cfg.sizes or [s for s in default_sizes(train_res, predicted) if s >= train_res]) | {train_res})
    images = seeded_subset(split.train, cfg.choice_images, cfg.seed)
    rows = []
    for size in sizes:
        trial = copy.deepcopy(model).to(accelerator.device)
        with EpochProgress(console, f"choosing: {size} px, last BN re-estimated", len(images)) as bar:
            _reestimate_last_bn(trial, images, size, cfg, eval_meta, crop_pct, accelerator, sweep["workers"], last_bn)
            rows += run_sweep(trial, eval_meta, split, [size], crop_pct, accelerator, progress=bar, samples=images,
                              **{**sweep, "activations": False})
    by_size = {r["size"]: r for r in add_differences(rows, train_res)}
    res = max(rows, key=lambda r: (r["top1"], r["size"]))["size"]
    drawn = f"drawn with --seed {cfg.seed}" if len(images) < len(split.train) else "all of them"
    why = (f"--res auto: {res} px, the best of the sweep ({', '.join(map(str, sizes))} px) on {len(images)} training "
           f"images ({drawn}) with the last BN's statistics re-estimated at each size: top-1 "
           f"{100 * by_size[res]['top1']:.2f}% against {100 * by_size[train_res]['top1']:.2f}% at the training "
           f"resolution {train_res} px; the apparent-size model predicts {predicted} px")
    if res == train_res:
        why += "; no larger size did better, so this only adapts the last BN to test-style crops"
    return res, why, rows


def seeded_subset(samples: list, count: int, seed: int) -> list:
    """`count` samples (all when there are fewer) in an order drawn with `seed`: the same on every process."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    return [samples[i] for i in order[:count].tolist()]


def _finetune(cfg, explicit, model, meta, extra, accelerator, decode: str) -> dict:
    """The training loop of train.py on the frozen model, its last BN synced and in train mode."""
    bn = install_synced_bn(model, extra["last_bn"])
    freeze_for_finetuning(model, last_bn=extra["last_bn"], train_bn_affine=cfg.train_bn_affine)
    job = Job(title="finetune", accelerator=accelerator, classes=meta["classes"],
              build_model=lambda c, classes: model, set_modes=finetune_modes(bn),
              transforms=lambda c: finetune_transforms(c, decode),
              meta=lambda c, classes: weights_meta(c, classes, **extra), next_steps=False)
    return train(cfg, explicit, job)


def finetune_transforms(cfg, decode: str) -> tuple:
    """(training, evaluation) transforms at --res. With --decode gpu the evaluation and --aug
    test / rrc decode on the device; test+ (flip, jitter, shifted crop) has no device version
    and stays in the workers."""
    resize = dict(crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
    normalised = dict(resize, mean=cfg.mean, std=cfg.std)
    training = finetune_transform(aug=cfg.aug, size=cfg.res, min_scale=cfg.min_scale, **normalised)
    if decode != "gpu":
        return training, eval_transform(size=cfg.res, **normalised)
    # on the device: uint8 batches, normalised with cfg.mean / cfg.std by the training loop
    evaluation = ReadForDevice(ResizeSpec((cfg.res,), **resize), skip_bad=cfg.skip_bad_images)
    if cfg.aug == "test":
        return evaluation, evaluation
    if cfg.aug == "rrc":
        return ReadForDevice(CropSpec(cfg.res, cfg.interpolation), min_scale=cfg.min_scale,
                             skip_bad=cfg.skip_bad_images), evaluation
    return training, evaluation


def _bn_stats(cfg, model, split, eval_meta, accelerator, console, workers, last_bn) -> dict:
    """The last BN's running statistics, re-estimated over the training split at the new
    resolution with the test preprocessing (one pass, no gradients)."""
    with EpochProgress(console, f"bn-stats at {cfg.res} px", len(split.train)):
        seen = _reestimate_last_bn(model, split.train, cfg.res, cfg, eval_meta, cfg.crop_pct, accelerator, workers,
                                   last_bn)
    return {"bn_stats_images": seen}


def _reestimate_last_bn(model, samples, size, cfg, eval_meta, crop_pct, accelerator, workers, last_bn) -> int:
    """Every sample counts once: a shuffled order cut into rounds of --batch-size per process,
    the last round partial, not padded by Accelerate's repeats nor dropped. Returns the images seen."""
    tf = eval_transform(size=size, crop_pct=crop_pct, interpolation=eval_meta["interpolation"],
                        mean=eval_meta.get("mean", IMAGENET_MEAN), std=eval_meta.get("std", IMAGENET_STD))
    order = EpochSampler(len(samples), cfg.seed).order()
    rounds = [[order[i] for i in batch] for batch in
              round_batches(len(order), cfg.batch_size, accelerator.process_index, accelerator.num_processes)]
    loader = torch.utils.data.DataLoader(ImageDataset(samples, tf, cfg.skip_bad_images), batch_sampler=rounds,
                                         collate_fn=collate_skipping, num_workers=workers)
    channels_last = accelerator.device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    return adapt.reestimate_bn_stats(model, model.get_submodule(last_bn), loader, accelerator,
                                     channels_last=channels_last)


def _parametric(cfg, model, split, accelerator, console, workers) -> dict:
    """Fit the Frechet model to the pooled features of --fit-images training images at the
    training and at the new resolution; attach the equalising map before the classifier."""
    subset = seeded_subset(split.train, cfg.fit_images, cfg.seed)
    fits = {}
    for size in (cfg.train_res, cfg.res):
        tf = eval_transform(size=size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation, mean=cfg.mean,
                            std=cfg.std)
        loader = torch.utils.data.DataLoader(ImageDataset(subset, tf, cfg.skip_bad_images), batch_size=cfg.batch_size,
                                             collate_fn=collate_skipping, num_workers=workers)
        with EpochProgress(console, f"pooled features at {size} px", len(subset)):
            features = adapt.pooled_features(model, accelerator.prepare(loader), accelerator,
                                             channels_last=cfg.channels_last)
        fits[size] = adapt.fit_gev(features, per_feature=cfg.parametric_scope == "feature")
    adapter = adapt.FrechetAdapter(*fits[cfg.res], *fits[cfg.train_res])
    adapt.attach_adapter(model, adapter.to(accelerator.device))
    return {"adaptation": {"kind": "frechet", "xi": adapt.XI, "scope": cfg.parametric_scope,
                           "module": adapt.ADAPTER, "fit_images": len(features)}}


def beside_source(weights: Path) -> Path:
    """Where a fine-tuning run goes without --output: beside the source run folder, or
    beside the weights file when it is not in one."""
    source_dir = _run_folder(weights)
    return source_dir.parent if source_dir else weights.parent


def _check_free(run_dir: Path) -> Path:
    """A run folder that holds weights already is not overwritten (train.py's rule for checkpoints)."""
    if ckpt.list_checkpoints(run_dir) or (run_dir / "best.safetensors").exists():
        raise ckpt.CheckpointError(f"{run_dir} already holds a run; choose another --name"
                                   + (f" or continue it with --resume {run_dir}" if ckpt.list_checkpoints(run_dir) else ""))
    return run_dir


def source_meta(path: str) -> dict:
    """The fixres metadata of the weights to fine-tune; a one-line error if they are not a
    fixres classifier (no model name and classes)."""
    from safetensors import safe_open
    weights = ckpt.find_weights(Path(path))
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(ckpt.META_KEY, "{}"))
    except Exception as err:
        raise ckpt.CheckpointError(f"{weights}: unreadable weights ({str(err).splitlines()[0][:160]})") from None
    if not (meta.get("model") and meta.get("classes") and meta.get("train_res")):
        raise ModelError(f"--checkpoint {weights}: not a classifier trained by fixres (its metadata names no "
                         f"model, classes and train_res); give a run folder written by train.py")
    return meta


def timm_overlay(weights: str | Path) -> dict:
    """`pretrained_cfg_overlay` for timm.create_model(name, num_classes=n, pretrained=True, ...):
    the file, plus the class count (without it timm drops a classifier whose size differs
    from the architecture's default 1000) and the preprocessing the weights expect."""
    path = ckpt.find_weights(Path(weights))
    meta = source_meta(str(path))
    return {"file": str(path), "num_classes": len(meta["classes"]),
            "input_size": tuple(meta.get("input_size") or (3, meta["test_res"], meta["test_res"])),
            "crop_pct": meta.get("crop_pct", 0.875), "interpolation": meta.get("interpolation", "bilinear"),
            "mean": tuple(meta.get("mean", IMAGENET_MEAN)), "std": tuple(meta.get("std", IMAGENET_STD))}


def plot_activations(curves, path: Path, *, title: str) -> None:
    """Cumulative distributions of the pooled features, from sweep.py's exact histograms."""
    import numpy as np
    from matplotlib.figure import Figure
    x = ACT_EDGES.numpy()
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
    ckpt.atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
