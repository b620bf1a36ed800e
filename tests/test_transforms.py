"""Preprocessing sizes: the train crop, and the test resize that timm and FixRes use."""
import dataclasses

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


def test_create_transform_stages_are_the_pipelines_written_out():
    """fixres.preprocessing.create_transform, the one entry, against what each stage is written
    out by hand: the test crop with Pillow and numpy (eval, its size as BN re-estimation asks,
    the sweep's uint8 pairs and its batch normalisation, finetune --aug test), the training
    crop with torchvision's v1 transforms from the same seed (train without the fast decoder,
    finetune --aug rrc), and the specs of decoding on the device."""
    from torchvision import transforms as T

    from fixres.config import FinetuneConfig, TrainConfig
    from fixres.device_decode import CropSpec, ReadForDevice, ResizeSpec
    from fixres.preprocessing import create_transform
    from fixres.transforms import DecodeRandomResizedCrop

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    prep = dict(crop_pct=0.8, interpolation="bicubic", mean=mean, std=std, min_scale=0.3)
    cfg = TrainConfig(train_res=32, test_res=24, fast_decode=False, decode="cpu", **prep)
    tuned = FinetuneConfig(res=20, aug="test", **prep)

    def written_out(size: int, crop_pct: float = 0.8) -> np.ndarray:
        pixels = pillow_centre_crop(img, size=size, crop_pct=crop_pct, resample=Image.Resampling.BICUBIC)
        return ((pixels.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)

    for tf, size in [(create_transform(cfg, "eval"), 24), (create_transform(cfg, "eval", size=28, decode="cpu"), 28),
                     (create_transform(tuned, "finetune-train", decode="cpu"), 20),
                     (create_transform(tuned, "eval", size=tuned.res, decode="cpu"), 20)]:
        np.testing.assert_allclose(tf(img).numpy(), written_out(size), rtol=0, atol=1e-6)
    pairs = [(24, 0.8), (24, 1.0), (16, 0.875)]
    meta = {"interpolation": "bicubic", "mean": mean, "std": std}  # a weights file's metadata, as sweep.py reads it
    uint8 = [tf(img) for tf in create_transform(meta, "sweep", pairs=pairs, decode="cpu")]
    for out, (size, crop_pct) in zip(uint8, pairs):
        assert np.array_equal(out.permute(1, 2, 0).numpy(), pillow_centre_crop(
            img, size=size, crop_pct=crop_pct, resample=Image.Resampling.BICUBIC))
    np.testing.assert_allclose(create_transform(meta, "normalize")(uint8[0][None])[0].numpy(), written_out(24),
                               rtol=0, atol=1e-6)

    by_hand = T.Compose([T.RandomResizedCrop(32, scale=(0.3, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                         T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    rrc = FinetuneConfig(res=32, aug="rrc", **prep)
    for tf in (create_transform(cfg, "train"), create_transform(rrc, "finetune-train", decode="cpu")):
        for seed in range(3):
            torch.manual_seed(seed)
            expected = by_hand(img)
            torch.manual_seed(seed)
            torch.testing.assert_close(tf(img), expected, rtol=0, atol=1e-6)
    fast = create_transform(dataclasses.replace(cfg, fast_decode=True), "train")
    assert isinstance(fast, DecodeRandomResizedCrop) and (fast.size, fast.scale) == (32, (0.3, 1.0))

    train = create_transform(cfg, "train", decode="gpu")
    assert isinstance(train, ReadForDevice) and (train.spec, train.scale) == (CropSpec(32, "bicubic"), (0.3, 1.0))
    assert create_transform(cfg, "eval", decode="gpu").spec == ResizeSpec(((24, 0.8),), "bicubic")
    assert create_transform(tuned, "finetune-train", decode="gpu").spec == ResizeSpec(((20, 0.8),), "bicubic")
    assert create_transform(rrc, "finetune-train", decode="gpu").spec == CropSpec(32, "bicubic")
    assert create_transform(meta, "sweep", pairs=pairs, decode="gpu").spec == ResizeSpec(tuple(pairs), "bicubic")
    with pytest.raises(ValueError, match="stage must be one of"):
        create_transform(cfg, "test")
