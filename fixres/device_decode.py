"""JPEG decoding on the model's device: loader workers only read file bytes.

    python train.py --data train.csv --decode gpu      # nvJPEG through TorchCodec, crops on the GPU
    python sweep.py --checkpoint runs/<name> --decode gpu
    pip install torchcodec                             # the optional dependency (docs/gpus.md: GPU decoding)

--decode cpu: the loader workers decode and crop (fixres.transforms). gpu: the workers read
each file and its header; the main process decodes the whole batch in one
`torchcodec.decoders.decode_jpeg` call on its device (one nvJPEG call on a GPU), then crops,
resizes and flips there. auto (the default): gpu on CUDA when torchcodec imports, else cpu.
The same code runs with device="cpu" (TorchCodec's libjpeg-turbo), which is how the tests
compare it with the Pillow path.

Training (`CropSpec`): the worker draws the RandomResizedCrop box and the flip from the
per-sample seeded CPU generator exactly as DecodeRandomResizedCrop draws them (same
`sample_crop`, same order), so both paths crop the same boxes; the device crops the full
decode (no reduced-scale decoding) and resizes with torch's antialiased kernel in float,
rounded to uint8 once per batch. Evaluation and the sweep (`ResizeSpec`): one decode, then
Resize(int(size / crop_pct)) + CenterCrop(size) for every size (or every (size, crop_pct) pair).
The batch leaves this module as uint8 NCHW on the device; normalisation follows as for the CPU
path (normalize_batch).

Per-image fallback to the CPU: files that are not baseline-decodable JPEGs for the device
(another format, CMYK, an EXIF rotation, over Pillow's pixel limit) are decoded in the worker by
fixres.images.open_image and travel as pixels; a JPEG the batched call refuses is decoded alone,
then by Pillow; a file nothing can read raises BadImageError, or is skipped and counted with
--skip-bad-images.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from fixres.config import ConfigError
from fixres.images import EXIF_ORIENTATION, BadImageError, open_image
from fixres.resolution import resize_size
from fixres.runtime import error_reason
from fixres.transforms import resize_nearest, sample_crop

DECODE_CHOICES = ("auto", "cpu", "gpu")
INSTALL_HINT = "pip install torchcodec (>= 0.16; docs/gpus.md: GPU decoding)"


@functools.lru_cache(maxsize=1)
def torchcodec_decode_jpeg():
    """torchcodec.decoders.decode_jpeg, or None where torchcodec (>= 0.16) is not installed."""
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception:  # not installed, too old (no decode_jpeg), or its native library fails to load
        return None
    return decode_jpeg


@functools.lru_cache(maxsize=None)
def decode_problem(device: str) -> str | None:
    """None when torchcodec decodes a JPEG on `device`, else why not, to follow "--decode gpu ".
    Tried once per device on a tiny JPEG: a torchcodec built without CUDA would otherwise fail
    every batch and leave all the decoding to Pillow in the main process."""
    decode_jpeg = torchcodec_decode_jpeg()
    if decode_jpeg is None:
        return f"needs torchcodec, which is not installed: {INSTALL_HINT}"
    encoded = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(encoded, "JPEG")
    try:
        shape = tuple(decode_jpeg(encoded.getvalue(), mode="RGB", device=device).shape)
    except Exception as err:  # no CUDA build, no nvJPEG, a driver problem, ...
        return f"cannot decode on {device} with this torchcodec ({error_reason(err)})"
    return None if shape == (3, 6, 8) else f"decoded a test JPEG on {device} to the wrong shape {shape}"


def resolve_decode(choice: str, device: torch.device) -> str:
    """'cpu' or 'gpu' for --decode `choice` on `device`. auto: gpu on CUDA where torchcodec
    decodes there; gpu where it cannot is a one-line error naming why."""
    if choice not in DECODE_CHOICES:
        raise ConfigError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and device.type != "cuda"):
        return "cpu"
    problem = decode_problem(str(device))
    if problem is None:
        return "gpu"
    if choice == "gpu":
        raise ConfigError(f"--decode gpu {problem}")
    return "cpu"


@dataclass(frozen=True)
class CropSpec:
    """Training: RandomResizedCrop(size) from the worker's box, and its flip."""
    size: int
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class ResizeSpec:
    """Evaluation: Resize(int(size / crop_pct)) + CenterCrop(size) for every (size, crop_pct)
    of `outputs`, all from one decode (one pair for a run's evaluation; a sweep's every pair)."""
    outputs: tuple  # ((size, crop_pct), ...), in the order of the batch's outputs
    interpolation: str = "bilinear"


@dataclass
class DeviceSample:
    """What a loader worker hands over for one image: its bytes (or, for a file the device
    cannot decode, its pixels), its upright size, and for training the crop box and flip."""
    path: str
    data: bytes | None
    pixels: torch.Tensor | None     # uint8 CHW, decoded in the worker (the CPU fallback)
    size: tuple                     # (width, height) of the upright image
    box: tuple | None               # (top, left, height, width), training only
    flip: bool
    spec: CropSpec | ResizeSpec
    skip_bad: bool

    @staticmethod
    def collate(samples: list[DeviceSample]) -> DeviceBatch:
        """One uint8 tensor of all the bytes (one shared-memory transfer, not one per image)."""
        offsets = [0]
        for s in samples:
            offsets.append(offsets[-1] + (len(s.data) if s.data is not None else 0))
        joined = b"".join(s.data for s in samples if s.data is not None)
        blob = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        return DeviceBatch(paths=[s.path for s in samples], blob=blob, offsets=offsets,
                           pixels={i: s.pixels for i, s in enumerate(samples) if s.pixels is not None},
                           sizes=[s.size for s in samples], boxes=[s.box for s in samples],
                           flips=[s.flip for s in samples], spec=samples[0].spec, skip_bad=samples[0].skip_bad)


class ReadForDevice:
    """The loader workers' half of --decode gpu (a `takes_path` transform for ImageDataset):
    path -> DeviceSample. With a CropSpec it draws RandomResizedCrop(scale=(min_scale, 1)) and the
    flip as DecodeRandomResizedCrop does, from the same generator, in the same order."""

    takes_path = True

    def __init__(self, spec: CropSpec | ResizeSpec, *, min_scale: float = 0.08, ratio=(3 / 4, 4 / 3),
                 hflip: bool = True, skip_bad: bool = False):
        self.spec, self.scale, self.ratio, self.hflip, self.skip_bad = spec, (min_scale, 1.0), ratio, hflip, skip_bad

    def __call__(self, path: str) -> DeviceSample:
        data, size = jpeg_for_device(path)
        pixels = None
        if data is None:  # the CPU path's decode, in the worker; BadImageError for a file it cannot read
            img = open_image(path)
            pixels = pil_to_tensor(img)
            size = img.size
        box, flip = None, False
        if isinstance(self.spec, CropSpec):
            width, height = size
            box = sample_crop(height, width, self.scale, self.ratio)
            flip = self.hflip and torch.rand(1).item() < 0.5
        return DeviceSample(path, data, pixels, size, box, flip, self.spec, self.skip_bad)

    def __repr__(self) -> str:
        return f"ReadForDevice({self.spec}, scale={self.scale})"


def jpeg_for_device(path: str) -> tuple[bytes | None, tuple | None]:
    """(file bytes, upright (width, height)) of a JPEG the device decodes as Pillow would, from
    its header alone; (None, None) for anything else, which open_image then decodes or refuses."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            too_large = Image.MAX_IMAGE_PIXELS is not None and img.width * img.height > Image.MAX_IMAGE_PIXELS
            if (img.format != "JPEG" or img.mode not in ("RGB", "L") or too_large
                    or img.getexif().get(EXIF_ORIENTATION, 1) != 1):
                return None, None
            return data, img.size
    except Exception:  # unreadable header, bomb warning turned error, ...: open_image says what it is
        return None, None


@dataclass
class DeviceBatch:
    """A collated batch of DeviceSamples. It has no `.to()`: Accelerate's loader passes it on
    untouched, and `decode` puts its pixels on the device."""
    paths: list
    blob: torch.Tensor
    offsets: list
    pixels: dict
    sizes: list
    boxes: list
    flips: list
    spec: CropSpec | ResizeSpec
    skip_bad: bool

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, device: torch.device) -> tuple[list[torch.Tensor], list[int]]:
        """([uint8 NCHW batch per size], indices of the images kept): every image unless
        skip_bad dropped one that nothing could decode."""
        images = decode_all(self, device)
        kept = [i for i, img in enumerate(images) if img is not None]
        if isinstance(self.spec, CropSpec):
            size = (self.spec.size, self.spec.size)
            crops = [_resize(_crop(images[i], self.boxes[i]), size, self.spec.interpolation) for i in kept]
            batch = _to_uint8(crops, size, device)
            flips = torch.tensor([self.flips[i] for i in kept], dtype=torch.bool).to(device).view(-1, 1, 1, 1)
            return [torch.where(flips, batch.flip(-1), batch)], kept
        outputs = []
        for size, crop_pct in self.spec.outputs:
            shorter = resize_size(size, crop_pct)
            resized = (_resize(images[i], _shorter_side_to(images[i].shape[-2:], shorter), self.spec.interpolation)
                       for i in kept)
            outputs.append(_to_uint8([_center_crop(img, size) for img in resized], (size, size), device))
        return outputs, kept


def decode_all(batch: DeviceBatch, device: torch.device) -> list[torch.Tensor | None]:
    """Every image of the batch as uint8 CHW on `device`: the JPEGs in one decode_jpeg call."""
    decode_jpeg = torchcodec_decode_jpeg()
    images: list[torch.Tensor | None] = [None] * len(batch)
    for i, pixels in batch.pixels.items():
        images[i] = pixels.to(device, non_blocking=True)
    encoded = [i for i in range(len(batch)) if i not in batch.pixels]
    if not encoded:
        return images
    if decode_jpeg is None:
        raise ConfigError(f"--decode gpu needs torchcodec, which is not installed: {INSTALL_HINT}")
    sources = [batch.blob[batch.offsets[i]:batch.offsets[i + 1]] for i in encoded]
    try:
        decoded = decode_jpeg(sources, mode="RGB", device=device)
    except RuntimeError:  # one bad file fails the whole call: decode each alone to find it
        decoded = [_decode_alone(decode_jpeg, source, device) for source in sources]
    for i, img in zip(encoded, decoded):
        width, height = batch.sizes[i]
        if img is None or tuple(img.shape) != (3, height, width):  # refused, or not as Pillow reads it
            img = _decode_with_pillow(batch.paths[i], device, batch.skip_bad)
        images[i] = img
    return images


def _decode_alone(decode_jpeg, source: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(source, mode="RGB", device=device)
    except RuntimeError:
        return None


def _decode_with_pillow(path: str, device: torch.device, skip_bad: bool) -> torch.Tensor | None:
    try:
        img = open_image(path)
    except BadImageError:
        if skip_bad:
            return None
        raise
    return pil_to_tensor(img).to(device)


def _crop(img: torch.Tensor, box: tuple) -> torch.Tensor:
    top, left, height, width = box
    return img[:, top:top + height, left:left + width]


def _shorter_side_to(shape, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int) output size: the shorter side to `shorter`, the longer in proportion, rounded down."""
    height, width = int(shape[0]), int(shape[1])
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def _center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop offsets (the resized image is never smaller than the crop here)."""
    height, width = img.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return img[..., top:top + size, left:left + size]


def _resize(img: torch.Tensor, size: tuple, interpolation: str) -> torch.Tensor:
    """An antialiased resize in float (1, C, H, W), as torchvision resizes uint8 images on a GPU;
    rounding to uint8 is left to _to_uint8, once per batch."""
    x = img[None].float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if interpolation == "nearest":  # Pillow's pixels: torch's own nearest picks others
        return resize_nearest(x, size)
    return F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True)


def _to_uint8(images: list[torch.Tensor], size: tuple, device: torch.device) -> torch.Tensor:
    if not images:
        return torch.empty(0, 3, *size, dtype=torch.uint8, device=device)
    return torch.cat(images).round_().clamp_(0, 255).to(torch.uint8)


def decode_on_device(images, labels, skipped, device: torch.device):
    """The loader's (images, labels, skipped) with a DeviceBatch decoded on `device` (the
    first, or only, size); any other batch passes unchanged."""
    if not isinstance(images, DeviceBatch):
        return images, labels, skipped
    outputs, kept = images.decode(device)
    if len(kept) < len(images):
        labels = labels[torch.tensor(kept, dtype=torch.long, device=labels.device)]
        skipped = skipped + len(images) - len(kept)
    return outputs[0], labels, skipped

