"""Preprocessing as pure functions of explicit keyword arguments.

    train_transform(size=224, min_scale=0.08)  # RandomResizedCrop + flip
    eval_transform(size=224, crop_pct=0.875)   # Resize(256) + CenterCrop(224)

The test-time resize follows timm and the FixRes code: the shorter side goes to
int(size / crop_pct), rounded down, then the centre size x size is kept.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from fixres.resolution import resize_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}


def _to_normalized_tensor(mean, std) -> list:
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def train_transform(*, size: int, min_scale: float = 0.08, interpolation: str = "bilinear",
                    hflip: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    steps = [v2.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=INTERPOLATIONS[interpolation],
                                  antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_normalized_tensor(mean, std))


def eval_transform(*, size: int, crop_pct: float = 0.875, interpolation: str = "bilinear",
                   mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    return v2.Compose([
        v2.Resize(resize_size(size, crop_pct), interpolation=INTERPOLATIONS[interpolation], antialias=True),
        v2.CenterCrop(size),
        *_to_normalized_tensor(mean, std),
    ])
