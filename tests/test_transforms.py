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


def pillow_centre_crop(img: Image.Image, *, size: int, crop_pct: float, resample) -> np.ndarray:
    """The test preprocessing's pixels written out with Pillow: the shorter side to
    int(size / crop_pct), the longer in proportion and rounded down, then the centre
    size x size (offsets rounded); HWC uint8."""
    w, h = img.size
    short = int(size / crop_pct)
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
    return np.asarray(img.resize(new, resample).crop((left, top, left + size, top + size)))


def test_eval_transform_split_is_the_preprocessing_written_out():
    """The sweep's split (uint8 per image in the workers, then float and the run's own mean and
    std per batch on the device) against Pillow and numpy: the same pixels to the level, the
    same numbers to float32's rounding; and the split is eval_transform's whole, to the bit."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in [(45, 61, 3), (53, 37, 3)]]
    preprocess = dict(size=24, crop_pct=0.8, interpolation="bicubic")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    uint8 = torch.stack([eval_transform(**preprocess, normalize=False)(img) for img in images])
    pixels = np.stack([pillow_centre_crop(img, size=24, crop_pct=0.8, resample=Image.Resampling.BICUBIC)
                       for img in images])
    assert uint8.dtype == torch.uint8 and uint8.shape == (2, 3, 24, 24)
    assert np.array_equal(uint8.permute(0, 2, 3, 1).numpy(), pixels)
    normalised = float_normalize(mean=mean, std=std)(uint8)
    expected = (pixels.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(normalised.permute(0, 2, 3, 1).numpy(), expected, rtol=0, atol=1e-6)
    whole = eval_transform(**preprocess, mean=mean, std=std)
    assert torch.equal(normalised, torch.stack([whole(img) for img in images]))


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
