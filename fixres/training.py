"""The training job that train.py runs: prepare a run, then fit it.

    python train.py                                  # built-in shapes data, CPU-sized preset
    accelerate launch train.py --data train.csv      # ResNet-50 at 224, DDP on all GPUs
    torchrun --nproc_per_node 2 train.py --cpu       # two CPU processes over gloo
    python train.py --resume auto                    # continue the newest run under runs/

    run = prepare_run(given)           # accelerator, model, optimizer, loaders, run folder, state
    result = fit(run)                  # the epochs, the stops, the saves, the report
    setup = train_step(run)            # what each step needs (fixres.engine.TrainStep): fit builds it once

finetune.py builds its own Run around the model it loaded (build_run) and calls the same fit.

Determinism: the data order is a function of (seed, epoch) and each sample's
augmentation a function of (seed, epoch, sample index), so a resumed run sees the
same images with the same crops as an uninterrupted one, whatever the number of
workers, and a run stopped mid-epoch continues with the batches it had not seen.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import shlex

import torch

from fixres import checkpoint as ckpt
from fixres.config import TrainConfig
from fixres.data import load_split, resolve_data
from fixres.device_decode import resolve_decode
from fixres.ema import best_epoch
from fixres.engine import (NONFINITE_HINT, NonFiniteLossError, ProcessGroupError, TrainStep, evaluate, top5_k,
                           train_one_epoch)
from fixres.export import write_run_export
from fixres.layers import layered, train_config
from fixres.models import (any_size_kwargs, check_model_sizes, create_model,
                           nearest_size_it_takes, sized_model_kwargs)
from fixres.presets import train_preset
from fixres.preprocessing import create_transform
from fixres.report import EpochProgress, epoch_line, make_console, metrics_table
from fixres.resolution import training_res_for
from fixres.run import Run, RunState, announce, build_run, new_run_folder, training_accelerator
from fixres.stopping import StopRequest, collective_failed, collective_failure


def prepare_run(given: dict) -> Run:
    """train.py's run, from the options given (fixres.layers.parse_command_line): its config
    (fixres.layers.train_config: the resumed run's checkpoint read there, once), the data
    resolved, the run folder started, a new model built with --seed, then build_run."""
    preset = train_preset(given)
    accelerator = training_accelerator(layered(TrainConfig, given, preset=preset))  # before the resumed run is read
    console = make_console(accelerator.is_main_process)
    cfg, resume, normalisation = train_config(given, preset, console)
    if cfg.for_test_res and resume is None:  # after crop_pct is resolved: a pretrained model's own changes the answer
        cfg = sizes_for_test_res(cfg, console)
    if resume is None:  # a ViT built for --train-res (a strict one refuses other sizes); config.json records it
        cfg = dataclasses.replace(cfg, model_kwargs=sized_model_kwargs(cfg.model, cfg.train_res, cfg.model_kwargs))
    check_model_sizes(cfg.model, cfg.model_kwargs, {"--train-res": cfg.train_res, "--test-res": cfg.eval_res})
    decode = resolve_decode(cfg.decode, accelerator.device)  # --decode gpu without torchcodec: refused before any work
    cfg, data, images, data_name = resolve_data(cfg, accelerator, resume.run_folder.path if resume else None)
    split = load_split(data, images, classes=resume.meta.get("classes") if resume else None)
    folder = resume.run_folder if resume else new_run_folder(cfg, data_name, accelerator)
    announce(cfg, accelerator, console, folder, split, decode=decode, title="train", notes=(f"normalisation: {normalisation}",))
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in every run
    model = create_model(cfg.model, len(split.classes), pretrained=cfg.pretrained and not resume,
                         weights=None if resume else cfg.weights, output_stride=cfg.output_stride,
                         model_kwargs=any_size_kwargs(cfg.model, cfg.model_kwargs))  # --test-res: any
    return build_run(cfg, accelerator, console, folder, split, model, resume=resume,
                     transforms=(create_transform(cfg, "train", decode=decode, device=accelerator.device),
                                 create_transform(cfg, "eval", decode=decode)))


def sizes_for_test_res(cfg: TrainConfig, console) -> TrainConfig:
    """--for-test-res N: the training size whose objects look as large as a test at N shows them
    (fixres.resolution.training_res_for, with the run's crop_pct and min_scale), the nearest one
    the model takes (a ViT: a multiple of its patch); validation at N. Said in one line."""
    check_model_sizes(cfg.model, cfg.model_kwargs, {"--for-test-res": cfg.for_test_res})  # named as given
    ideal = training_res_for(test_res=cfg.for_test_res, crop_pct=cfg.crop_pct, scale=(cfg.min_scale, 1.0))
    train_res = nearest_size_it_takes(cfg.model, cfg.model_kwargs, ideal)
    console.print(f"--for-test-res {cfg.for_test_res}: training at {train_res} px"
                  + (f" (the apparent-size model's {ideal} px, the nearest size {cfg.model} takes)"
                     if train_res != ideal else "")
                  + f", whose objects look as large as a test at {cfg.for_test_res} px shows them "
                    f"(crop_pct {cfg.crop_pct:g}, min scale {cfg.min_scale:g}); validating at {cfg.for_test_res} px")
    return dataclasses.replace(cfg, train_res=train_res, test_res=cfg.for_test_res)


def fit(run: Run) -> dict:
    """The epochs: train, evaluate, save; a signal saves and stops at a step boundary on every
    rank, --stop-after after whole epochs. Then the timm export, the table, what comes next."""
    cfg = run.cfg
    stop = StopRequest(run.accelerator)
    setup = train_step(run)
    epochs_this_run = 0
    try:
        while run.state.epoch < cfg.epochs:
            result = _train_epoch(run, setup, stop)
            if not result.completed:
                run.state.batch_in_epoch += result.batches
                _save(run)
                run.console.print(f"stopped by {stop.received or 'a signal on another rank'}: checkpoint saved "
                                  f"at epoch {run.state.epoch + 1}, batch {run.state.batch_in_epoch}; "
                                  f"continue with --resume {run.folder}")
                return {"run_dir": str(run.folder), "stopped": True}
            _end_epoch(run, _evaluate_epoch(run, result))
            epochs_this_run += 1
            if cfg.stop_after and epochs_this_run >= cfg.stop_after and run.state.epoch < cfg.epochs:
                run.console.print(f"--stop-after {cfg.stop_after}: stopping; continue with --resume {run.folder}")
                break
    except NonFiniteLossError as err:
        kept = run.folder.checkpoints()
        raise NonFiniteLossError(f"{err}; nothing was saved after it, the last checkpoint is "
                                 f"{kept[-1] if kept else 'none: no epoch had finished'}") from None
    except RuntimeError as err:
        if run.accelerator.num_processes == 1 or not collective_failed(err):
            raise
        raise ProcessGroupError(f"process {run.accelerator.process_index} of {run.accelerator.num_processes}: "
                                f"{collective_failure(err, cfg.collective_timeout)}; continue from the last "
                                f"checkpoint with --resume {run.folder}") from None
    finally:
        stop.restore()
        if cfg.log_with:
            run.accelerator.end_training()
    _report(run)
    state = run.state
    return {"run_dir": str(run.folder), "records": state.records, "best_acc": state.best_acc, "stopped": False}


def train_step(run: Run) -> TrainStep:
    """What each training step of `run` needs, from the Run (fixres.engine.train_one_epoch)."""
    cfg = run.cfg
    return TrainStep(run.model, run.optimizer, run.accelerator, lr_at=run.lr_at, label_smoothing=cfg.label_smoothing,
                     channels_last=run.channels_last, set_modes=run.set_modes, mix=run.mix,
                     clip_grad_norm=cfg.clip_grad_norm, ema=run.ema, mean=cfg.mean, std=cfg.std)


def _train_epoch(run: Run, setup: TrainStep, stop: StopRequest):
    cfg, accelerator, epoch = run.cfg, run.accelerator, run.state.epoch
    # Accelerate's loader re-sets the sampler's epoch from its own iteration count on every
    # pass, which restarts at 0 in a resumed run: set it (the sampler hands it to the workers)
    run.train_loader.set_epoch(epoch)
    loader = run.train_loader
    if run.head_modes:  # --freeze-epochs: lr scale 0 outside the head (exact: no step, no decay), eval modes
        head_only = epoch < cfg.freeze_epochs
        for group in run.optimizer.param_groups:
            group["lr_scale"] = 0.0 if head_only and not group["head"] else 1.0
        if head_only:
            setup = dataclasses.replace(setup, set_modes=run.head_modes)
    if run.state.batch_in_epoch:
        loader = accelerator.skip_first_batches(run.train_loader, run.state.batch_in_epoch)
    with EpochProgress(run.console, f"epoch {epoch + 1}/{cfg.epochs}",
                       len(run.train_loader) * cfg.batch_size * accelerator.num_processes) as bar:
        result, run.state.step = train_one_epoch(setup, loader, first_step=run.state.step, epoch=epoch,
                                                 first_batch=run.state.batch_in_epoch, progress=bar, should_stop=stop)
    return result


def _evaluate_epoch(run: Run, result) -> dict:
    """The epoch's record: training figures, and validation of the weights (and of the EMA)."""
    cfg, accelerator = run.cfg, run.accelerator
    evaluate_on_val = functools.partial(evaluate, loader=run.val_loader, accelerator=accelerator,
                                        channels_last=run.channels_last, mean=cfg.mean, std=cfg.std)
    with EpochProgress(run.console, "evaluating", len(run.split.val)) as bar:
        val = evaluate_on_val(run.model, progress=bar)
    if not math.isfinite(val["loss"]):  # weights that diverged in the epoch's last steps: not saved
        raise NonFiniteLossError(f"validation loss is {val['loss']} after epoch {run.state.epoch + 1} (optimizer "
                                 f"step {run.state.step}, learning rate {result.lr:.3g}); {NONFINITE_HINT}")
    record = {"epoch": run.state.epoch + 1, "train_loss": result.loss, "train_acc": result.accuracy,
              "val_loss": val["loss"], "val_acc": val["accuracy"], "val_top5": val["top5"], "val_count": val["count"],
              "lr": result.lr, "images_per_s": result.images_per_s, "train_images": result.images,
              "skipped": result.skipped, "seconds": result.seconds + val["seconds"],
              "val_seconds": val["seconds"], "data_wait_frac": result.data_wait_frac}
    if run.ema is not None:  # the EMA weights, evaluated as the raw ones are
        run.ema.sync(accelerator)
        with EpochProgress(run.console, "evaluating the EMA", len(run.split.val)) as bar:
            ema_val = evaluate_on_val(run.ema.module, progress=bar)
        record.update(ema_val_loss=ema_val["loss"], ema_val_acc=ema_val["accuracy"], ema_val_top5=ema_val["top5"],
                      seconds=record["seconds"] + ema_val["seconds"])
    return record


def _end_epoch(run: Run, record: dict) -> None:
    records = run.state.records + [record]
    best = best_epoch(records)  # the new epoch, or the one before that still stands
    run.state = RunState(epoch=run.state.epoch + 1, step=run.state.step, records=records, best_acc=best["top1"])
    _save(run, record=record, best=best["which"] if best["epoch"] == record["epoch"] else None)
    run.console.print(epoch_line(record))
    if run.cfg.log_with:
        run.accelerator.log({k: v for k, v in record.items() if k != "epoch" and v is not None}, step=record["epoch"])


def _report(run: Run) -> None:
    """The timm export, the table of epochs, which weights are best, and what comes next."""
    state = run.state
    if run.accelerator.is_main_process:
        write_run_export(run.folder.path, run.console)
    run.console.print(metrics_table(state.records, title=f"fixres {run.title}: {run.folder}",
                                    top5_label=f"val top-{top5_k(len(run.split.classes))}"))
    if run.ema is not None and state.records:
        best = best_epoch(state.records)
        run.console.print(f"best.safetensors: epoch {best['epoch']}, the {'EMA' if best['which'] == 'ema' else 'raw'} "
                          f"weights (val top-1 {100 * best['top1']:.2f}%); ema.safetensors: the EMA after the last epoch")
    if run.next_steps and state.epoch >= run.cfg.epochs:
        run.console.print(f"next: python sweep.py --checkpoint {shlex.quote(str(run.folder))}\n"
                          f"then: python finetune.py --checkpoint {shlex.quote(str(run.folder))}")


def _save(run: Run, *, record: dict | None = None, best: str | None = None) -> None:
    """Every rank gathers (the weights, the EMA's synced statistics); the main process writes
    the checkpoint and the files derived from it. `record`: the epoch's, None in the middle
    of one; `best`: which weights ("raw", "ema") became the best."""
    weights = run.accelerator.get_state_dict(run.model)
    optimizer_state = run.optimizer.state_dict()
    ema_weights = None
    if run.ema is not None:
        run.ema.sync(run.accelerator)
        ema_weights = run.ema.state_dict()
    if run.accelerator.is_main_process:
        run.folder.save(epoch=run.state.epoch, step=run.state.step,
                        files=ckpt.RunFolder.epoch_weights_files(run.meta, weights, ema_weights, record, best),
                        training_state={"optimizer": optimizer_state, "run": vars(run.state),
                                        **({"ema": ema_weights} if ema_weights is not None else {})},
                        records=run.state.records)
    run.accelerator.wait_for_everyone()


def train(given: dict) -> dict:
    """train.py's job, from the options given."""
    return fit(prepare_run(given))
