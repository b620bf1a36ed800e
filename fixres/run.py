"""A Run: everything fit() (fixres/training.py) needs, assembled once from a config.

    folder = new_run_folder(cfg, "shapes", accelerator)             # refuses a folder that holds a run
    announce(cfg, accelerator, console, folder, split, decode="cpu", title="train")
    run = build_run(cfg, accelerator, console, folder, split, model, resume=None, transforms=(train_tf, eval_tf))

train.py's prepare_run builds a new model; finetune.py passes the model it loaded, frozen
but for the classifier and the last BatchNorm, with its own transforms, modes and metadata.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from fixres import checkpoint as ckpt
from fixres.adapt import train_only
from fixres.classifiers import classifier_names
from fixres.config import TrainConfig
from fixres.data import Split
from fixres.ema import ModelEma, best_epoch
from fixres.engine import cosine_lr
from fixres.loaders import build_loaders, worker_count
from fixres.models import load_weights_into
from fixres.optim import auto_batch_size, build_optimizer
from fixres.preprocessing import weights_meta
from fixres.report import config_table
from fixres.runtime import make_accelerator, use_channels_last
from fixres.transforms import BatchMix

# Options that define what a run is: a resumed run must keep them (a fine-tune's held-out
# validation images are drawn from --choice-images and --seed).

@dataclass
class RunState:
    """What a checkpoint restores besides weights and optimizer."""
    epoch: int = 0             # epoch in progress (0-based)
    batch_in_epoch: int = 0    # batches of `epoch` already trained (mid-epoch stop)
    step: int = 0              # optimizer steps so far
    best_acc: float = -1.0
    records: list = field(default_factory=list)


@dataclass
class Run:
    """Everything fit() needs; prepare_run builds train.py's, finetune.py its own (build_run)."""
    cfg: TrainConfig
    accelerator: Accelerator
    console: object
    folder: ckpt.RunFolder
    split: Split
    model: torch.nn.Module             # prepared: DDP-wrapped where it applies
    optimizer: torch.optim.Optimizer
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    meta: dict                         # stored with the weights (preprocessing.weights_meta)
    state: RunState
    lr_at: Callable[[int], float]
    channels_last: bool
    set_modes: Callable                # before each training epoch: which modules train
    head_modes: Callable | None = None  # --freeze-epochs: the classifier alone trains
    ema: ModelEma | None = None
    mix: BatchMix | None = None
    title: str = "train"
    next_steps: bool = True            # end with the commands that come next (sweep, finetune)


def training_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator of train.py and finetune.py: with gradient accumulation and the tracker."""
    return make_accelerator(cfg, gradient_accumulation_steps=cfg.grad_accum, log_with=cfg.log_with)


def new_run_folder(cfg: TrainConfig, data_name: str, accelerator: Accelerator) -> ckpt.RunFolder:
    name = cfg.name or "-".join([data_name, re.sub(r"[^\w.]+", "_", cfg.model), str(cfg.train_res),
                                 time.strftime("%Y%m%d-%H%M%S")])
    name = broadcast_object_list([name])[0] if accelerator.num_processes > 1 else name
    return ckpt.RunFolder(Path(cfg.output) / name).refuse_if_taken()


def announce(cfg, accelerator: Accelerator, console, folder: ckpt.RunFolder, split: Split, *, decode: str, title: str,
             notes: tuple[str, ...] = ()) -> None:
    """The resolved config, printed; the run folder started with it (config.json, classes.json)."""
    console.print(config_table({**cfg.to_dict(), "run folder": folder.path, "dataset": split.source,
                                "classes": len(split.classes), "train images": len(split.train),
                                "val images": len(split.val), "processes": accelerator.num_processes,
                                "device": accelerator.device, "decoding on": decode,
                                "mixed precision": accelerator.mixed_precision},
                               title=f"fixres {title}: resolved config"))
    for note in notes:
        console.print(note)
    if accelerator.is_main_process:
        folder.start(cfg.to_dict(), split.classes)


def build_run(cfg, accelerator, console, folder, split, model, *, resume: ckpt.Checkpoint | None, transforms,
              meta: dict | None = None, set_modes: Callable = torch.nn.Module.train, title: str = "train",
              next_steps: bool = True, no_decay: tuple[str, ...] = ()) -> Run:
    """The model on its device with its optimizer (`no_decay`: parameters it does not decay),
    restored from `resume` when given (with the EMA and the weights files a crash may have
    missed), the loaders over `transforms` (training, evaluation), and the schedule: a Run for fit()."""
    head = classifier_names(model) if cfg.freeze_epochs else None  # a distilled DeiT: both heads
    channels_last = use_channels_last(cfg.channels_last, accelerator.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(accelerator.device)  # before the optimizer: fused optimizers need the parameters there
    if cfg.batch_size == "auto":
        cfg = dataclasses.replace(cfg, batch_size=auto_batch_size(model, cfg, accelerator, console))
        if accelerator.is_main_process:
            folder.write_config(cfg.to_dict())
    meta = meta or weights_meta(cfg, split.classes)
    # what the model says it does not decay (timm: a ViT's pos_embed and tokens, a Swin's
    # relative-position tables), as timm's train.py leaves them undecayed
    no_decay = (*no_decay, *getattr(model, "no_weight_decay", set)())
    optimizer = build_optimizer(model.named_parameters(), cfg, head=head, no_decay=no_decay)
    state = _restore(resume, model, optimizer, console) if resume else RunState()
    # a copy of the plain model, before it is compiled or wrapped; its warm-up is set below
    ema = ModelEma(model, decay=cfg.model_ema_decay, every=cfg.model_ema_steps) if cfg.model_ema else None
    if ema is not None and resume:
        if "ema" in resume.training_state:
            ema.load_state_dict(resume.training_state["ema"])
        else:
            console.print(f"--model-ema: {resume.path} holds no EMA (it was trained without); it starts from "
                          f"the weights resumed")
    if resume and accelerator.is_main_process:  # a crash may have come between the checkpoint and these
        folder.restore_weights_files(_resumed_files(meta, resume.weights, ema, resume.meta, state.records),
                                     epoch=resume.meta.get("epoch"))
        # a resume past a newer checkpoint that could not be read: best.safetensors may be that epoch's
        folder.restore_best(resume.path, epoch=best_epoch(state.records)["epoch"] if state.records else None)
    if cfg.compile:
        model.compile()  # in place: the state dict keeps its names (no "_orig_mod." prefix)
        if ema is not None:
            ema.module.compile()
    loaders = build_loaders(split, cfg, train_tf=transforms[0], eval_tf=transforms[1], workers=worker_count(cfg.workers),
                            pin_memory=accelerator.device.type == "cuda")
    model, optimizer, *loaders = accelerator.prepare(model, optimizer, *loaders)
    steps_per_epoch = max(1, len(loaders[0]) // cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps // 2)
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
        folder.write_metrics(state.records)  # drop records a crash left past the checkpoint
    return Run(cfg, accelerator, console, folder, split, model, optimizer, *loaders, meta=meta, state=state,
               lr_at=functools.partial(cosine_lr, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=cfg.lr),
               channels_last=channels_last, set_modes=set_modes, ema=ema, mix=mix, title=title, next_steps=next_steps,
               head_modes=train_only(*map(accelerator.unwrap_model(model).get_submodule, head)) if head else None)


def _restore(resume: ckpt.Checkpoint, model, optimizer, console) -> RunState:
    load_weights_into(model, resume.weights, source=str(resume.path), replace_classifier=False)
    optimizer.load_state_dict(resume.training_state["optimizer"])
    state = RunState(**resume.training_state["run"])
    console.print(f"resumed from {resume.path} at epoch {state.epoch + 1}, batch {state.batch_in_epoch}")
    return state


def _resumed_files(meta: dict, weights: dict, ema: ModelEma | None, saved_meta: dict,
                   records: list[dict]) -> dict[str, tuple[dict, dict]]:
    """The weights files as the save of the resumed checkpoint left them; none for a
    checkpoint from the middle of an epoch."""
    record = next((r for r in records if r["epoch"] == saved_meta.get("epoch")), None)
    if record is None:
        return {}
    best = best_epoch(records)  # as the run chose
    return ckpt.RunFolder.epoch_weights_files(meta, weights, ema.state_dict() if ema is not None else None, record,
                                              best["which"] if best["epoch"] == record["epoch"] else None)
