"""Preprocessing sizes: the train crop, and the test resize that timm and FixRes use."""
import numpy as np
import pytest
import torch
from PIL import Image

from fixres.transforms import IMAGENET_MEAN, eval_transform, float_normalize, pillow_nearest_index, train_transform


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


def test_eval_transform_split_gives_the_same_numbers():
    """The sweep's split: uint8 per image in the workers, then float and normalise per batch on
    the device; the result is eval_transform's to the bit."""
    images = [Image.fromarray(torch.randint(0, 256, (45, 61, 3), dtype=torch.uint8).numpy()) for _ in range(2)]
    preprocess = dict(size=24, crop_pct=0.8, interpolation="bicubic")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    uint8 = [eval_transform(**preprocess, normalize=False)(img) for img in images]
    assert uint8[0].dtype == torch.uint8 and uint8[0].shape == (3, 24, 24)
    whole = eval_transform(**preprocess, mean=mean, std=std)
    assert torch.equal(float_normalize(mean=mean, std=std)(torch.stack(uint8)), torch.stack([whole(i) for i in images]))


def test_pillow_nearest_index_is_pillows_choice_of_pixel():
    """Against Pillow's own NEAREST resize of an image whose pixels hold their column and row,
    for sizes where a centre falls exactly on a pixel edge (88 -> 166: row 41) and random ones."""
    rng = np.random.default_rng(0)
    pairs = [(88, 166), (50, 211), (252, 281), (7, 3), (1, 5), (255, 1)] + \
        [tuple(int(v) for v in rng.integers(1, 256, 2)) for _ in range(300)]
    for n_in, n_out in pairs:
        source = np.zeros((1, n_in), np.uint8)
        source[0] = np.arange(n_in)
        picked = np.asarray(Image.fromarray(source).resize((n_out, 1), Image.Resampling.NEAREST))[0]
        assert pillow_nearest_index(n_in, n_out).tolist() == picked.tolist(), (n_in, n_out)
