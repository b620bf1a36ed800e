"""The training job that train.py runs: data -> model -> epochs -> run folder.

    python train.py                                  # built-in shapes data, CPU-sized preset
    accelerate launch train.py --data train.csv      # ResNet-50 at 224, DDP on all GPUs
    torchrun --nproc_per_node 2 train.py --cpu       # two CPU processes over gloo
    python train.py --resume auto                    # continue the newest run under runs/

Determinism: the data order is a function of (seed, epoch) and each sample's
augmentation a function of (seed, epoch, sample index), so a resumed run sees the
same images with the same crops as an uninterrupted one, whatever the number of
workers, and a run stopped mid-epoch continues with the batches it had not seen.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list

from fixres import checkpoint as ckpt
from fixres.config import ConfigError, TrainConfig, load_config
from fixres.data import (PREFETCH_BATCHES, EpochSampler, ImageDataset, collate_skipping, load_split,
                         loader_options, worker_count)
from fixres.device_decode import CropSpec, ReadForDevice, ResizeSpec, resolve_decode
from fixres.ema import ModelEma
from fixres.engine import (NONFINITE_HINT, NonFiniteLossError, ProcessGroupError, cosine_lr, evaluate, top5_k,
                           train_one_epoch)
from fixres.export import write_run_export
from fixres.models import (PREPROCESSING_KEYS, check_model_name, classifier_name, create_model, load_weights_into,
                           pretrained_preprocessing)
from fixres.report import EpochProgress, config_table, epoch_line, make_console, metrics_table, write_jsonl
from fixres.transforms import (IMAGENET_MEAN, IMAGENET_STD, BatchMix, DecodeRandomResizedCrop, crop_augment,
                               eval_transform, train_transform)

# Options that define what a run is: a resumed run must keep them.
IDENTITY_KEYS = ("model", "data", "images")


def make_accelerator(cfg: TrainConfig, **kwargs) -> Accelerator:
    # Denormal floats (weights and gradients decaying towards zero) make x86 CPUs many
    # times slower; epochs of the built-in demo went from 40 s to over 200 s without this.
    torch.set_flush_denormal(True)
    # cuDNN tries its convolution algorithms once per input shape and keeps the fastest;
    # fixres's shapes are fixed within a run (drop_last in training)
    torch.backends.cudnn.benchmark = True
    # a rank that died or hangs ends the others' wait at the next collective after this long.
    # Accelerate forwards only the values that differ from the class's defaults (600 s, NCCL's),
    # which would leave gloo at torch's 30 minutes when 600 s is asked for: forward it always.
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))
    group.to_kwargs = lambda: {"timeout": group.timeout}
    return Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, kwargs_handlers=[group],
                       gradient_accumulation_steps=cfg.grad_accum, log_with=cfg.log_with, **kwargs)


def resolve_data(cfg: TrainConfig, accelerator: Accelerator) -> tuple[str, str | None, str]:
    """(data path, image folder, short name); generates the built-in dataset on first use."""
    if cfg.data:
        return cfg.data, cfg.images, Path(cfg.data).stem or "data"
    from fixres.shapes import ensure_shapes
    with accelerator.local_main_process_first():
        csv = ensure_shapes(seed=cfg.seed)  # --seed draws the images too: seeds are independent replications
    return str(csv), None, "shapes"


class StopRequest:
    """SIGTERM, SIGINT and SIGUSR1 (SLURM's early warning) ask for a checkpoint at the
    next step boundary; every rank stops at the same step because the flag is reduced."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received: str | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __call__(self) -> bool:
        flag = torch.tensor(float(self.received is not None), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max").item() > 0)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@dataclass
class RunState:
    """What a checkpoint restores besides weights and optimizer."""
    epoch: int = 0             # epoch in progress (0-based)
    batch_in_epoch: int = 0    # batches of `epoch` already trained (mid-epoch stop)
    step: int = 0              # optimizer steps so far
    best_acc: float = -1.0
    records: list = field(default_factory=list)


def new_run_dir(cfg: TrainConfig, data_name: str, accelerator: Accelerator) -> Path:
    name = cfg.name or "-".join([data_name, re.sub(r"[^\w.]+", "_", cfg.model), str(cfg.train_res),
                                 time.strftime("%Y%m%d-%H%M%S")])
    name = broadcast_object_list([name])[0] if accelerator.num_processes > 1 else name
    run_dir = Path(cfg.output) / name
    if ckpt.list_checkpoints(run_dir):
        raise ckpt.CheckpointError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                                   f"or choose another --name")
    return run_dir


def resumed_config(checkpoint: Path, cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The run's saved config, with the options given on this command line on top."""
    saved = load_config(type(cfg), checkpoint.parent.parent / "config.json").to_dict()
    for key in explicit:
        value = getattr(cfg, key)
        if key in IDENTITY_KEYS and value != saved[key]:
            raise ckpt.CheckpointError(f"--resume {checkpoint}: the run was trained with "
                                       f"--{key.replace('_', '-')} {saved[key]}, not {value}")
        saved[key] = value
    return type(cfg)(**saved)


def weights_meta(cfg: TrainConfig, classes: list[str], **extra) -> dict:
    """The preprocessing a set of weights expects, stored inside the weights file."""
    return {"model": cfg.model, "output_stride": cfg.output_stride, "classes": classes, "num_classes": len(classes), "train_res": cfg.train_res,
            "test_res": cfg.eval_res, "input_size": [3, cfg.eval_res, cfg.eval_res], "crop_pct": cfg.crop_pct,
            "interpolation": cfg.interpolation, "min_scale": cfg.min_scale, "mean": list(cfg.mean or IMAGENET_MEAN),
            "std": list(cfg.std or IMAGENET_STD), **extra}


def resolve_preprocessing(cfg: TrainConfig, explicit: set[str], *, resumed: bool = False) -> tuple[TrainConfig, str]:
    """The normalisation (and crop_pct, interpolation) a run trains and evaluates with, and
    where it came from, in words. Options given on the command line win; then, with
    --pretrained or --weights, what those weights were made with: a fixres weights file's
    metadata, else the library's pretrained config of the model (timm's pretrained_cfg,
    torchvision's weights transforms); else ImageNet's mean and std and the option defaults.
    A resumed run keeps its config; one saved before mean/std were options used ImageNet's."""
    own, source = {}, "ImageNet's mean and std (training from scratch)"
    if resumed:
        source = "the run's config"
    elif cfg.mean is not None and "mean" not in explicit:
        source = "the job's config (finetune.py: the source weights' metadata)"
    elif cfg.pretrained or cfg.weights:
        own = {k: v for k, v in ckpt.read_metadata(Path(cfg.weights)).items() if k in PREPROCESSING_KEYS} \
            if cfg.weights else {}
        source = f"the metadata of {cfg.weights}"
        if not own:
            own = pretrained_preprocessing(cfg.model)
            library = "torchvision's weights transforms" if cfg.model.startswith("tv:") else "timm's pretrained_cfg"
            taken = "--weights taken for its pretrained weights" if cfg.weights else "--pretrained"
            source = f"{library} of {cfg.model} ({taken})"
    keep = lambda key: key in explicit or key not in own  # noqa: E731
    cfg = dataclasses.replace(
        cfg, mean=list(cfg.mean or own.get("mean") or IMAGENET_MEAN), std=list(cfg.std or own.get("std") or IMAGENET_STD),
        crop_pct=cfg.crop_pct if keep("crop_pct") else float(own["crop_pct"]),
        interpolation=cfg.interpolation if keep("interpolation") else own["interpolation"])
    given = [f"--{k.replace('_', '-')}" for k in ("mean", "std", "crop_pct", "interpolation") if k in explicit]
    return cfg, (f"mean {_numbers(cfg.mean)}, std {_numbers(cfg.std)}, crop_pct {cfg.crop_pct:g}, "
                 f"{cfg.interpolation}: {source}" + (f"; given: {' '.join(given)}" if given else ""))


def _numbers(values) -> str:
    return " ".join(f"{v:g}" for v in values)


def default_train_transform(cfg: TrainConfig, device: torch.device):
    """train.py's training augmentation: with --decode gpu (or auto on CUDA with torchcodec)
    the workers read bytes and draw the crop, decoded on `device` (fixres.device_decode);
    else the fast decoder unless --no-fast-decode; a run configured before it was the
    default (fast_decode null) keeps its GPU-only choice. --auto-augment and --random-erase
    follow the crop on the CPU paths: with either, auto decodes on the CPU."""
    on_device = resolve_decode(cfg.decode, device) == "gpu" and not (cfg.auto_augment or cfg.random_erase)
    if on_device:
        return ReadForDevice(CropSpec(cfg.train_res, cfg.interpolation), min_scale=cfg.min_scale,
                             skip_bad=cfg.skip_bad_images)
    fast_decode = cfg.fast_decode if cfg.fast_decode is not None else device.type == "cuda"
    augment = crop_augment(auto_augment=cfg.auto_augment, random_erase=cfg.random_erase,
                           interpolation=cfg.interpolation)
    if fast_decode:  # uint8 crops: the engine normalises them on the device with cfg.mean and cfg.std
        return DecodeRandomResizedCrop(size=cfg.train_res, min_scale=cfg.min_scale, interpolation=cfg.interpolation,
                                       augment=augment)
    return train_transform(size=cfg.train_res, min_scale=cfg.min_scale, interpolation=cfg.interpolation,
                           mean=cfg.mean or IMAGENET_MEAN, std=cfg.std or IMAGENET_STD,  # None: not resolved yet
                           augment=augment)


def epoch_score(record: dict) -> tuple[float, str]:
    """An epoch's validation top-1 and the weights that reached it: the EMA's ("ema") when
    it did strictly better than the raw weights ("raw")."""
    ema = record.get("ema_val_acc")
    return (ema, "ema") if ema is not None and ema > record["val_acc"] else (record["val_acc"], "raw")


def weights_files(meta: dict, weights: dict, ema_weights: dict | None, record: dict | None,
                  best: str | None) -> dict[str, tuple[dict, dict]]:
    """{file name: (state dict, metadata)} that a save writes beside the checkpoint:
    last.safetensors (the raw weights), ema.safetensors (with --model-ema) and, when `best`
    says which of the two ("raw", "ema") is the run's best so far, best.safetensors.
    `record`: the epoch's, None for a stop in the middle of an epoch."""
    at = {"epoch": record["epoch"], "val_acc": record["val_acc"]} if record else {}
    files = {"last.safetensors": (weights, {**meta, **at, **({"ema": False} if ema_weights is not None else {})})}
    if ema_weights is not None:
        files["ema.safetensors"] = (ema_weights, {**meta, **at, "ema": True,
                                                  **({"val_acc": record["ema_val_acc"]} if record else {})})
    if best:
        files["best.safetensors"] = files["ema.safetensors" if best == "ema" else "last.safetensors"]
    return files


def default_eval_transform(cfg: TrainConfig, device: torch.device):
    """train.py's validation preprocessing at --test-res, on `device` with --decode gpu."""
    if resolve_decode(cfg.decode, device) == "gpu":
        return ReadForDevice(ResizeSpec((cfg.eval_res,), cfg.crop_pct, cfg.interpolation), skip_bad=cfg.skip_bad_images)
    return eval_transform(size=cfg.eval_res, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
                          mean=cfg.mean, std=cfg.std)


def build_loaders(split, cfg: TrainConfig, *, train_tf, eval_tf, workers: int, pin_memory: bool,
                  persistent: bool = True, prefetch: int = PREFETCH_BATCHES):
    """The training and validation loaders. Their workers stay from epoch to epoch
    (`persistent`; benchmarks/speed.py --parts epochs measures it against re-created ones):
    the training epoch reaches them with each index (EpochSampler)."""
    common = dict(collate_fn=collate_skipping, pin_memory=pin_memory,
                  **loader_options(workers, persistent=persistent, prefetch=prefetch))
    train_loader = torch.utils.data.DataLoader(
        ImageDataset(split.train, train_tf, cfg.skip_bad_images, seed=cfg.seed), batch_size=cfg.batch_size,
        sampler=EpochSampler(len(split.train), cfg.seed), drop_last=True, **common)
    val_loader = torch.utils.data.DataLoader(
        ImageDataset(split.val, eval_tf, cfg.skip_bad_images), batch_size=2 * cfg.batch_size,
        shuffle=False, **common)
    return train_loader, val_loader


def build_optimizer(named_params, cfg: TrainConfig, head: str | None = None) -> torch.optim.Optimizer:
    """With `head` (the classifier's name), its parameters get groups of their own, marked
    "head", so that --freeze-epochs can give the others a learning-rate scale of 0."""
    # no weight decay on norms and biases, as timm and torchvision's references do
    params = [(n, p) for n, p in named_params if p.requires_grad]
    groups = [{"params": [p for n, p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if head is not None:
        in_head = lambda n: n.startswith(head + ".")  # noqa: E731
        groups = [{"params": [p for n, p in params if in_head(n) == is_head and (p.ndim > 1) == decay],
                   "weight_decay": cfg.weight_decay if decay else 0.0, "head": is_head}
                  for is_head in (False, True) for decay in (True, False)]
        groups = [g for g in groups if g["params"]]
    # one fused kernel per step instead of a few per tensor, where the parameters are on a GPU
    fused = {"fused": True} if params and all(p.is_cuda for _, p in params) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, **fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, **fused)


AUTO_BATCH_START = 1024   # --batch-size auto halves from here
AUTO_BATCH_CPU = 64


def largest_batch(try_batch: Callable[[int], float], start: int = AUTO_BATCH_START,
                  limit: float = 0.9) -> tuple[int, list[tuple[int, str]]]:
    """Halve the batch size from `start` until `try_batch(b)` runs and returns a peak
    memory fraction <= `limit`; the trials as (size, outcome) for the log."""
    trials, b = [], start
    while b >= 1:
        try:
            peak = try_batch(b)
        except torch.OutOfMemoryError:
            trials.append((b, "out of memory"))
        else:
            trials.append((b, f"peak {100 * peak:.0f}% of memory"))
            if peak <= limit:
                return b, trials
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        b //= 2
    raise ConfigError(f"--batch-size auto: no batch size fits ({trials[-1][1]} at batch 1)")


def auto_batch_size(model, cfg: TrainConfig, accelerator: Accelerator, console) -> int:
    """The largest power of two (<= 1024) whose training step at --train-res fits in 90% of
    the GPU's memory, tried on a copy of the model so that its BatchNorm statistics stay
    untouched. Activations dominate; the optimizer's state (2x the weights for AdamW)
    is inside the 10% kept free. On a CPU: 64."""
    device = accelerator.device
    if device.type != "cuda":
        console.print(f"--batch-size auto: {AUTO_BATCH_CPU} on {device.type} (memory is not what limits it there)")
        return AUTO_BATCH_CPU
    import copy
    trial_model = copy.deepcopy(model).to(device).train()
    total = torch.cuda.get_device_properties(device).total_memory

    def try_batch(b: int) -> float:
        torch.cuda.reset_peak_memory_stats(device)
        x = torch.randn(b, 3, cfg.train_res, cfg.train_res, device=device)
        try:
            with accelerator.autocast():
                trial_model(x).float().mean().backward()
        finally:
            del x
            trial_model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated(device) / total

    batch, trials = largest_batch(try_batch)
    del trial_model
    torch.cuda.empty_cache()
    console.print(f"--batch-size auto: {batch} per process ("
                  + "; ".join(f"{b}: {outcome}" for b, outcome in trials) + ")")
    return batch


@dataclass
class Job:
    """What a job built on this training loop changes; the defaults are train.py's.
    finetune.py sets them all: its model, frozen but for the head and the last BN, its
    preprocessing, its train/eval modes and the metadata of its weights."""
    title: str = "train"
    accelerator: Accelerator | None = None      # the caller's, when it has used one already
    classes: list[str] | None = None            # a fixed class order (a trained model's)
    build_model: Callable | None = None         # (cfg, classes) -> model, requires_grad set as wanted
    transforms: Callable | None = None          # cfg -> (train transform, eval transform)
    set_modes: Callable = lambda model: model.train()   # before each training epoch
    meta: Callable = weights_meta               # (cfg, classes) -> metadata stored with the weights
    next_steps: bool = True                     # end by printing the commands that come next (sweep, finetune)


def head_only_modes(head: torch.nn.Module) -> Callable:
    """--freeze-epochs: the backbone in eval mode (its BatchNorm statistics stay), the head in train mode."""
    def set_modes(model):
        model.eval()
        head.train()
    return set_modes


def train(cfg: TrainConfig, explicit: set[str] = frozenset(), job: Job | None = None) -> dict:
    job = job or Job()
    accelerator = job.accelerator or make_accelerator(cfg)
    console = make_console(accelerator.is_main_process)
    checkpoint = None
    if cfg.resume:
        checkpoint = ckpt.resolve_resume(cfg.resume, Path(cfg.output), name=cfg.name)
        if checkpoint is None:
            where = Path(cfg.output) / cfg.name if cfg.name else Path(cfg.output)
            console.print(f"--resume auto: no checkpoint under {where}/, starting fresh")
        else:
            cfg = resumed_config(checkpoint, cfg, explicit)
    check_model_name(cfg.model)
    cfg, normalisation = resolve_preprocessing(cfg, explicit, resumed=checkpoint is not None)
    decode = resolve_decode(cfg.decode, accelerator.device)  # --decode gpu without torchcodec: refused before any work
    data, images, data_name = resolve_data(cfg, accelerator)
    saved_meta = ckpt.load_weights(checkpoint / ckpt.WEIGHTS_FILE)[1] if checkpoint else {}
    split = load_split(data, images, classes=saved_meta.get("classes") or job.classes)
    run_dir = checkpoint.parent.parent if checkpoint else new_run_dir(cfg, data_name, accelerator)

    console.print(config_table({**cfg.to_dict(), "run folder": run_dir, "dataset": split.source,
                                "classes": len(split.classes), "train images": len(split.train),
                                "val images": len(split.val), "processes": accelerator.num_processes,
                                "device": accelerator.device, "decoding on": decode,
                                "mixed precision": accelerator.mixed_precision},
                               title=f"fixres {job.title}: resolved config"))
    console.print(f"normalisation: {normalisation}")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_temporaries(run_dir)  # what a killed run was writing
        ckpt.write_json_atomic(run_dir / "config.json", cfg.to_dict())
        ckpt.write_json_atomic(run_dir / "classes.json", split.classes)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in every run
    if job.build_model:
        model = job.build_model(cfg, split.classes)
    else:
        model = create_model(cfg.model, len(split.classes), pretrained=cfg.pretrained and not checkpoint,
                             weights=None if checkpoint else cfg.weights, output_stride=cfg.output_stride)
    state = RunState()
    head = classifier_name(model) if cfg.freeze_epochs else None
    head_modes = head_only_modes(model.get_submodule(head)) if head else None
    channels_last = cfg.channels_last if cfg.channels_last is not None else accelerator.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(accelerator.device)  # before the optimizer: fused optimizers need the parameters there
    if cfg.batch_size == "auto":
        cfg = dataclasses.replace(cfg, batch_size=auto_batch_size(model, cfg, accelerator, console))
        if accelerator.is_main_process:
            ckpt.write_json_atomic(run_dir / "config.json", cfg.to_dict())
    optimizer = build_optimizer(model.named_parameters(), cfg, head=head)
    if checkpoint:
        weights, _ = ckpt.load_weights(checkpoint / ckpt.WEIGHTS_FILE)
        load_weights_into(model, weights, source=str(checkpoint), replace_classifier=False)
        saved = ckpt.load_training_state(checkpoint)
        optimizer.load_state_dict(saved["optimizer"])
        state = RunState(**saved["run"])
        console.print(f"resumed from {checkpoint} at epoch {state.epoch + 1}, batch {state.batch_in_epoch}")
    # a copy of the plain model, before it is compiled or wrapped; its warm-up is set below
    ema = ModelEma(model, decay=cfg.model_ema_decay, every=cfg.model_ema_steps) if cfg.model_ema else None
    if ema is not None and checkpoint:
        if "ema" in saved:
            ema.load_state_dict(saved["ema"])
        else:
            console.print(f"--model-ema: {checkpoint} holds no EMA (it was trained without); it starts from "
                          f"the weights resumed")
    if checkpoint and accelerator.is_main_process:  # a crash may have come between the checkpoint and these
        ckpt.restore_weights_files(run_dir, _resumed_files(job.meta(cfg, split.classes), weights, ema, saved_meta,
                                                           state.records), epoch=saved_meta.get("epoch"))
    if cfg.compile:
        model.compile()  # in place: the state dict keeps its names (no "_orig_mod." prefix)
        if ema is not None:
            ema.module.compile()

    workers = worker_count(cfg.workers)
    if job.transforms:
        train_tf, eval_tf = job.transforms(cfg)
    else:
        train_tf = default_train_transform(cfg, accelerator.device)
        eval_tf = default_eval_transform(cfg, accelerator.device)
    train_loader, val_loader = build_loaders(split, cfg, workers=workers, train_tf=train_tf, eval_tf=eval_tf,
                                             pin_memory=accelerator.device.type == "cuda")
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    steps_per_epoch = max(1, len(train_loader) // cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps // 2)
    lr_at = lambda step: cosine_lr(step, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=cfg.lr)  # noqa: E731
    meta = job.meta(cfg, split.classes)
    if ema is not None:
        ema.warmup_steps = warmup_steps  # the average copies the weights while the learning rate warms up
        console.print(f"--model-ema: decay {cfg.model_ema_decay:.6g} every {cfg.model_ema_steps} optimizer steps "
                      f"averages over about {ema.horizon_steps / steps_per_epoch:.3g} epochs of this run's "
                      f"{cfg.epochs} ({steps_per_epoch} steps each)")
    mix = (BatchMix(num_classes=len(split.classes), mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                    seed=cfg.seed, rank=accelerator.process_index)
           if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 else None)
    if cfg.log_with:
        accelerator.init_trackers("fixres", config=cfg.to_dict())
    if accelerator.is_main_process:
        write_jsonl(run_dir / "metrics.jsonl", state.records)  # drop records a crash left past the checkpoint

    stop = StopRequest(accelerator)
    epochs_this_run = 0
    try:
        while state.epoch < cfg.epochs:
            epoch = state.epoch
            # Accelerate's loader re-sets the sampler's epoch from its own iteration count on
            # every pass, which restarts at 0 in a resumed run: set it explicitly. The sampler
            # hands the epoch to the (persistent) workers with each index
            train_loader.set_epoch(epoch)
            loader = train_loader
            set_modes = job.set_modes
            if head:  # --freeze-epochs: lr scale 0 outside the head (exact: no step, no decay), eval modes
                head_only = epoch < cfg.freeze_epochs
                for group in optimizer.param_groups:
                    group["lr_scale"] = 0.0 if head_only and not group["head"] else 1.0
                set_modes = head_modes if head_only else set_modes
            if state.batch_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, state.batch_in_epoch)
            with EpochProgress(console, f"epoch {epoch + 1}/{cfg.epochs}",
                               len(train_loader) * cfg.batch_size * accelerator.num_processes) as bar:
                result, state.step = train_one_epoch(
                    model, loader, optimizer, accelerator, lr_at=lr_at, first_step=state.step,
                    label_smoothing=cfg.label_smoothing, channels_last=channels_last,
                    progress=bar, should_stop=stop, set_modes=set_modes,
                    mix=functools.partial(mix, epoch=epoch) if mix else None, first_batch=state.batch_in_epoch,
                    clip_grad_norm=cfg.clip_grad_norm, ema=ema, mean=cfg.mean, std=cfg.std)
            if not result.completed:
                state.batch_in_epoch += result.images // (cfg.batch_size * accelerator.num_processes)
                _save(accelerator, model, optimizer, run_dir, meta, state, ema=ema)
                console.print(f"stopped by {stop.received or 'a signal on another rank'}: checkpoint saved "
                              f"at epoch {epoch + 1}, batch {state.batch_in_epoch}; "
                              f"continue with --resume {run_dir}")
                return {"run_dir": str(run_dir), "stopped": True}
            with EpochProgress(console, "evaluating", len(split.val)) as bar:
                val = evaluate(model, val_loader, accelerator, channels_last=channels_last, progress=bar,
                               mean=cfg.mean, std=cfg.std)
            if not math.isfinite(val["loss"]):  # weights that diverged in the epoch's last steps: not saved
                raise NonFiniteLossError(f"validation loss is {val['loss']} after epoch {epoch + 1} (optimizer step "
                                         f"{state.step}, learning rate {result.lr:.3g}); {NONFINITE_HINT}")
            record = {"epoch": epoch + 1, "train_loss": result.loss, "train_acc": result.accuracy,
                      "val_loss": val["loss"], "val_acc": val["accuracy"], "val_top5": val["top5"],
                      "val_count": val["count"],
                      "lr": result.lr, "images_per_s": result.images_per_s, "train_images": result.images,
                      "skipped": result.skipped, "seconds": result.seconds + val["seconds"],
                      "val_seconds": val["seconds"], "data_wait_frac": result.data_wait_frac}
            if ema is not None:  # the EMA weights, evaluated as the raw ones are
                ema.sync(accelerator)
                with EpochProgress(console, "evaluating the EMA", len(split.val)) as bar:
                    ema_val = evaluate(ema.module, val_loader, accelerator, channels_last=channels_last, progress=bar,
                                       mean=cfg.mean, std=cfg.std)
                record.update(ema_val_loss=ema_val["loss"], ema_val_acc=ema_val["accuracy"], ema_val_top5=ema_val["top5"],
                              seconds=record["seconds"] + ema_val["seconds"])
            score, which = epoch_score(record)
            improved = score > state.best_acc
            state = RunState(epoch=epoch + 1, step=state.step, records=state.records + [record],
                             best_acc=max(state.best_acc, score))
            _save(accelerator, model, optimizer, run_dir, meta, state, record=record,
                  best=which if improved else None, ema=ema)
            console.print(epoch_line(record))
            if cfg.log_with:
                accelerator.log({k: v for k, v in record.items() if k != "epoch" and v is not None}, step=epoch + 1)
            epochs_this_run += 1
            if cfg.stop_after and epochs_this_run >= cfg.stop_after and state.epoch < cfg.epochs:
                console.print(f"--stop-after {cfg.stop_after}: stopping; continue with --resume {run_dir}")
                break
    except NonFiniteLossError as err:
        kept = ckpt.list_checkpoints(run_dir)
        raise NonFiniteLossError(f"{err}; nothing was saved after it, the last checkpoint is "
                                 f"{kept[-1] if kept else 'none: no epoch had finished'}") from None
    except RuntimeError as err:
        if accelerator.num_processes == 1 or not _collective_failed(err):
            raise
        raise ProcessGroupError(f"process {accelerator.process_index} of {accelerator.num_processes}: "
                                f"{_collective_failure(err, cfg)}; continue from the last checkpoint with "
                                f"--resume {run_dir}") from None
    finally:
        stop.restore()
        if cfg.log_with:
            accelerator.end_training()
    if accelerator.is_main_process:
        write_run_export(run_dir, console)
    console.print(metrics_table(state.records, title=f"fixres {job.title}: {run_dir}",
                                top5_label=f"val top-{top5_k(len(split.classes))}"))
    if ema is not None and state.records:
        best_acc, which = epoch_score(max(state.records, key=lambda r: epoch_score(r)[0]))
        best_epoch = next(r["epoch"] for r in state.records if epoch_score(r)[0] == best_acc)
        console.print(f"best.safetensors: epoch {best_epoch}, the {'EMA' if which == 'ema' else 'raw'} weights "
                      f"(val top-1 {100 * best_acc:.2f}%); ema.safetensors: the EMA after the last epoch")
    if job.next_steps and state.epoch >= cfg.epochs:
        console.print(f"next: python sweep.py --checkpoint {shlex.quote(str(run_dir))}\n"
                      f"then: python finetune.py --checkpoint {shlex.quote(str(run_dir))}")
    return {"run_dir": str(run_dir), "records": state.records, "best_acc": state.best_acc, "stopped": False}


def _collective_failed(err: RuntimeError) -> bool:
    # gloo raises a plain RuntimeError that names its source file; NCCL a DistBackendError
    return isinstance(err, torch.distributed.DistError) or "/gloo/" in str(err)


def _collective_failure(err: RuntimeError, cfg: TrainConfig) -> str:
    """What a failed collective means, in words, with torch's own reason when it helps."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"no answer from the other processes within --collective-timeout {cfg.collective_timeout:g} s "
                f"(one of them hangs, or its machine is gone)")
    reason = re.sub(r"^\[[^\]]*\] ", "", text).split(". ")[0]  # gloo's "[file.cc:561] Connection closed by peer ..."
    return f"lost the connection to another process, which probably died ({reason})"


def _save(accelerator, model, optimizer, run_dir: Path, meta: dict, state: RunState, *, record: dict | None = None,
          best: str | None = None, ema: ModelEma | None = None):
    """Checkpoint first (the source of truth for resume), then the files derived from it
    (weights_files: `record` is the epoch's, None in the middle of one; `best` which weights
    became the best). The EMA's weights travel in the checkpoint's training state."""
    weights = accelerator.get_state_dict(model)
    optimizer_state = optimizer.state_dict()
    ema_weights = None
    if ema is not None:
        ema.sync(accelerator)
        ema_weights = ema.state_dict()
    files = weights_files(meta, weights, ema_weights, record, best)
    if accelerator.is_main_process:
        training_state = {"optimizer": optimizer_state, "run": vars(state),
                          **({"ema": ema_weights} if ema_weights is not None else {})}
        ckpt.save_checkpoint(run_dir, name=ckpt.checkpoint_name(state.epoch, state.step), state_dict=weights,
                             meta=files["last.safetensors"][1], training_state=training_state)
        write_jsonl(run_dir / "metrics.jsonl", state.records)
        for name, (state_dict, file_meta) in files.items():
            ckpt.save_weights(run_dir / name, state_dict, file_meta)
    accelerator.wait_for_everyone()


def _resumed_files(meta: dict, weights: dict, ema: ModelEma | None, saved_meta: dict,
                   records: list[dict]) -> dict[str, tuple[dict, dict]]:
    """The weights files as the save of the resumed checkpoint left them (weights_files), for
    ckpt.restore_weights_files; none for a checkpoint from the middle of an epoch."""
    epoch = saved_meta.get("epoch")
    record = next((r for r in records if r["epoch"] == epoch), None)
    if record is None:
        return {}
    best = max(records, key=lambda r: epoch_score(r)[0])  # the first of the highest, as the run chose
    return weights_files(meta, weights, ema.state_dict() if ema is not None else None, record,
                         epoch_score(record)[1] if best is record else None)
