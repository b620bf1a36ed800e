"""Preprocessing sizes: the train crop, and the test resize that timm and FixRes use."""
import pytest
import torch
from PIL import Image

from fixres.transforms import IMAGENET_MEAN, eval_transform, train_transform


@pytest.mark.parametrize("size, crop_pct, resized", [(224, 0.875, 256), (384, 0.875, 438), (64, 0.8, 80)])
def test_eval_resizes_shorter_side_then_centre_crops(size, crop_pct, resized):
    tf = eval_transform(size=size, crop_pct=crop_pct)
    resize = tf.transforms[0]
    assert resize.size == [resized]
    out = tf(Image.new("RGB", (500, 375)))
    assert out.shape == (3, size, size) and out.dtype == torch.float32


def test_eval_output_is_normalised():
    grey = Image.new("RGB", (40, 30), tuple(int(255 * m) for m in IMAGENET_MEAN))
    out = eval_transform(size=16)(grey)
    assert out.abs().max() < 0.05


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_train_crop_size_and_interpolation(interpolation):
    tf = train_transform(size=32, min_scale=0.5, interpolation=interpolation)
    assert tf.transforms[0].scale == (0.5, 1.0)
    assert tf(Image.new("RGB", (97, 61))).shape == (3, 32, 32)
