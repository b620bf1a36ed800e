"""What a run's images go through, decided once from its config: the normalisation, the
transforms of every stage (create_transform: the one entry to the input pipeline), and the
metadata that tells later jobs (sweep.py, finetune.py, timm) how the weights expect to be fed.

    train_tf = create_transform(cfg, "train", decode=decode, device=device)   # fast decoder, torchvision's, or the device's
    eval_tf = create_transform(cfg, "eval", decode=decode)                    # at cfg.eval_res
    tune_tf = create_transform(cfg, "finetune-train", decode=decode)          # finetune.py's --aug at cfg.res
    bn_tf = create_transform(cfg, "eval", size=96, decode="cpu")              # any size, decoded in the workers
    per_pair = create_transform(meta, "sweep", pairs=[(64, 0.875), (96, 1.0)], decode="cpu")  # a weights file's metadata
    to_float = create_transform(meta, "normalize")                           # the sweep's uint8 batches, on the device
    meta = weights_meta(cfg, classes)                      # stored inside every weights file

The pure builders underneath (fixres.transforms: train_transform, eval_transform, ...) take
every choice as a keyword; only this module calls them.
"""
from __future__ import annotations


import torch

from fixres.config import TrainConfig
from fixres.device_decode import CropSpec, ReadForDevice, ResizeSpec, resolve_decode
from fixres.transforms import (IMAGENET_MEAN, IMAGENET_STD, DecodeRandomResizedCrop, crop_augment, eval_transform,
                               finetune_transform, float_normalize, train_transform)


def weights_meta(cfg: TrainConfig, classes: list[str], **extra) -> dict:
    """The preprocessing a set of weights expects, stored inside the weights file."""
    return {"model": cfg.model, "output_stride": cfg.output_stride, "model_kwargs": cfg.model_kwargs, "classes": classes, "num_classes": len(classes), "train_res": cfg.train_res,
            "test_res": cfg.eval_res, "input_size": [3, cfg.eval_res, cfg.eval_res], "crop_pct": cfg.crop_pct,
            "interpolation": cfg.interpolation, "min_scale": cfg.min_scale, "mean": list(cfg.mean or IMAGENET_MEAN),
            "std": list(cfg.std or IMAGENET_STD), **extra}


def describe_preprocessing(cfg, source: str) -> str:
    """"mean 0.485 0.456 0.406, std ..., crop_pct 0.875, bilinear: <source>", for the log."""
    mean, std = (" ".join(f"{v:g}" for v in values) for values in (cfg.mean, cfg.std))
    return f"mean {mean}, std {std}, crop_pct {cfg.crop_pct:g}, {cfg.interpolation}: {source}"


STAGES = ("train", "eval", "finetune-train", "sweep", "normalize")
DEFAULT_SIZES = {"train": "train_res", "eval": "eval_res", "finetune-train": "res"}  # the config's field


def create_transform(cfg, stage: str, *, size: int | None = None, pairs=None, decode: str | None = None,
                     device: torch.device | None = None):
    """The transform of one `stage` of a run, from its config: the one entry to the input
    pipeline, as timm's create_transform (the pure builders of fixres.transforms underneath).

    stage           what it makes                                           size (default)
    train           train.py's crop: DecodeRandomResizedCrop (the fast      cfg.train_res
                    decoder), torchvision's RandomResizedCrop, or with
                    --decode gpu the workers' half of decoding on the device
    eval            Resize(int(size / crop_pct)) + CenterCrop(size),         cfg.eval_res
                    normalised; with decode "gpu" the workers' half
    finetune-train  finetune.py's --aug (test, test+, rrc) at size          cfg.res
    sweep           every (size, crop_pct) of `pairs` from one decode, as   -
                    uint8: a list for MultiSizeDataset, or with "gpu" one
                    reader that the device resizes to every pair
    normalize       uint8 NCHW batch -> float, normalised: what "sweep"     -
                    leaves to do, once per batch

    `cfg`: a run's config (TrainConfig, FinetuneConfig), or for sweep and normalize the
    preprocessing a set of weights records (weights_meta's dict; sweep.py's plain --weights:
    the library's pretrained config), missing keys taken as the defaults. `decode`: "cpu"
    or "gpu", where the JPEGs are decoded; None: the run's --decode on `device`
    (resolve_decode). `device`: the run's device, where a run whose fast_decode is null
    (configured before it was the default) takes the fast decoder on CUDA only.
    On the device path the batches leave the loader as uint8, normalised with the run's mean
    and std by the training loop (fixres.engine.to_device_batch)."""
    if stage not in STAGES:
        raise ValueError(f"create_transform: stage must be one of {', '.join(STAGES)}, got {stage!r}")
    prep = _preprocessing(cfg)
    if stage == "normalize":
        return float_normalize(mean=prep["mean"], std=prep["std"])
    if decode is None:
        decode = resolve_decode(cfg.decode, device or torch.device("cpu"))
    if stage == "sweep":
        if decode == "gpu":
            return ReadForDevice(ResizeSpec(tuple(pairs), prep["interpolation"]))
        return [eval_transform(size=s, crop_pct=c, interpolation=prep["interpolation"], normalize=False)
                for s, c in pairs]
    size = getattr(cfg, DEFAULT_SIZES[stage]) if size is None else size
    if stage == "eval":
        return _centre_crop(prep, size, decode)
    if stage == "train":
        return _train_crop(cfg, prep, size, decode, device)
    return _finetune_crop(cfg, prep, size, decode)


def _preprocessing(cfg) -> dict:
    """crop_pct, interpolation, mean, std and skip_bad of a run's config or of a weights
    file's metadata; mean and std ImageNet's where they are not resolved yet (None)."""
    if isinstance(cfg, dict):
        return {"crop_pct": cfg.get("crop_pct", 0.875), "interpolation": cfg.get("interpolation", "bilinear"),
                "mean": cfg.get("mean", IMAGENET_MEAN), "std": cfg.get("std", IMAGENET_STD), "skip_bad": False}
    return {"crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation, "mean": cfg.mean or IMAGENET_MEAN,
            "std": cfg.std or IMAGENET_STD, "skip_bad": cfg.skip_bad_images}


def _pure(prep: dict, *keys: str) -> dict:
    return {key: prep[key] for key in keys}


def _centre_crop(prep: dict, size: int, decode: str):
    """The test-time preprocessing at `size`; with decode "gpu" the workers' half (uint8 later)."""
    if decode == "gpu":
        return ReadForDevice(ResizeSpec(((size, prep["crop_pct"]),), prep["interpolation"]), skip_bad=prep["skip_bad"])
    return eval_transform(size=size, **_pure(prep, "crop_pct", "interpolation", "mean", "std"))


def _device_crop(cfg, prep: dict, size: int) -> ReadForDevice:
    """RandomResizedCrop(size) drawn in the workers, decoded and cropped on the device."""
    return ReadForDevice(CropSpec(size, prep["interpolation"]), min_scale=cfg.min_scale, skip_bad=prep["skip_bad"])


def _train_crop(cfg, prep: dict, size: int, decode: str, device: torch.device | None):
    """train.py's augmentation: with decode "gpu" the workers read bytes and draw the crop,
    decoded on the device; else the fast decoder unless --no-fast-decode. --auto-augment and
    --random-erase follow the crop on the CPU paths: with either, auto decodes on the CPU."""
    if decode == "gpu" and not (cfg.auto_augment or cfg.random_erase):
        return _device_crop(cfg, prep, size)
    fast_decode = cfg.fast_decode if cfg.fast_decode is not None else device is not None and device.type == "cuda"
    augment = crop_augment(auto_augment=cfg.auto_augment, random_erase=cfg.random_erase,
                           **_pure(prep, "interpolation", "mean", "std"))  # random erasing normalises
    if fast_decode:  # uint8 crops: the engine normalises them on the device with cfg.mean and cfg.std
        return DecodeRandomResizedCrop(size=size, min_scale=cfg.min_scale, interpolation=prep["interpolation"],
                                       augment=augment)
    return train_transform(size=size, min_scale=cfg.min_scale, augment=augment,
                           **_pure(prep, "interpolation", "mean", "std"))


def _finetune_crop(cfg, prep: dict, size: int, decode: str):
    """finetune.py's --aug. With decode "gpu", test (the evaluation's own preprocessing) and
    rrc decode on the device; test+ (flip, jitter, shifted crop) has no device version and
    stays in the workers."""
    if decode == "gpu" and cfg.aug == "test":
        return _centre_crop(prep, size, decode)
    if decode == "gpu" and cfg.aug == "rrc":
        return _device_crop(cfg, prep, size)
    return finetune_transform(aug=cfg.aug, size=size, min_scale=cfg.min_scale,
                              **_pure(prep, "crop_pct", "interpolation", "mean", "std"))
