"""Where each setting of a job comes from, decided in one place.

A job's config is four layers, each over the one before:

    defaults (fixres/config.py) < preset or recipe (fixres/presets.py)
        < the source run (finetune.py's --checkpoint, --weights' preprocessing) or the resumed run
        < the command line

`layered` stacks them; it is the one function that does. The command line is the options
typed, nothing else (`parse_command_line`), so a value given always wins and a value not
given is always the layer's below it, as timm's train.py feeds its YAML into
`parser.set_defaults`. The jobs gather their layers here:

    given = parse_command_line(TrainConfig, argv, "Train ...", preset=train_preset)
    cfg, resume, normalisation = train_config(given, train_preset(given), console)  # train.py
    cfg = finetune_config(given, meta, source_cfg, split.source, checkpoint=..., resumed=..., output=...)  # finetune.py
    cfg = sweep_config(given, meta, run_cfg, checkpoint=...)        # sweep.py
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import types
import typing
from pathlib import Path

from fixres import checkpoint as ckpt
from fixres import fileio
from fixres.config import FinetuneConfig, SweepConfig, TrainConfig
from fixres.models import PREPROCESSING_KEYS, check_model_kwargs, check_model_name, pretrained_preprocessing
from fixres.options import ConfigError
from fixres.presets import FINETUNE_SHAPES_PRESET
from fixres.preprocessing import describe_preprocessing
from fixres.transforms import IMAGENET_MEAN, IMAGENET_STD

# what a run's sizes and data were chosen for: a resumed run keeps them, and refuses another value
IDENTITY_KEYS = ("model", "model_kwargs", "data", "images", "choice_images", "seed",
                 "for_test_res", "max_latency_ms", "min_images_per_s")


def layered(cls, given: dict, *, preset: dict | None = None, source: dict | None = None):
    """The config of `cls`: its defaults, then `preset`, then `source`, then `given` (the
    command line), each over the one before; checked once stacked."""
    return cls(**{**(preset or {}), **(source or {}), **given})


# ----------------------------------------------------------------------------- the command line

def model_kwarg(text: str) -> tuple[str, object]:
    """`KEY=VALUE` as timm's train.py reads --model-kwargs (its ParseKwargs): the value as a
    Python literal where it parses (8, 0.1, False, None, (32, 32)), else the text itself."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # no quoting needed on the command line for a text value


class ModelKwargsAction(argparse.Action):
    """`--model-kwargs k=v k=v` -> {"k": v, ...}."""
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, dict(values))


def build_parser(cls, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the config's command-line groups; defaults
    are SUPPRESSed, so that what it returns is what the user gave."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(cls)
    offered = {f.name for group in cls.COMMAND_LINE for f in dataclasses.fields(group)}
    for f in dataclasses.fields(cls):
        if f.name not in offered:
            continue
        hint = hints[f.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        nargs = None
        if typing.get_origin(hint) is list:  # list[int] -> `--sizes 64 128 224`
            hint, nargs = typing.get_args(hint)[0], "+"
        if hint is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, help=help_text)
        elif hint is dict:  # --model-kwargs k=v k=v
            parser.add_argument(*flags, nargs="+", type=model_kwarg, action=ModelKwargsAction, metavar="KEY=VALUE",
                                help=help_text)
        else:
            parser.add_argument(*flags, type=f.metadata.get("parse") or hint, nargs=nargs, choices=f.metadata.get("choices"),
                                help=help_text, metavar=f.name.upper() if not f.metadata.get("choices") else None)
    return parser


def parse_command_line(cls, argv, description: str, preset=None) -> dict:
    """The options given in argv, typed: the command-line layer. Checked now, stacked on the
    defaults and `preset(given)`, so that a bad option is refused (argparse's usage line and
    exit status 2) before any work."""
    parser = build_parser(cls, description)
    given = vars(parser.parse_args(argv))
    try:
        if "for_test_res" in given and {"train_res", "test_res"} & set(given):
            raise ConfigError("--for-test-res N chooses the training size and tests at N: give it without --train-res "
                              "and --test-res, or give those two instead")
        layered(cls, given, preset=preset(given) if preset else None)
    except ConfigError as err:
        parser.error(str(err))
    return given


# ----------------------------------------------------------------------------- the resumed run

def resumed_layer(checkpoint: ckpt.Checkpoint, cls, given: dict) -> dict:
    """A resumed run's saved config, as a layer under the command line; an option given that
    would change what the run's sizes and data were chosen for is refused."""
    folder = checkpoint.run_folder
    saved = cls.from_dict(folder.read_config(), source=str(folder.path / "config.json")).to_dict()
    for key in IDENTITY_KEYS:
        if key in given and given[key] != saved[key]:
            raise ckpt.CheckpointError(f"--resume {checkpoint.path}: the run was trained with "
                                       f"--{key.replace('_', '-')} {saved[key]}, not {given[key]}")
    return saved


# ----------------------------------------------------------------------------- train.py

def weights_preprocessing(cfg: TrainConfig) -> tuple[dict, str]:
    """With --pretrained or --weights, what those weights were made with (mean, std, crop_pct,
    interpolation): a fixres weights file's metadata, else the library's pretrained config of
    the model (timm's pretrained_cfg, torchvision's weights transforms); and where it came from."""
    if not (cfg.pretrained or cfg.weights):
        return {}, "ImageNet's mean and std (training from scratch)"
    own = {k: v for k, v in fileio.read_metadata(Path(cfg.weights)).items() if k in PREPROCESSING_KEYS} \
        if cfg.weights else {}
    if own:
        return own, f"the metadata of {cfg.weights}"
    library = "torchvision's weights transforms" if cfg.model.startswith("tv:") else "timm's pretrained_cfg"
    taken = "--weights taken for its pretrained weights" if cfg.weights else "--pretrained"
    return pretrained_preprocessing(cfg.model), f"{library} of {cfg.model} ({taken})"


def train_config(given: dict, preset: dict, console) -> tuple[TrainConfig, ckpt.Checkpoint | None, str]:
    """train.py's config: the built-in data's preset and --recipe, then the resumed run or the
    preprocessing of the weights it starts from, then the command line. With the checkpoint
    to resume (None for a new run) and the normalisation in words, for the log. `preset`:
    train_preset(given)."""
    cfg = layered(TrainConfig, given, preset=preset)
    resume = None
    if cfg.resume:
        resume = ckpt.RunFolder.resolve_resume(cfg.resume, Path(cfg.output), name=cfg.name)
        if resume is None:
            where = Path(cfg.output) / cfg.name if cfg.name else Path(cfg.output)
            console.print(f"--resume auto: no checkpoint under {where}/, starting fresh")
    if resume:  # its config as saved (one saved before mean/std were options used ImageNet's)
        cfg = layered(TrainConfig, given, preset=preset, source=resumed_layer(resume, TrainConfig, given))
        where = "the run's config"
    check_model_name(cfg.model)
    check_model_kwargs(cfg.model, cfg.model_kwargs)
    if not resume:
        own, where = weights_preprocessing(cfg)
        source = {k: float(v) if k == "crop_pct" else v for k, v in own.items()
                  if k in ("crop_pct", "interpolation", "mean", "std")}
        cfg = layered(TrainConfig, given, preset=preset, source=source)
    cfg = dataclasses.replace(cfg, mean=list(cfg.mean or IMAGENET_MEAN), std=list(cfg.std or IMAGENET_STD))
    typed = [f"--{k.replace('_', '-')}" for k in ("mean", "std", "crop_pct", "interpolation") if k in given]
    return cfg, resume, describe_preprocessing(cfg, where) + (f"; given: {' '.join(typed)}" if typed else "")


# ----------------------------------------------------------------------------- finetune.py

def finetune_config(given: dict, meta: dict, source_cfg: dict, data_source: str, *, checkpoint: str,
                    resumed: dict | None, output: str) -> FinetuneConfig:
    """finetune.py's config once its source is loaded: on the built-in data its preset; then
    the source run's model, training size, preprocessing (its weights' metadata) and data, and
    over them the resumed fine-tuning run's config; then the command line. An empty --data,
    --images or --output (an unset shell variable) counts as not given, as it always has."""
    given = {k: v for k, v in given.items() if not (k in ("data", "images", "output") and v == "")}
    preset = FINETUNE_SHAPES_PRESET if "data" in source_cfg and source_cfg["data"] is None else None
    source = dict(
        checkpoint=checkpoint, model=meta["model"], output_stride=meta.get("output_stride"),
        model_kwargs=meta.get("model_kwargs"), train_res=int(meta["train_res"]), output=output,
        **{k: meta[k] for k in ("crop_pct", "interpolation") if k in meta},
        min_scale=trained_min_scale(meta, source_cfg),
        # the source's normalisation, as its weights' metadata records it (runs before it did: ImageNet's)
        mean=list(meta.get("mean", IMAGENET_MEAN)), std=list(meta.get("std", IMAGENET_STD)),
        # the built-in data's CSV as the source's sweep found it (its images depend on the source's seed)
        data=source_cfg.get("data") or data_source, images=source_cfg.get("images"))
    return layered(FinetuneConfig, given, preset=preset, source={**source, **(resumed or {})})


# ----------------------------------------------------------------------------- sweep.py

def trained_min_scale(meta: dict, run_cfg: dict) -> float:
    """The RandomResizedCrop min scale the weights were trained with: their metadata (the
    weights alone suffice), else their run's config.json, else torchvision's 0.08."""
    return meta.get("min_scale") or run_cfg.get("min_scale") or 0.08


def sweep_config(given: dict, meta: dict, run_cfg: dict, *, checkpoint: str | None) -> SweepConfig:
    """sweep.py's config once the weights are loaded: the run's crop_pct (else the pretrained
    weights', else 0.875) and training crop scale, then the command line."""
    source = dict(checkpoint=checkpoint, crop_pct=meta.get("crop_pct") or 0.875,
                  min_scale=trained_min_scale(meta, run_cfg))
    return layered(SweepConfig, given, source=source)
