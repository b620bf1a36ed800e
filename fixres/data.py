"""Data: the two layouts users already have, and image loading that survives real files.

Layouts, detected from `--data`:
  1. CSV split (the Cassava blog post's): `image_id,label,is_val` rows, images in
     `--images` (default: the CSV's folder, or its `images/` subfolder);
  2. ImageFolder: `root/train/<class>/*` and `root/val/<class>/*`.

    from fixres.data import load_split
    split = load_split("data/train.csv")        # -> Split(train, val, classes)

Every problem that can be known before training (missing column, missing image,
unknown label, empty validation split, ...) raises `DataError` with one line
naming the file and row. Images that fail to decode raise `BadImageError` with
the path when they are read.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fixres.config import ConfigError
from fixres.runtime import error_reason

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
TRUE_VALUES = {"true", "1", "yes", "t", "y"}
FALSE_VALUES = {"false", "0", "no", "f", "n"}
EXIF_ORIENTATION = 0x0112


class DataError(ValueError):
    """Bad dataset layout or content; the message names the file and row."""


class BadImageError(DataError):
    """An image file that cannot be decoded; the message names the path."""


@dataclass
class Split:
    train: list[tuple[str, int]]   # (image path, class index)
    val: list[tuple[str, int]]
    classes: list[str]
    source: str                    # what was read, for messages and the run config


def load_split(data: str | Path, images: str | Path | None = None,
               classes: list[str] | None = None) -> Split:
    """Read either layout. `classes` fixes the class list (a trained run's); otherwise it
    is taken from the data: sorted names, or sorted numbers when every label is an integer."""
    data = Path(data)
    if data.is_file() and data.suffix.lower() in {".csv", ".tsv", ".txt"}:
        return read_csv_split(data, images, classes)
    if data.is_dir():
        if (data / "train").is_dir() and (data / "val").is_dir():
            return read_image_folder(data, classes)
        csvs = sorted(data.glob("*.csv"))
        if len(csvs) == 1:
            return read_csv_split(csvs[0], images, classes)
        raise DataError(f"{data}: expected train/ and val/ class folders or one CSV split file")
    raise DataError(f"--data {data}: no such CSV file or folder")


def _sorted_labels(labels) -> list[str]:
    labels = set(labels)
    if all(_is_int(x) for x in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?")


def canonical_label(text: str) -> str:
    """A label that is a number with an integer value is that integer: "3", "03", "3.0" and
    "+3" are class "3" (a spreadsheet writes 3 as 3.0). Anything else ("3.5", "cat") is a name."""
    if not _NUMBER.fullmatch(text):
        return text
    value = Decimal(text)  # exact: no float rounding of long integers
    return str(int(value)) if value == value.to_integral_value() else text


def _class_index(classes: list[str]) -> dict[str, int]:
    # "03" or "3.0" in a class list (an older run's) is found by "3"; the exact names win
    index = {canonical_label(name): i for i, name in enumerate(classes)}
    index.update({name: i for i, name in enumerate(classes)})
    return index


def read_csv_split(csv_path: Path, images: str | Path | None = None,
                   classes: list[str] | None = None) -> Split:
    import pandas as pd

    csv_path = Path(csv_path)
    image_dir = Path(images) if images else _default_image_dir(csv_path)
    if not image_dir.is_dir():
        raise DataError(f"{csv_path}: image folder {image_dir} does not exist (set --images)")
    try:
        # utf-8-sig strips a byte-order mark that spreadsheet exports add to the first column name
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                            sep=None if csv_path.suffix.lower() != ".csv" else ",", engine="python")
    except Exception as err:  # pandas raises many types for unreadable files
        raise DataError(f"{csv_path}: cannot read CSV ({err})") from None
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ("image_id", "label", "is_val") if c not in table.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)} "
                        f"(need image_id,label,is_val; found {','.join(table.columns)})")

    root = image_dir.resolve()
    present = set(os.listdir(root))
    seen: dict[str, int] = {}
    rows = []
    for i, (image_id, label, is_val) in enumerate(zip(table["image_id"], table["label"], table["is_val"])):
        where = f"{csv_path} row {i + 2}"  # +2: header line, 1-based
        image_id, label, flag = image_id.strip(), label.strip(), is_val.strip().lower()
        if not image_id:
            raise DataError(f"{where}: empty image_id")
        if not label:
            raise DataError(f"{where}: missing label for {image_id}")
        if image_id in seen:
            raise DataError(f"{where}: duplicate image_id {image_id} (first on row {seen[image_id]})")
        seen[image_id] = i + 2
        if flag in TRUE_VALUES:
            val = True
        elif flag in FALSE_VALUES:
            val = False
        else:
            raise DataError(f"{where}: is_val must be True/False or 1/0, got {is_val!r}")
        path = (root / image_id).resolve()
        if not path.is_relative_to(root):
            raise DataError(f"{where}: image_id {image_id} leaves the image folder {root}")
        if not (image_id in present or path.is_file()):
            raise DataError(f"{where}: image {path} does not exist")
        rows.append((str(path), label, val, where))

    classes = list(classes) if classes is not None else _sorted_labels(canonical_label(r[1]) for r in rows)
    index = _class_index(classes)
    train, val = [], []
    for path, label, is_val, where in rows:
        key = label if label in index else canonical_label(label)
        if key not in index:
            raise DataError(f"{where}: label {label!r} is not a known class ({_preview(classes)})")
        (val if is_val else train).append((path, index[key]))
    _check_not_empty(train, val, csv_path)
    return Split(train, val, classes, str(csv_path))


def _default_image_dir(csv_path: Path) -> Path:
    beside = csv_path.parent
    for name in ("images", "train_images", "train"):
        if (beside / name).is_dir():
            return beside / name
    return beside


def read_image_folder(root: Path, classes: list[str] | None = None) -> Split:
    root = Path(root)
    found = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    classes = list(classes) if classes is not None else found
    if not classes:
        raise DataError(f"{root / 'train'}: no class folders")
    index = {name: i for i, name in enumerate(classes)}
    parts = {}
    for part in ("train", "val"):
        samples = []
        for class_dir in sorted(p for p in (root / part).iterdir() if p.is_dir()):
            if class_dir.name not in index:
                raise DataError(f"{class_dir}: class {class_dir.name!r} is not a known class ({_preview(classes)})")
            for dirpath, _, files in os.walk(class_dir, followlinks=True):
                for fname in sorted(files):
                    if Path(fname).suffix.lower() in IMAGE_EXTENSIONS:
                        samples.append((os.path.join(dirpath, fname), index[class_dir.name]))
        parts[part] = sorted(samples)
    _check_not_empty(parts["train"], parts["val"], root)
    return Split(parts["train"], parts["val"], classes, str(root))


def _check_not_empty(train, val, source) -> None:
    for name, part in (("validation", val), ("training", train)):
        if not part:
            raise DataError(f"{source}: the {name} split is empty")


def _preview(classes: list[str], n: int = 8) -> str:
    shown = ", ".join(classes[:n])
    return f"known: {shown}{', ...' if len(classes) > n else ''}"


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


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) samples -> (tensor, label).

    With `seed`, each sample's random augmentation is seeded from (seed, epoch, index),
    so it does not depend on worker count, process count or where a run was resumed.
    The epoch comes with the index: `dataset[(epoch, i)]`, as EpochSampler yields them, so
    that workers kept from one epoch to the next (persistent_workers) seed each sample from
    the epoch the main process hands them, not from a copy of the dataset made when they
    started. A plain index means epoch 0. With `skip_bad`, an undecodable image yields None,
    which `collate_skipping` drops and counts."""

    def __init__(self, samples, transform, skip_bad: bool = False, seed: int | None = None):
        self.samples = samples
        self.transform = transform
        self.skip_bad = skip_bad
        self.seed = seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        path, label = self.samples[i]
        if self.seed is not None:
            # only the CPU generator: torchvision's transforms and fixres's decoders draw from it
            torch.random.default_generator.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
        try:
            if getattr(self.transform, "takes_path", False):  # decodes the file itself (DecodeRandomResizedCrop)
                return self.transform(path), label
            img = open_image(path)
        except BadImageError:
            if self.skip_bad:
                return None
            raise
        return self.transform(img), label


def collate_skipping(batch):
    """Default collation over the decodable samples, plus how many were skipped. Samples of
    a type with a `collate` (fixres.device_decode.DeviceSample: file bytes to decode on the
    device) collate themselves."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    collate_own = getattr(type(good[0][0]), "collate", None)
    if collate_own is not None:
        return collate_own([image for image, _ in good]), torch.tensor([label for _, label in good]), skipped
    images, labels = torch.utils.data.default_collate(good)
    return images, labels, skipped


class EpochSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): every rank draws the same one
    (Accelerate then gives each rank its own batches), and a resumed run redraws it.
    Yields (epoch, index) pairs for ImageDataset: the epoch travels with each index to the
    loader workers, which may have started in an earlier epoch. `order()` is the bare
    permutation."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in self.order())


# Batches each loader worker keeps ready ahead of the training step (DataLoader's
# prefetch_factor): PyTorch's default; docs/benchmarks.md compares 4
PREFETCH_BATCHES = 2


class MultiSizeDataset(torch.utils.data.Dataset):
    """(path, label) samples -> ([one tensor per transform], label) from a single decode."""

    def __init__(self, samples, transforms):
        self.samples, self.transforms = samples, transforms

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = open_image(path)  # the only decode of this image in a sweep (tests count the calls)
        return [transform(img) for transform in self.transforms], label


def loader_options(workers: int, *, persistent: bool = True, prefetch: int = PREFETCH_BATCHES) -> dict:
    """DataLoader keyword arguments for `workers` worker processes. `persistent`: the workers
    stay from one pass over the loader to the next (each epoch's training and evaluation)
    instead of being started again, which costs a process start and the first batches'
    wait per pass; loaders read once (the sweep) gain nothing from it."""
    if workers == 0:
        return {"num_workers": 0}
    return {"num_workers": workers, "persistent_workers": persistent, "prefetch_factor": prefetch}


def round_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This process's batch of every round over range(n): round k is batches k*world .. k*world +
    world - 1, and batch b goes to process b mod world. No index is repeated or dropped, so
    the last round may leave a process a partial or an empty batch; every process has
    ceil(n / (batch_size * world)) rounds, and a round holds the same images whatever `world`
    is for the same batch_size * world."""
    rounds = math.ceil(n / (batch_size * world))
    starts = ((k * world + rank) * batch_size for k in range(rounds))
    return [list(range(min(start, n), min(start + batch_size, n))) for start in starts]


def shard_indices(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """This process's samples: whole batches b = rank, rank + world, ... of range(n)."""
    return [i for batch in round_batches(n, batch_size, rank, world) for i in batch]


def worker_count(requested: int | None = None) -> int:
    """Loader workers per process, the one rule of train.py, sweep.py and finetune.py:
    `requested` (--workers) when given; else the cores this process may use, shared among the
    processes of this node (torchrun and accelerate set LOCAL_WORLD_SIZE), less one
    core for the process itself, at most 16 (docs/benchmarks.md: the fast decoder's rate up to 16)."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(16, cores // max(1, local_processes) - 1))


def build_loaders(split, cfg, *, train_tf, eval_tf, workers: int, pin_memory: bool,
                  persistent: bool = True, prefetch: int = PREFETCH_BATCHES):
    """The training and validation loaders. Their workers stay from epoch to epoch
    (`persistent`; benchmarks/speed/speed.py --parts epochs measures it against re-created ones):
    the training epoch reaches them with each index (EpochSampler)."""
    common = dict(collate_fn=collate_skipping, pin_memory=pin_memory,
                  **loader_options(workers, persistent=persistent, prefetch=prefetch))
    train_loader = torch.utils.data.DataLoader(
        ImageDataset(split.train, train_tf, cfg.skip_bad_images, seed=cfg.seed), batch_size=cfg.batch_size,
        sampler=EpochSampler(len(split.train), cfg.seed), drop_last=True, **common)
    val_loader = torch.utils.data.DataLoader(
        ImageDataset(split.val, eval_tf, cfg.skip_bad_images), batch_size=2 * cfg.batch_size,
        shuffle=False, **common)
    return train_loader, val_loader


def resolve_data(cfg, accelerator, resumed_from: Path | None = None) -> tuple:
    """(config, data path, image folder, short name). Without --data, the built-in dataset,
    generated on first use and recorded in the config (`shapes`): the one a resumed run recorded,
    else the current version's with --seed. `resumed_from`: the folder of the run resumed; one
    that recorded none is refused (built_in_dataset)."""
    if cfg.data:
        return cfg, cfg.data, cfg.images, Path(cfg.data).stem or "data"
    from fixres import shapes
    if cfg.shapes is None and resumed_from is None:
        params = shapes.builtin_params(cfg.seed)  # --seed draws the images too: seeds are independent replications
        with accelerator.local_main_process_first():
            csv = shapes.ensure_shapes(**params)
    else:
        where = Path(resumed_from) / "config.json" if resumed_from else "the config's shapes"
        params, csv = built_in_dataset(cfg.shapes, where, accelerator, seed=cfg.seed,
                                       remedy='set its "data" to')  # a resumed run's --data cannot be given
    return dataclasses.replace(cfg, shapes={**params, "csv": str(csv)}), str(csv), None, "shapes"


def built_in_dataset(record: dict | None, config_path: Path | str, accelerator, *, seed: int, remedy: str) -> tuple[dict, Path]:
    """(parameters, CSV) of the built-in dataset a run recorded in its config (`shapes`),
    generated again where it is gone. A run that recorded none (written before fixres did: its
    images were version 2's or 3's) or a version this code no longer renders is refused, naming
    its `config_path`; `remedy` says how to name the CSV instead ("give --data with")."""
    from fixres import shapes
    if record is None:  # runs record it since version 3: one without a record had version 2's or 3's images
        candidates = " or ".join(f"{shapes.cache_root(shapes.builtin_params(seed, version)) / 'labels.csv'} "
                                 f"(version {version})" for version in (3, 2))
        raise ConfigError(f"{config_path}: the run used the built-in data, but predates fixres recording which "
                          f"version (2 and 3 differ): {remedy} the CSV it was trained on, {candidates}")
    params = {key: value for key, value in record.items() if key != "csv"}
    if params.get("version") not in shapes.VERSION_FRAMING:
        older = ", ".join(str(v) for v in sorted(shapes.VERSION_FRAMING, reverse=True) if v != shapes.VERSION)
        raise ConfigError(f"{config_path}: the run was trained on version {params.get('version')} of the built-in "
                          f"data, which this fixres cannot generate (it makes version {shapes.VERSION}, and {older}): "
                          f"{remedy} the CSV of its images")
    try:
        params = shapes.dataset_params(**params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{config_path}: shapes: {error_reason(err)}") from None
    with accelerator.local_main_process_first():
        return params, shapes.locate(params, record.get("csv"))
