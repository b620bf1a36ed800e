"""What a run's images go through, decided once from its config: the normalisation, the
training and evaluation transforms, and the metadata that tells later jobs (sweep.py,
finetune.py, timm) how the weights expect to be fed.

    cfg, where = resolve_preprocessing(cfg, explicit)      # mean/std/crop_pct/interpolation and their source
    train_tf = default_train_transform(cfg, device)        # fast decoder, torchvision's, or decode on the device
    meta = weights_meta(cfg, classes)                      # stored inside every weights file
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fixres import fileio
from fixres.config import TrainConfig
from fixres.device_decode import CropSpec, ReadForDevice, ResizeSpec, resolve_decode
from fixres.models import PREPROCESSING_KEYS, pretrained_preprocessing
from fixres.transforms import (IMAGENET_MEAN, IMAGENET_STD, DecodeRandomResizedCrop, crop_augment, eval_transform,
                               finetune_transform, train_transform)


def weights_meta(cfg: TrainConfig, classes: list[str], **extra) -> dict:
    """The preprocessing a set of weights expects, stored inside the weights file."""
    return {"model": cfg.model, "output_stride": cfg.output_stride, "model_kwargs": cfg.model_kwargs, "classes": classes, "num_classes": len(classes), "train_res": cfg.train_res,
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
    elif cfg.pretrained or cfg.weights:
        own = {k: v for k, v in fileio.read_metadata(Path(cfg.weights)).items() if k in PREPROCESSING_KEYS} \
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
    return cfg, describe_preprocessing(cfg, source) + (f"; given: {' '.join(given)}" if given else "")


def describe_preprocessing(cfg, source: str) -> str:
    """"mean 0.485 0.456 0.406, std ..., crop_pct 0.875, bilinear: <source>", for the log."""
    mean, std = (" ".join(f"{v:g}" for v in values) for values in (cfg.mean, cfg.std))
    return f"mean {mean}, std {std}, crop_pct {cfg.crop_pct:g}, {cfg.interpolation}: {source}"


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
    mean, std = cfg.mean or IMAGENET_MEAN, cfg.std or IMAGENET_STD  # None: not resolved yet
    augment = crop_augment(auto_augment=cfg.auto_augment, random_erase=cfg.random_erase,
                           interpolation=cfg.interpolation, mean=mean, std=std)  # random erasing normalises
    if fast_decode:  # uint8 crops: the engine normalises them on the device with cfg.mean and cfg.std
        return DecodeRandomResizedCrop(size=cfg.train_res, min_scale=cfg.min_scale, interpolation=cfg.interpolation,
                                       augment=augment)
    return train_transform(size=cfg.train_res, min_scale=cfg.min_scale, interpolation=cfg.interpolation,
                           mean=mean, std=std, augment=augment)


def default_eval_transform(cfg: TrainConfig, device: torch.device):
    """train.py's validation preprocessing at --test-res, on `device` with --decode gpu."""
    return validation_transform(cfg, cfg.eval_res, resolve_decode(cfg.decode, device))


def validation_transform(cfg, size: int, decode: str):
    """Resize and centre crop at `size` with the run's crop_pct, interpolation and normalisation;
    with decode "gpu" the workers read bytes and the device decodes (uint8, normalised later)."""
    if decode == "gpu":
        return ReadForDevice(ResizeSpec(((size, cfg.crop_pct),), cfg.interpolation), skip_bad=cfg.skip_bad_images)
    return eval_transform(size=size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation, mean=cfg.mean,
                          std=cfg.std)


def finetune_transforms(cfg, decode: str) -> tuple:
    """(training, evaluation) transforms at --res. With --decode gpu the evaluation and --aug
    test / rrc decode on the device; test+ (flip, jitter, shifted crop) has no device version
    and stays in the workers."""
    training = finetune_transform(aug=cfg.aug, size=cfg.res, min_scale=cfg.min_scale, crop_pct=cfg.crop_pct,
                                  interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std)
    evaluation = validation_transform(cfg, cfg.res, decode)
    if decode != "gpu":
        return training, evaluation
    # on the device: uint8 batches, normalised with cfg.mean / cfg.std by the training loop
    if cfg.aug == "test":
        return evaluation, evaluation
    if cfg.aug == "rrc":
        return ReadForDevice(CropSpec(cfg.res, cfg.interpolation), min_scale=cfg.min_scale,
                             skip_bad=cfg.skip_bad_images), evaluation
    return training, evaluation
