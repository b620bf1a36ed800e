"""Data: the two layouts users already have, read into the split a run trains and reports on.

Layouts, detected from `--data`:
  1. CSV split (the Cassava blog post's): `image_id,label,is_val` rows, images in
     `--images` (default: the CSV's folder, or its `images/` subfolder);
  2. ImageFolder: `root/train/<class>/*` and `root/val/<class>/*`.

    from fixres.data import load_split
    split = load_split("data/train.csv")        # -> Split(train, val, classes)

Every problem that can be known before training (missing column, missing image,
unknown label, empty validation split, ...) raises `DataError` with one line
naming the file and row. Without --data, a run uses the built-in dataset
(fixres/shapes.py): `resolve_data` and `built_in_dataset` say which, and where its CSV is.

Reading the images is fixres/images.py's (open_image; an undecodable one raises
`BadImageError`, a DataError, with the path); the datasets and loaders that feed them
to a model are fixres/loaders.py's.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from fixres.config import ConfigError
from fixres.runtime import error_reason

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
TRUE_VALUES = {"true", "1", "yes", "t", "y"}
FALSE_VALUES = {"false", "0", "no", "f", "n"}


class DataError(ValueError):
    """Bad dataset layout or content; the message names the file and row."""


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
