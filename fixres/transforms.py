"""Preprocessing as pure functions of explicit keyword arguments: the builders underneath
fixres.preprocessing.create_transform, which makes a run's transforms from its config (the
one entry the jobs call); these take every choice as a keyword, to be tested alone.

    train_transform(size=224, min_scale=0.08)  # RandomResizedCrop + flip
    eval_transform(size=224, crop_pct=0.875)   # Resize(256) + CenterCrop(224)
    eval_transform(size=224, normalize=False)  # the same, uint8; float_normalize() finishes a batch
    finetune_transform(aug="test+", size=96)   # finetune.py's --aug: test, test+ or rrc
    DecodeRandomResizedCrop(size=224)          # path -> the training crop as uint8, decoded at reduced scale
    normalize_batch(uint8_batch)               # on the device: float, ImageNet mean/std
    crop_augment(auto_augment="ta_wide", random_erase=0.1)   # after the crop, on uint8: both paths
    BatchMix(num_classes=1000, mixup_alpha=0.2, cutmix_alpha=1.0, seed=0)   # Mixup or CutMix per batch

The recipe augmentations run on the uint8 crop, in the loader workers, whichever path made
it (train_transform from a decoded image, DecodeRandomResizedCrop from the file): the
automatic augmentation (TrivialAugmentWide or RandAugment) and then random erasing, which
normalises the crop with the run's mean and std and sets the rectangle to 0, as torchvision's
recipe erases after normalising (the workers then hand over float crops, which
normalize_batch passes). Mixup and CutMix mix a normalised batch on the device.

The test-time resize follows timm and the FixRes code: the shorter side goes to
int(size / crop_pct), rounded down, then the centre size x size is kept.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from fixres.config import ConfigError
from fixres.images import open_image
from fixres.resolution import resize_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}


def _scale_and_normalize(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def float_normalize(*, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """uint8 -> float in [0, 1], normalised: the last steps of eval_transform, which
    eval_transform(normalize=False) leaves out, for a whole uint8 batch on the device."""
    return v2.Compose(_scale_and_normalize(mean, std))


def crop_augment(*, auto_augment: str | None = None, random_erase: float = 0.0, interpolation: str = "bilinear",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose | None:
    """What the recipes add after the crop and flip, on a uint8 CHW tensor; None when nothing.
    With random_erase the crop leaves normalised with `mean` and `std` (those of the run) and
    the rectangle exactly 0, as torchvision erases after normalising: a uint8 fill of the mean
    colour is 0 only to within its rounding, and only for the mean it was made with."""
    steps = []
    if auto_augment == "ta_wide":
        steps.append(v2.TrivialAugmentWide(interpolation=INTERPOLATIONS[interpolation]))
    elif auto_augment == "ra":
        steps.append(v2.RandAugment(interpolation=INTERPOLATIONS[interpolation]))  # 2 ops, magnitude 9
    elif auto_augment is not None:
        raise ValueError(f"--auto-augment must be ta_wide or ra, got {auto_augment!r}")
    if random_erase > 0:
        steps += [*_scale_and_normalize(mean, std), v2.RandomErasing(p=random_erase, value=0)]
    return v2.Compose(steps) if steps else None


class _NormalizeUint8(nn.Module):
    """uint8 -> float, normalised; a float tensor passes, normalised already by crop_augment's
    random erasing (as normalize_batch lets float batches pass)."""

    def __init__(self, mean, std):
        super().__init__()
        self.normalize = v2.Compose(_scale_and_normalize(mean, std))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.normalize(img) if img.dtype == torch.uint8 else img


def train_transform(*, size: int, min_scale: float = 0.08, interpolation: str = "bilinear",
                    hflip: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    augment: v2.Compose | None = None) -> v2.Compose:
    """RandomResizedCrop + flip on a decoded image, then `augment` (crop_augment, made with the
    same mean and std) on its uint8 tensor, then the normalisation."""
    steps = [v2.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=INTERPOLATIONS[interpolation],
                                  antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + [v2.PILToTensor()] + ([augment] if augment else []) + [_NormalizeUint8(mean, std)])


def eval_transform(*, size: int, crop_pct: float = 0.875, interpolation: str = "bilinear",
                   mean=IMAGENET_MEAN, std=IMAGENET_STD, normalize: bool = True) -> v2.Compose:
    """Resize(int(size / crop_pct)) + CenterCrop(size) -> tensor; normalize=False stops at the
    uint8 tensor, and float_normalize(mean=, std=) does the rest (the sweep: once per batch)."""
    steps = [v2.Resize(resize_size(size, crop_pct), interpolation=INTERPOLATIONS[interpolation], antialias=True),
             v2.CenterCrop(size), v2.PILToTensor()]
    return v2.Compose(steps + (_scale_and_normalize(mean, std) if normalize else []))


class HorizontalShiftCrop(nn.Module):
    """A size x size crop at the vertical centre and a random horizontal offset: the centre
    crop's framing, translated sideways (the FixRes v2 fine-tuning crop). The offset is
    uniform over the whole margin; the reference's `center_crop_new` draws centre +- a
    uniform integer, the same range with the centre offset twice as likely (docs/finetune.md says
    why this one is kept)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img):
        height, width = v2.functional.get_size(img)
        top = int(round((height - self.size) / 2.0))
        left = int(torch.randint(0, max(width - self.size, 0) + 1, ()).item())
        return v2.functional.crop(img, top, left, self.size, self.size)


def finetune_transform(*, aug: str, size: int, crop_pct: float = 0.875, interpolation: str = "bilinear",
                       min_scale: float = 0.08, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """finetune.py's --aug. test: the test-time preprocessing at `size`; test+: the same
    framing with a flip, a horizontal shift and ColorJitter(0.05, 0.05, 0.05); rrc:
    RandomResizedCrop(size)."""
    if aug == "test":
        return eval_transform(size=size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
    if aug == "rrc":
        return train_transform(size=size, min_scale=min_scale, interpolation=interpolation, mean=mean, std=std)
    if aug != "test+":
        raise ConfigError(f"--aug must be one of test, test+, rrc, got {aug!r}")
    return v2.Compose([
        v2.Resize(resize_size(size, crop_pct), interpolation=INTERPOLATIONS[interpolation], antialias=True),
        HorizontalShiftCrop(size), v2.RandomHorizontalFlip(), v2.ColorJitter(0.05, 0.05, 0.05),
        v2.PILToTensor(), *_scale_and_normalize(mean, std)])


def sample_crop(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]):
    """RandomResizedCrop's box (top, left, height, width): an area fraction uniform in
    `scale`, a log-uniform aspect ratio in `ratio`, ten tries, then the largest centred box
    within `ratio`. Draws from torch's CPU generator, so per-sample seeding applies."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)).item())
            left = int(torch.randint(0, width - w + 1, (1,)).item())
            return top, left, h, w
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class DecodeRandomResizedCrop:
    """A file path -> RandomResizedCrop(size, scale=(min_scale, 1)) + horizontal flip, as a
    uint8 CHW tensor; `normalize_batch` finishes the job on the device (an `augment` with random
    erasing hands over the crop normalised, as float). The same
    augmentation as train_transform, cheaper (benchmarks/speed/speed.py measures both):

    - the crop box is drawn from the header's size before anything is decoded, and a JPEG
      whose box is at least twice the target is decoded at 1/2, 1/4 or 1/8 scale
      (libjpeg's DCT scaling via Pillow's draft mode);
    - Pillow copies out only the crop, and the resize runs on uint8 tensors (torchvision's
      vectorised antialiased kernel);
    - no float conversion or normalisation per image in the loader workers.
    Decoding goes through fixres.images.open_image: EXIF rotation, every image mode and the
    same BadImageError for a file that does not decode."""

    takes_path = True

    def __init__(self, *, size: int, min_scale: float = 0.08, ratio=(3 / 4, 4 / 3),
                 interpolation: str = "bilinear", hflip: bool = True, draft: bool = True, augment=None):
        self.size, self.scale, self.ratio = size, (min_scale, 1.0), ratio
        self.interpolation, self.hflip, self.draft = INTERPOLATIONS[interpolation], hflip, draft
        self.augment = augment  # crop_augment's, on the uint8 crop

    def decode(self, path: str) -> tuple:
        """The image, decoded at reduced scale where the crop allows, and the crop's
        (left, top, right, bottom) in its pixels."""
        box = {}

        def draw_crop(width: int, height: int) -> int | None:
            """Called with the upright size from the header: the crop, and the smallest
            decode whose crop still has >= size pixels on its shorter side."""
            box.update(width=width, height=height, crop=sample_crop(height, width, self.scale, self.ratio))
            _, _, h, w = box["crop"]
            return math.ceil(min(width, height) * self.size / min(h, w)) if self.draft else None

        img = open_image(path, draft_size=draw_crop)
        top, left, h, w = box["crop"]
        fy, fx = img.height / box["height"], img.width / box["width"]
        # scale both edges, not the start and the length: round(left * f) + round(w * f) can
        # end a pixel past the decoded image, which Pillow's crop pads with black
        left, right = _scaled_span(left, w, fx, img.width)
        top, bottom = _scaled_span(top, h, fy, img.height)
        return img, (left, top, right, bottom)

    def __call__(self, path: str) -> torch.Tensor:
        img, box = self.decode(path)
        # crop with Pillow first: only the crop's pixels are copied into the tensor
        out = TF.pil_to_tensor(img.crop(box))
        if self.interpolation == v2.InterpolationMode.NEAREST:  # torch's nearest picks other pixels than Pillow's
            out = resize_nearest(out, (self.size, self.size))
        else:
            out = TF.resize(out, [self.size, self.size], interpolation=self.interpolation, antialias=True)
        if self.hflip and torch.rand(1).item() < 0.5:
            out = out.flip(-1)
        return self.augment(out) if self.augment else out

    def __repr__(self) -> str:
        return (f"DecodeRandomResizedCrop(size={self.size}, scale={self.scale}, draft={self.draft}, "
                f"interpolation={self.interpolation.value}, augment={self.augment})")


@functools.lru_cache(maxsize=1024)
def pillow_nearest_index(n_in: int, n_out: int) -> torch.Tensor:
    """The source pixel of each of `n_out` output pixels along one axis, as Pillow's NEAREST
    resize picks it: the one under the output pixel's centre, the centres summed step by step in
    float64 as Pillow does (ImagingScaleAffine). torch's "nearest" takes floor(x * step), another
    pixel; its "nearest-exact" differs from Pillow where a centre falls on a pixel edge."""
    step = n_in / n_out
    centres = np.add.accumulate(np.concatenate([[0.5 * step], np.full(n_out - 1, step)]))  # in order, as Pillow
    return torch.from_numpy(np.minimum(centres.astype(np.int64), n_in - 1))


def resize_nearest(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pillow's NEAREST resize of a (..., H, W) tensor to (height, width), on the tensor's device."""
    rows = pillow_nearest_index(int(img.shape[-2]), size[0]).to(img.device, non_blocking=True)
    cols = pillow_nearest_index(int(img.shape[-1]), size[1]).to(img.device, non_blocking=True)
    return img.index_select(-2, rows).index_select(-1, cols)


def _scaled_span(start: int, length: int, factor: float, limit: int) -> tuple[int, int]:
    """[start, start + length) scaled by `factor` and rounded, inside [0, limit), >= 1 pixel."""
    first = min(round(start * factor), limit - 1)
    return first, max(first + 1, min(limit, round((start + length) * factor)))


def normalize_batch(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """A uint8 NCHW batch -> float, scaled to [0, 1] and normalised; float batches pass."""
    if images.dtype != torch.uint8:
        return images
    mean255, std255 = _scaled_mean_std(images.device, tuple(mean), tuple(std))
    return (images.float() - mean255) / std255


@functools.lru_cache(maxsize=8)
def _scaled_mean_std(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std x 255 as (1, C, 1, 1) tensors on `device`, made once rather than copied
    to the device at every training step."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)


class BatchMix:
    """Mixup or CutMix (one of the two at random per batch when both are on, as torchvision's
    recipe does) on a normalised batch: (images, labels) -> (mixed images, soft targets of
    shape (N, num_classes)) for a cross-entropy on probabilities.

    Each batch's draws come from a generator seeded with (seed, rank, epoch, batch index), and
    the global random state is left as it was: a run resumed in the middle of an epoch mixes
    its remaining batches as the uninterrupted run did."""

    def __init__(self, *, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, seed: int = 0,
                 rank: int = 0):
        mixes = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + \
                ([v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else [])
        if not mixes:
            raise ValueError("BatchMix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
        self.seed, self.rank = seed, rank

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, epoch: int, batch: int):
        # torchvision's MixUp and CutMix draw from torch's global CPU generator; fork it
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(
                ((self.seed * 1_000_033 + self.rank) * 100_003 + epoch) * 10_000_079 + batch)
            return self.mix(images, labels)

    def __repr__(self) -> str:
        return f"BatchMix({self.mix})"
