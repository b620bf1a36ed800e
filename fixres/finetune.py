"""FixRes fine-tuning: adapt a trained classifier to a new test resolution.

    accelerate launch finetune.py --checkpoint runs/<name> --res 384
    python finetune.py --checkpoint runs/<name>                       # --res auto: choose, then fine-tune
    python finetune.py --checkpoint runs/<train.py --for-test-res 224 run>   # --res auto: at 224, the size it was trained for
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
A model whose last norm before the classifier is a LayerNorm or GroupNorm (ConvNeXt's
head.norm, a ViT's norm) trains its weight and bias instead (no statistics to re-estimate;
bn-stats is refused); a norm-free one (NFNet) trains the classifier alone. With
--train-pos-embed a ViT's absolute position embedding (at the new size) trains too, without
weight decay, as DeiT's fine-tuning at a new size trains it; gradients then flow back through
every (frozen) block, so a step is slower. The run prints what
adapts (`adapts: ...`) and finetune.json says so ("adapted"; "pos_embed": the embedding's name).

    python finetune.py --checkpoint runs/<vit run> --res 384 --train-pos-embed

The run folder is train.py's; its weights say train_res = the original K_train,
test_res = input_size = the new resolution, crop_pct, interpolation and min_scale (the
source's, unless given on the command line), so sweep.py and any fixres evaluation
preprocess for the new resolution and predict from the source's training crops.

Every choice is made on images that never report: --choice-images validation images (1000,
drawn with --seed, at most half the split) are held out; --res auto scores each candidate
size there (the last BN re-estimated at that size on as many training images), and the
fine-tune's epochs are evaluated there, so best.safetensors (the epoch that ships) is chosen
there too. The rest of the validation split reports before and after: choosing on the
reported images would add the luck of the choice to the reported gain, and choosing on
training images saturates on a model that fits them. finetune.json says which images did
what ("chosen_on", "reported_on", "held_out": the held-out files) and keeps the choice
sweep's rows ("choice_sweep"). It holds the accuracies at the training resolution, at the
new one before and after, and the paired differences after - before and after - training
resolution (and before - training resolution) on the same reported images with their 95%
intervals (fixres.stats). "after" is measured on the weights the run ships (`after_epoch`),
and `last_epoch` on the last epoch's weights when that is another epoch, on the same images.
activations.png: the distributions of the pooled features there.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch

from fixres import checkpoint as ckpt
from fixres import fileio
from fixres.adapt import (adapted_layers, classifiers_text, find_last_norm, finetune_layers, is_batchnorm,
                          required_position_embedding)
from fixres.adapter import ADAPTER
from fixres.config import RUNS, ConfigError, FinetuneConfig, SweepConfig
from fixres.data import DataError
from fixres.device_decode import resolve_decode
from fixres.engine import top5_k
from fixres.export import write_run_export
from fixres.loaders import worker_count
from fixres.methods import CHOICE_KEYS, bn_stats, choose_res, held_out_split, parametric, refuse_negative_features
from fixres.model_sizes import resize_model, size_refusal
from fixres.models import recorded_size_keyword
from fixres.plots import plot_activation_cdfs
from fixres.preprocessing import create_transform, describe_preprocessing, weights_meta
from fixres.report import EpochProgress, finetune_table, make_console
from fixres.resolution import recommended_test_res
from fixres.layers import finetune_config, layered, resumed_layer
from fixres.run import announce, build_run, new_run_folder, training_accelerator
from fixres.runtime import use_channels_last
from fixres.stats import METHOD as STATS_METHOD
from fixres.stats import paired_difference_of
from fixres.sweep import ACT_EDGES, load_for_sweep, run_sweep
from fixres.throughput import budget_of, refuse_over_budget
from fixres.trained_model import load_run_model
from fixres.training import fit


def refuse_fixed_res(cfg: FinetuneConfig, model, name: str, source_cfg: dict, accelerator) -> None:
    """Before any work: a --res N the model cannot take, and a fixed size (--res N, or the one
    the source run was trained for) outside a speed budget, refused in one line (refused, not
    warned: the budget was asked for)."""
    if cfg.res != "auto" and (why_not := size_refusal(model, name, cfg.res)):
        raise ConfigError(f"--res {cfg.res}: {why_not}")
    fixed_res = cfg.res if cfg.res != "auto" else source_cfg.get("for_test_res")
    if fixed_res and (budget := budget_of(cfg)):
        refuse_over_budget(copy.deepcopy(model), fixed_res, budget, batch_size=cfg.batch_size, accelerator=accelerator,
                           target=cfg.res == "auto")


def fine_tuning_res(cfg: FinetuneConfig, source_cfg: dict, resume, console, *, choose) -> tuple[int, str, list]:
    """(the size to fine-tune at, why, the rows of its choice): a resumed run's own (a requeue
    repeats --res auto), the size the source run was trained for (train.py --for-test-res: no
    choice to make), --res auto's choice (`choose()`), or --res N."""
    if resume and "res_choice" in resume.meta:
        return resume.meta["finetune_res"], resume.meta["res_choice"], resume.meta["choice_sweep"]
    if cfg.res != "auto":
        return cfg.res, f"--res {cfg.res}", []
    if target := source_cfg.get("for_test_res"):
        why = (f"--res auto: {target} px, the test size the source run was trained for (train.py --for-test-res "
               f"{target}); --res N fine-tunes at another" + ("; --sizes, the candidates of a choice, not used"
                                                              if cfg.sizes else ""))
        res, rows = target, []
    else:
        res, why, rows = choose()
    console.print(why)
    return res, why, rows


def other_test_crop_note(crop_pct: float, test_crop_pct: float) -> str:
    """What finetune.py says when sweep.py --write-best recorded another crop than the source's."""
    return (f"crop_pct {crop_pct:g}, the source's: every size is evaluated and fine-tuned at it, not at the "
            f"test_crop_pct {test_crop_pct:g} its weights record (sweep.py --write-best); --crop-pct "
            f"{test_crop_pct:g} fine-tunes at that one")


def no_running_statistics(model_name: str, norm: str | None, adapted: dict) -> str:
    """Why --method bn-stats cannot run on a model whose last norm is no BatchNorm."""
    where = (f"'s last normalisation layer {norm} is a {adapted['kind']}, which keeps" if norm else
             f" has no normalisation layer before its {classifiers_text(adapted['classifiers'])}, so")
    return f"--method bn-stats: {model_name}{where} no running statistics to re-estimate; use --method finetune"


def finetune(given: dict) -> dict:
    """finetune.py's job, from the options given (fixres.layers.parse_command_line): load the
    source run, choose the resolution (--res auto), evaluate before, apply the method, evaluate
    after, write the run folder, finetune.json and activations.png."""
    cfg = layered(FinetuneConfig, given)  # enough to find the source and the run to resume
    accelerator = training_accelerator(cfg)
    console = make_console(accelerator.is_main_process)
    decode = resolve_decode(cfg.decode, accelerator.device)  # --decode gpu without torchcodec: refused before any work
    cfg, resume, resumed = resolve_source(cfg, given, console)
    if resume:  # the resumed run's own --decode
        decode = resolve_decode(cfg.decode, accelerator.device)
    model, meta, split, source_folder, source_cfg = load_source(cfg, accelerator)
    if not resume:
        refuse_fixed_res(cfg, model, meta["model"], source_cfg, accelerator)
    # the source's model, preprocessing and crop scale, unless given on this command line: --aug
    # rrc crops as the source was trained, and the new run's weights and config say so
    cfg = dataclasses.replace(
        finetune_config(given, meta, source_cfg, split.source, checkpoint=cfg.checkpoint, resumed=resumed,
                        output=str(beside_source(Path(meta["weights_path"])))),
        resume=str(resume.path) if resume else None)
    if cfg.name and not resume:  # before the sweep: refuse now, not minutes later
        ckpt.RunFolder(Path(cfg.output) / cfg.name).refuse_if_taken()
    train_res = cfg.train_res
    sources_crop = "crop_pct" not in given and cfg.crop_pct == meta.get("crop_pct")  # not a resumed run's own
    if sources_crop and meta.get("test_crop_pct") not in (None, cfg.crop_pct):  # sweep.py --write-best's
        console.print(other_test_crop_note(cfg.crop_pct, meta["test_crop_pct"]))
    eval_meta = {**meta, "interpolation": cfg.interpolation}
    held_out, reported = held_out_split(split.val, cfg.choice_images, cfg.seed)
    norm = find_last_norm(model, input_size=train_res)
    pos_embed = required_position_embedding(model, cfg.model) if cfg.train_pos_embed else None
    adapted = adapted_layers(model, norm, pos_embed=pos_embed)
    last_bn = norm if is_batchnorm(model.get_submodule(norm) if norm else None) else None  # running statistics
    sweep = dict(batch_size=cfg.batch_size, workers=worker_count(cfg.workers), activations=True, decode=decode)
    if cfg.method == "bn-stats" and last_bn is None:
        raise ConfigError(no_running_statistics(cfg.model, norm, adapted))
    if cfg.method == "parametric":
        refuse_negative_features(cfg, model, split, accelerator, sweep["workers"], adapted["classifiers"])
    predicted = recommended_test_res(train_res=train_res, crop_pct=cfg.crop_pct, scale=(cfg.min_scale, 1.0))
    res, why, choice_rows = fine_tuning_res(
        cfg, source_cfg, resume, console,
        choose=lambda: choose_res(cfg, model, eval_meta, split, accelerator, console, sweep, predicted=predicted,
                                  last_bn=last_bn, choice=held_out))
    choices = ["the size"] * bool(choice_rows) + ["the epoch that ships"] * (cfg.method == "finetune")
    chosen_on = f"{', '.join(choices)}: {len(held_out)} held-out validation images" if choices else None
    # before: the training resolution and the new one, on the images no choice sees
    sizes = sorted({train_res, res})
    with EpochProgress(console, f"before: {len(sizes)} size(s)", len(reported)) as bar:
        # a copy: run_sweep moves the model inside inference_mode, after which it cannot be trained
        rows = run_sweep(copy.deepcopy(model), eval_meta, split, sizes, cfg.crop_pct, accelerator, progress=bar,
                         samples=reported, **sweep)
    source_name = source_folder.name if source_folder else Path(meta["weights_path"]).stem
    if (size_key := recorded_size_keyword(cfg.model_kwargs)) and resize_model(model, res):
        # a ViT or Swin built for its size: the new run's network is built at `res` (its position
        # embedding or window tables resized once, as its library does), so its weights and export are that network
        cfg = dataclasses.replace(cfg, model_kwargs={**cfg.model_kwargs, size_key: res})
    cfg = dataclasses.replace(cfg, res=res, test_res=res,
                              name=cfg.name or f"{source_name}-{cfg.method}-{res}px-{time.strftime('%Y%m%d-%H%M%S')}")
    extra = dict(finetune_res=res, finetune_method=cfg.method, finetuned_from=meta["weights_path"], last_bn=last_bn,
                 adapted=adapted, res_choice=why, choice_sweep=[{k: r[k] for k in CHOICE_KEYS if k in r} for r in choice_rows])
    start = time.perf_counter()
    # the fine-tune's epochs are evaluated on the held-out images: they choose the epoch that ships
    applied = apply_method(cfg, model, dataclasses.replace(split, val=held_out), extra, accelerator, console, resume,
                           decode, sweep["workers"])
    if applied.get("stopped") or applied.get("unfinished"):
        return applied
    seconds = time.perf_counter() - start

    def on_reported(weights, label: str) -> dict:
        with EpochProgress(console, label, len(reported)) as bar:
            return run_sweep(weights, eval_meta, split, [res], cfg.crop_pct, accelerator, progress=bar,
                             samples=reported, **sweep)[0]
    after = on_reported(applied["model"], f"after: {res} px")
    last = on_reported(applied["last_model"], f"last epoch: {res} px") if applied.get("last_model") else None
    context = dict(meta=meta, split=split, why=why, chosen_on=chosen_on, predicted=predicted,
                   seconds=seconds, extra=extra, held_out=held_out, last=last)
    summary = report(cfg, {r["size"]: r for r in rows}, after, applied, context, accelerator, console)
    return {**summary, "run_dir": str(applied["folder"]), "stopped": False}


def resolve_source(cfg: FinetuneConfig, given: dict, console) -> tuple[FinetuneConfig, ckpt.Checkpoint | None,
                                                                         dict | None]:
    """--checkpoint (default: the newest train.py run) and --resume, resolved; a resumed
    run's checkpoint is read here, once, and its config taken up (and returned: a layer of
    the config, fixres.layers)."""
    if cfg.checkpoint is None and cfg.resume is None:  # right after train.py: its newest run, not a fine-tuned one
        cfg = dataclasses.replace(cfg, checkpoint=str(ckpt.RunFolder.newest(Path(cfg.output or RUNS), trained_only=True)))
        console.print(f"--checkpoint not given: using the newest train.py run {cfg.checkpoint}")
    if not cfg.resume:
        return cfg, None, None
    if cfg.resume == "auto":  # a requeued SLURM job: the run of its --name, if it got as far as a checkpoint
        output = Path(cfg.output) if cfg.output else beside_source(ckpt.RunFolder.find_weights(Path(cfg.checkpoint)))
        resume = ckpt.RunFolder.resolve_resume("auto", output, name=cfg.name)
        if resume is None:
            console.print(f"--resume auto: no checkpoint under {output / cfg.name}/, starting fresh")
            return dataclasses.replace(cfg, resume=None), None, None
    else:
        resume = ckpt.RunFolder.resolve_resume(cfg.resume, Path(cfg.output or "."))
    resumed = resumed_layer(resume, FinetuneConfig, given)
    cfg = dataclasses.replace(layered(FinetuneConfig, given, source=resumed), resume=str(resume.path))
    if cfg.checkpoint is None:
        raise ConfigError(f"--resume {cfg.resume}: not a finetune.py run (its config names no --checkpoint)")
    return cfg, resume, resumed


def load_source(cfg: FinetuneConfig, accelerator) -> tuple:
    """(model, its metadata, the data split, the source run folder or None, its config) of --checkpoint."""
    ckpt.RunFolder.classifier_metadata(cfg.checkpoint)  # a one-line error for weights that are not a fixres classifier
    try:
        model, meta, split, source_folder, source_cfg = load_for_sweep(
            SweepConfig(checkpoint=cfg.checkpoint, data=cfg.data, images=cfg.images), accelerator)
    except DataError as err:
        if str(err).endswith("the validation split is empty"):
            raise ConfigError(f"finetune.py measures before and after on the validation split, and there is none "
                              f"({err})") from None
        raise
    if cfg.method == "parametric" and hasattr(model, ADAPTER):
        raise ConfigError(f"--method parametric: {meta['weights_path']} carries a parametric adapter already; "
                          f"adapt the run it came from ({meta.get('finetuned_from', 'its source')})")
    return model, meta, split, source_folder, source_cfg


def apply_method(cfg, model, split, extra, accelerator, console, resume, decode, workers) -> dict:
    """--method finetune: train.py's fit on the frozen model, its last BN synced and in train
    mode; bn-stats and parametric: no gradients. {"model": the weights the run ships, "folder",
    "records", "shipped": their metadata} (or fit's {"stopped": True})."""
    folder = resume.run_folder if resume else new_run_folder(cfg, "", accelerator)
    if cfg.method != "finetune":  # no training loop resolves it: the config says what ran
        cfg = dataclasses.replace(cfg, channels_last=use_channels_last(cfg.channels_last, accelerator.device))
    announce(cfg, accelerator, console, folder, split, decode=decode, title="finetune",
             notes=("normalisation: " + describe_preprocessing(cfg, "the source weights' metadata"),
                    adapts_line(cfg, type(model).__name__, extra)))
    if cfg.method == "finetune":
        torch.manual_seed(cfg.seed)  # as train.py, before anything draws from torch's generator
        pos_embed = extra["adapted"].get("pos_embed")  # --train-pos-embed: trained, not decayed
        set_modes = finetune_layers(model, extra["adapted"]["layer"], train_bn_affine=cfg.train_bn_affine,
                                    pos_embed=pos_embed)
        transforms = (create_transform(cfg, "finetune-train", decode=decode),
                      create_transform(cfg, "eval", size=cfg.res, decode=decode))
        result = fit(build_run(cfg, accelerator, console, folder, split, model, resume=resume,
                               transforms=transforms, meta=weights_meta(cfg, split.classes, **extra),
                               set_modes=set_modes, title="finetune", next_steps=False,
                               no_decay=(pos_embed,) if pos_embed else ()))
        if result["stopped"]:
            return result
        if len(result["records"]) < cfg.epochs:  # --stop-after (exit 0, as train.py): measured when the run ends
            return {**result, "unfinished": True}
        # the run ships its best epoch on validation (best.safetensors, what sweep.py loads),
        # not the last one in memory: "after" is measured on those weights
        model, shipped = load_run_model(folder.path, "best")
        last_model, last_meta = load_run_model(folder.path, "last")
        return {"model": model, "folder": folder, "records": result["records"], "shipped": shipped,
                "last_model": last_model if last_meta.get("epoch") != shipped.get("epoch") else None}
    model.to(accelerator.device)
    extra.update(bn_stats(cfg, model, split, accelerator, console, workers, extra["last_bn"])
                 if cfg.method == "bn-stats" else parametric(cfg, model, split, accelerator, console, workers))
    if accelerator.is_main_process:
        weights = (model.state_dict(), weights_meta(cfg, split.classes, **extra))
        folder.write_weights({"best.safetensors": weights, "last.safetensors": weights})
        write_run_export(folder.path, console)  # fit writes it for --method finetune
    return {"model": model, "folder": folder, "records": [], "shipped": {}}


def adapts_line(cfg, model_class: str, extra: dict) -> str:
    """The one line that says what the method changes in the model."""
    norm, kind = extra["adapted"]["layer"], extra["adapted"]["kind"]
    classifier = classifiers_text(extra["adapted"]["classifiers"])  # a distilled DeiT: both heads
    if cfg.method == "parametric":
        return (f"adapts: the input of the {classifier} (a Frechet map fitted at {cfg.train_res} and "
                f"{cfg.res} px)")
    if cfg.method == "bn-stats":
        return f"adapts: {norm} ({kind}): its running statistics re-estimated at {cfg.res} px on the training images"
    pos_embed = extra["adapted"].get("pos_embed")  # --train-pos-embed
    trained = f"the position embedding {pos_embed} and the {classifier}" if pos_embed else f"the {classifier}"
    if norm is None:
        return (f"adapts: {trained}{'' if pos_embed else ' alone'} ({model_class} has no normalisation layer "
                f"before it)")
    trained = (", " if pos_embed else " and ") + trained
    if extra["last_bn"]:
        affine = "; its weight and bias train" if cfg.train_bn_affine else ""
        return (f"adapts: {norm} ({kind}: batch statistics, running ones re-estimated at {cfg.res} px{affine})"
                f"{trained}")
    return f"adapts: {norm} ({kind}, no running statistics: its weight and bias train){trained}"


def report(cfg, before: dict, after: dict, applied: dict, context: dict, accelerator, console) -> dict:
    """The table of before and after with the paired differences, finetune.json and
    activations.png; returns finetune.json's record."""
    meta, split, folder, records = context["meta"], context["split"], applied["folder"], applied["records"]
    train_res, res = cfg.train_res, cfg.res
    after_epoch = applied["shipped"].get("epoch")
    stages = [(f"trained resolution {train_res} px, as trained", before[train_res]),
              (f"{res} px, before", before[res]),
              (f"{res} px, after {cfg.method}" + (f", epoch {after_epoch} (best.safetensors)" if after_epoch else "")
               + f" ({context['seconds']:.0f} s)", after)]
    last = context["last"]
    if last is not None:  # the last epoch's weights, on the same reported images
        last = {"epoch": records[-1]["epoch"], **{k: last[k] for k in ("top1", "top5", "loss")}}
    correct = {key: row["per_image_correct"] for key, (_, row) in zip(("train_res", "before", "after"), stages)}
    differences = {f"{a}_vs_{b}": paired_difference_of(correct[a], correct[b])  # the same validation images
                   for a, b in (("after", "before"), ("after", "train_res"), ("before", "train_res"))}
    reported_on = (f"{after['count']} validation images (the split's {len(split.val)} less the held-out "
                   f"{len(context['held_out'])})")
    by_stage = {"train_res": before[train_res], "before": before[res], "after": after}
    summary = {"source": meta["weights_path"], "model": meta["model"], "method": cfg.method,
               "aug": cfg.aug if cfg.method == "finetune" else None, "train_res": train_res, "res": res,
               "res_choice": context["why"], "chosen_on": context["chosen_on"], "reported_on": reported_on,
               "held_out": [path for path, _ in context["held_out"]],
               "predicted_res": context["predicted"], "crop_pct": cfg.crop_pct, "last_bn": context["extra"]["last_bn"],
               **{key: {stage: row[key] for stage, row in by_stage.items()} for key in ("top1", "top5")},
               "top5_k": top5_k(len(split.classes)),
               "loss": {stage: row["loss"] for stage, row in by_stage.items()},
               "differences": {**differences, "interval": STATS_METHOD},
               "val_images": after["count"], "method_seconds": context["seconds"],
               "processes": accelerator.num_processes, "device": str(accelerator.device),
               "sweep": [{k: r[k] for k in ("size", "top1", "top5", "loss")} for r in before.values()],
               "after_epoch": after_epoch, **({"last_epoch": last} if last else {}),
               "epochs": records,
               # with finetune_res, adapted, res_choice and choice_sweep, as the weights' metadata holds them
               **{k: v for k, v in context["extra"].items() if k not in ("last_bn", "finetuned_from")}}
    last_row = [(f"{res} px, last epoch {last['epoch']} (last.safetensors)", last)] if last else []
    console.print(finetune_table(stages, differences, title=f"fixres finetune: {folder}", also=last_row,
                                 top5_label=f"top-{top5_k(len(split.classes))}"))
    console.print(f"vs: the difference in top-1, in points, on the same {after['count']} validation images; "
                  f"{STATS_METHOD}")
    console.print(f"chosen on: {context['chosen_on'] or 'nothing chosen (--res given)'}; reported on: {reported_on}")
    if accelerator.is_main_process:
        fileio.write_json_atomic(folder.path / "finetune.json", summary)
        if cfg.plots:
            plot_activation_cdfs([(label, r["act_hist"]) for label, r in stages], ACT_EDGES.tolist(),
                                 folder.path / "activations.png",
                                 title=f"{meta['model']}: pooled features before the classifier",
                                 styles=[{"linestyle": s, "linewidth": 1.8} for s in ("-", "--", "-")])
        console.print(f"wrote {folder}/finetune.json{', activations.png' if cfg.plots else ''} and the weights "
                      f"(test_res {res} px)")
    accelerator.wait_for_everyone()
    return summary


def beside_source(weights: Path) -> Path:
    """Where a fine-tuning run goes without --output: beside the source run folder, or
    beside the weights file when it is not in one."""
    source = ckpt.RunFolder.holding(weights)
    return source.path.parent if source else weights.parent
