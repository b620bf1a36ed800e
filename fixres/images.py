"""Image reading that survives real files: any common format, mode and orientation to RGB.

    from fixres.images import open_image
    img = open_image("photo.jpg")                  # an upright 8-bit RGB PIL image
    img = open_image("photo.jpg", draft_size=128)  # a JPEG decoded at a reduced scale, >= 128 px

An image that fails to decode raises `BadImageError` (a DataError) naming the path; the
datasets (fixres/loaders.py) skip it with --skip-bad-images. The transforms that decode a
file themselves (fixres/transforms.py, fixres/device_decode.py) read it through here too.
"""
from __future__ import annotations

import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from fixres.data import DataError
from fixres.runtime import error_reason

EXIF_ORIENTATION = 0x0112


class BadImageError(DataError):
    """An image file that cannot be decoded; the message names the path."""


def open_image(path: str, draft_size=None) -> Image.Image:
    """Decode any common image file to an upright 8-bit RGB PIL image.

    `draft_size`: JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8) while the
    result stays at least this large on its shorter side; decoding fewer pixels
    is most of the speed-up when a 500 px photo is only needed at 128 px. It may be a
    function of the upright (width, height), read from the header before anything is
    decoded (DecodeRandomResizedCrop draws its crop there)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if callable(draft_size):
                width, height = img.size
                if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotations by 90 degrees
                    width, height = height, width
                draft_size = draft_size(width, height)
            if draft_size and img.format == "JPEG":
                scale = min(img.size) / draft_size
                if scale >= 2:
                    img.draft("RGB", (int(img.size[0] / scale), int(img.size[1] / scale)))
            img.load()
            # read after load: a PNG's eXIf chunk may follow its pixels. exif_transpose copies
            # even an upright image, a tenth of a JPEG decode, so it runs only when needed
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError,
            Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot decode image {path}: {error_reason(err)}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping at 255
        import numpy as np
        arr = np.asarray(img, dtype=np.float32)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype("uint8")).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        # transparent pixels become white, as a viewer would show them
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
