"""Built-in procedural dataset: coloured shapes on textured backgrounds.

Used when ``train.py`` is run without data. Images are rendered from a seed, written
as JPEGs plus a Cassava-layout CSV (``image_id,label,is_val``) so they go through the
same loading code as user data. Objects are framed as in photographs (diameter about
55% of the shorter side, log-normal): RandomResizedCrop zooms in on them in training and
the centre crop does not at test, the discrepancy FixRes corrects (docs/shapes-lab.md).

    python -m fixres.shapes --out /tmp/shapes                     # 4000 + 3000 at 128x128
    python -m fixres.shapes --out /tmp/big --size 500x375 --n-train 200 --n-val 50
    python -m fixres.shapes --out /tmp/v2 --version 2 --n-val 1000         # a run of version 2's images
    python -c "from fixres.shapes import ensure_shapes; print(ensure_shapes())"
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# circle/ring and square/cross differ in detail that small objects lose, so resolution matters.
CLASS_NAMES: tuple[str, ...] = ("circle", "ring", "square", "cross", "triangle", "star")

# Bump whenever rendering changes, and keep the older versions renderable (VERSION_FRAMING):
# a run records the version it was trained on, and is evaluated and resumed on it.
VERSION = 3
# The versions this code renders, and their one difference: how the object is framed.
# Version 2 (before commit 58dbe0e) drew the diameter uniformly; version 3 frames as photos do.
VERSION_FRAMING = {2: "uniform", 3: "photo"}
_MARKER = "shapes.json"
_CSV = "labels.csv"
# Leading tags keep the two seed streams apart (SeedSequence([s]) == SeedSequence([s, 0])).
_TAG_LABELS, _TAG_IMAGE = 0x5EED1, 0x5EED2
# Object diameter as a fraction of the shorter side. "uniform" (version 2): any size in
# [0.25, 0.85]. "photo": a typical framing, log-normal around 0.55 (clipped to [0.3, 0.9]),
# as photographers frame a subject; RandomResizedCrop then zooms it beyond that framing.
FRAMINGS = ("photo", "uniform")
_UNIFORM_DIAM = (0.25, 0.85)
_PHOTO_MEDIAN, _PHOTO_LOG_SPREAD, _PHOTO_CLIP = 0.55, 0.2, (0.3, 0.9)
# The object's colour: the first of up to _COLOUR_TRIES random colours whose mean channel
# distance from the background under it reaches _COLOUR_GAP, else the most distant one.
_COLOUR_TRIES, _COLOUR_GAP = 10, 70


def draw_diameter(rng: np.random.Generator, framing: str) -> float:
    if framing == "uniform":
        return float(rng.uniform(*_UNIFORM_DIAM))
    if framing == "photo":
        return float(np.clip(_PHOTO_MEDIAN * np.exp(rng.normal(0, _PHOTO_LOG_SPREAD)), *_PHOTO_CLIP))
    raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, got {framing!r}")


def _linear_ramp(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Ramp in [0, 1] along a random direction."""
    theta = rng.uniform(0, 2 * np.pi)
    cx, cy = np.cos(theta), np.sin(theta)
    # Extremes of a linear function sit at the corners, so normalise without a full min/max pass.
    lo = min(0.0, cx * (w - 1)) + min(0.0, cy * (h - 1))
    span = max(abs(cx) * (w - 1) + abs(cy) * (h - 1), 1e-6)
    gx = ((np.arange(w, dtype=np.float32) * cx - lo) / span).astype(np.float32)
    gy = (np.arange(h, dtype=np.float32) * cy / span).astype(np.float32)
    return gy[:, None] + gx[None, :]


def _background(rng: np.random.Generator, h: int, w: int) -> list[np.ndarray]:
    """Three float32 planes. Work is done plane by plane because 3-channel float temporaries
    cross malloc's mmap threshold and every fresh allocation then pays page faults (~3x slower)."""
    c1, c2 = rng.uniform(0, 255, (2, 3))
    ramp = _linear_ramp(rng, h, w)
    # Low-frequency colour blobs: a tiny random grid upsampled bicubically is far cheaper
    # than filtering full-size noise.
    gh, gw = rng.integers(2, 7, 2)
    grid = Image.fromarray(rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8))
    blobs = grid.resize((w, h), Image.BICUBIC).split()
    mix = rng.uniform(0.0, 0.45)
    stripes = None
    if rng.random() < 0.25:  # straight edges that belong to no shape
        freq = rng.uniform(3, 12) * 2 * np.pi / min(h, w)
        phase = _linear_ramp(rng, h, w) * np.float32(max(h, w) * freq) + np.float32(rng.uniform(0, 7))
        stripes = np.sin(phase) * np.float32(rng.uniform(8, 30))
    planes = []
    for c in range(3):
        p = ramp * np.float32((c2[c] - c1[c]) * (1 - mix))
        p += np.float32(c1[c] * (1 - mix))
        p += np.asarray(blobs[c], dtype=np.float32) * np.float32(mix)
        if stripes is not None:
            p += stripes
        planes.append(p)
    return planes


def _shape_polygon(label: int, cx: float, cy: float, r: float, rot: float, rng) -> list:
    name = CLASS_NAMES[label]
    if name == "cross":
        t = r * rng.uniform(0.28, 0.38)  # half the arm width
        x = np.array([t, t, r, r, t, t, -t, -t, -r, -r, -t, -t])
        y = np.array([r, t, t, -t, -t, -r, -r, -t, -t, t, t, r])
        c, s = np.cos(rot), np.sin(rot)
        return list(zip((cx + x * c - y * s).tolist(), (cy + x * s + y * c).tolist()))
    if name == "star":
        k, radii = 10, np.tile([r, r * rng.uniform(0.4, 0.55)], 5)
    else:
        k = {"square": 4, "triangle": 3}[name]
        radii = np.full(k, r)
    ang = rot + np.arange(k) * (2 * np.pi / k)
    return list(zip((cx + radii * np.cos(ang)).tolist(), (cy + radii * np.sin(ang)).tolist()))


def _mask(w: int, h: int, draw_fn) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """Alpha in [0, 1] cropped to its bounding box (small objects are cheap), drawn at 2x and
    box-downsampled for anti-aliased edges. None if nothing landed in the frame."""
    m = Image.new("L", (2 * w, 2 * h), 0)
    draw_fn(ImageDraw.Draw(m))
    m = m.reduce(2)
    box = m.getbbox()
    if box is None:
        return None
    alpha = np.asarray(m.crop(box), dtype=np.float32) * np.float32(1 / 255)
    return alpha, (slice(box[1], box[3]), slice(box[0], box[2]))


def _paint(planes: list[np.ndarray], mask, colour, rng) -> None:
    if mask is None:
        return
    alpha, box = mask
    # A mild gradient on the fill keeps objects from being flat colour patches.
    shade = _linear_ramp(rng, *alpha.shape) * np.float32(rng.uniform(-25, 25))
    shade *= alpha
    keep = 1 - alpha
    for c, p in enumerate(planes):
        p[box] *= keep
        p[box] += alpha * np.float32(colour[c])
        p[box] += shade


def _distractor(rng, w: int, h: int, short: int):
    """Elongated ellipse or thick stroke: clutter that is not one of the classes."""
    length = rng.uniform(0.08, 0.22) * short * 2  # doubled: masks are drawn at 2x
    cx, cy = rng.uniform(0, 2 * w), rng.uniform(0, 2 * h)
    rot, aspect = rng.uniform(0, np.pi), rng.uniform(0.2, 0.4)
    if rng.random() < 0.5:
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        x, y = length / 2 * np.cos(t), length / 2 * aspect * np.sin(t)
        pts = list(zip((cx + x * np.cos(rot) - y * np.sin(rot)).tolist(),
                       (cy + x * np.sin(rot) + y * np.cos(rot)).tolist()))
        return lambda d: d.polygon(pts, fill=255)
    dx, dy = length / 2 * np.cos(rot), length / 2 * np.sin(rot)
    width = max(2, int(length * aspect * 0.6))
    return lambda d: d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=width)


def render_image(rng: np.random.Generator, label: int, width: int, height: int,
                 framing: str = "photo") -> Image.Image:
    """One RGB image containing a single object of class ``CLASS_NAMES[label]``."""
    if not 0 <= label < len(CLASS_NAMES):  # a negative index would silently pick another class
        raise ValueError(f"label must be in [0, {len(CLASS_NAMES)}), got {label}")
    w, h, short = width, height, min(width, height)
    img = _background(rng, h, w)
    for _ in range(int(rng.random() < 0.3)):
        _paint(img, _mask(w, h, _distractor(rng, w, h, short)), rng.uniform(0, 255, 3), rng)
    r = draw_diameter(rng, framing) * short / 2
    # Centre-biased like photos (random crops then rarely lose the object), but the centre may
    # sit up to 0.25 r from the border, so big objects can leave the frame a bit.
    off = np.clip(rng.normal(0, 0.5, 2), -1, 1)
    cx = w / 2 + off[0] * max(w / 2 - 0.75 * r, 0)
    cy = h / 2 + off[1] * max(h / 2 - 0.75 * r, 0)
    rot = rng.uniform(0, 2 * np.pi)
    name = CLASS_NAMES[label]
    if name in ("circle", "ring"):
        inner = rng.uniform(0.45, 0.65) * r

        def draw(d):
            d.ellipse([2 * (cx - r), 2 * (cy - r), 2 * (cx + r), 2 * (cy + r)], fill=255)
            if name == "ring":
                d.ellipse([2 * (cx - inner), 2 * (cy - inner),
                           2 * (cx + inner), 2 * (cy + inner)], fill=0)
    else:
        pts = [(2 * x, 2 * y) for x, y in _shape_polygon(label, cx, cy, r, rot, rng)]

        def draw(d):
            d.polygon(pts, fill=255)
    mask = _mask(w, h, draw)
    # Keep the object visible against the background, but only moderately so.
    if mask is None:  # cannot happen with the centre ranges above; kept for safety
        bg_mean = np.array([p.mean() for p in img])
    else:
        alpha, box = mask
        bg_mean = np.array([(p[box] * alpha).sum() for p in img]) / max(float(alpha.sum()), 1.0)
    best, best_gap = None, -1.0
    for _ in range(_COLOUR_TRIES):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        gap = float(np.abs(colour - bg_mean).mean())
        if gap > best_gap:
            best, best_gap = colour, gap
        if gap >= _COLOUR_GAP:
            break
    _paint(img, mask, best, rng)
    # Uniform noise (std matched to sigma) is ~4x cheaper to draw than Gaussian.
    amp = np.float32(rng.uniform(2, 6) * 12**0.5)
    out = []
    for p in img:
        noise = rng.random(p.shape, dtype=np.float32)
        p += (noise - 0.5) * amp
        out.append(Image.fromarray(np.clip(p, 0, 255, out=p).astype(np.uint8)))
    return Image.merge("RGB", out)


def _is_complete(root: Path, params: dict) -> bool:
    try:
        ok = json.loads((root / _MARKER).read_text()) == params
    except (OSError, ValueError):
        return False
    return ok and (root / _CSV).is_file()


def _build(out: Path, params: dict) -> None:
    n_train, n_val, seed = params["n_train"], params["n_val"], params["seed"]
    k = len(CLASS_NAMES)
    lab_rng = np.random.default_rng([_TAG_LABELS, seed])
    # Round-robin then shuffle within each split: exact balance, random order.
    labels = np.concatenate([lab_rng.permutation(np.arange(n) % k) for n in (n_train, n_val)])
    (out / "images").mkdir(parents=True)
    rows = []
    for i, label in enumerate(labels.tolist()):
        name = f"{i:06d}.jpg"
        img = render_image(np.random.default_rng([_TAG_IMAGE, seed, i]), label, params["width"],
                           params["height"], params.get("framing", VERSION_FRAMING[params["version"]]))
        img.save(out / "images" / name, "JPEG", quality=params["quality"])
        rows.append((name, CLASS_NAMES[label], str(i >= n_train)))
    with open(out / _CSV, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("image_id", "label", "is_val"))
        writer.writerows(rows)
    # Marker last: its presence is what says the folder is complete.
    (out / _MARKER).write_text(json.dumps(params, indent=1) + "\n")


def dataset_params(*, version: int = VERSION, n_train: int, n_val: int, width: int, height: int, seed: int,
                   quality: int, framing: str | None = None) -> dict:
    """Everything a dataset's images depend on, as its shapes.json holds them (framing: the
    version's own when None). Version 2's has no framing, as version 2 wrote it: a folder it
    cached is then used as it is."""
    if version not in VERSION_FRAMING:
        raise ValueError(f"this generator renders versions {', '.join(map(str, VERSION_FRAMING))}, "
                         f"not version {version}")
    framing = framing or VERSION_FRAMING[version]
    if version == 2 and framing != "uniform":
        raise ValueError(f"version 2 has the uniform framing only, not {framing!r}")
    params = {"version": version, "n_train": n_train, "n_val": n_val, "width": width, "height": height,
              "seed": seed, "quality": quality}
    return params if version == 2 else {**params, "framing": framing}


def generate(root: Path, *, n_train: int = 4000, n_val: int = 1000, width: int = 128,
             height: int = 128, seed: int = 0, quality: int = 90, framing: str | None = None,
             version: int = VERSION) -> Path:
    """Write ``root/images/*.jpg`` and ``root/labels.csv`` (reusing a matching one); return the CSV."""
    root = Path(root)
    params = dataset_params(version=version, n_train=n_train, n_val=n_val, width=width, height=height,
                            seed=seed, quality=quality, framing=framing)
    if _is_complete(root, params):
        return root / _CSV

    def replaceable() -> bool:  # never delete a folder we did not make
        return not root.exists() or (root / _MARKER).exists() or not any(root.iterdir())

    if not replaceable():
        raise FileExistsError(f"{root} exists and is not a fixres shapes dataset")
    root.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.with_name(f".{root.name}.tmp-{tag}")
    old = root.with_name(f".{root.name}.old-{tag}")
    try:
        _build(tmp, params)
        if _is_complete(root, params):  # a concurrent run finished first
            return root / _CSV
        if root.exists() and replaceable():
            os.rename(root, old)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root, params):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return root / _CSV


def default_cache_dir() -> Path:
    env = os.environ.get("FIXRES_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fixres"


def builtin_params(seed: int, version: int = VERSION) -> dict:
    """The dataset train.py generates without --data at `version`, with --seed `seed`: a run
    records these (fixres.data.resolve_data). Version 2 drew every run's images with seed 0 and
    had 1,000 validation images."""
    if version == 2:
        return dataset_params(version=2, n_train=4000, n_val=1000, width=128, height=128, seed=0, quality=90)
    return dataset_params(version=version, n_train=4000, n_val=3000, width=128, height=128, seed=seed, quality=90)


def cache_root(params: dict, cache_dir: Path | None = None) -> Path:
    """The cache folder of a dataset: named by its parameters and version, so that runs of an
    older version keep their own images (version 2's by its parameters alone, as it named them)."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    version = "" if params["version"] == 2 else f"v{params['version']}-"
    framing = params.get("framing", "uniform")
    other = "" if framing == VERSION_FRAMING[params["version"]] else f"-{framing}"
    return base / (f"shapes-{version}{params['width']}x{params['height']}-{params['n_train']}-"
                   f"{params['n_val']}-s{params['seed']}{other}")


def ensure_shapes(*, n_train: int = 4000, n_val: int = 3000, width: int = 128, height: int = 128,
                  seed: int = 0, quality: int = 90, framing: str | None = None, version: int = VERSION,
                  cache_dir: Path | None = None) -> Path:
    """CSV path of the cached shapes dataset with these parameters, generating it on first use."""
    params = dataset_params(version=version, n_train=n_train, n_val=n_val, width=width, height=height, seed=seed,
                            quality=quality, framing=framing)
    return generate(cache_root(params, cache_dir), **params)


def locate(params: dict, csv: str | None = None) -> Path:
    """CSV path of the dataset with these parameters (shapes.json's): `csv` (where a run read
    it) while it still holds exactly that dataset, else the cache's, generated when missing."""
    if csv and _is_complete(Path(csv).parent, params):
        return Path(csv)
    return ensure_shapes(**params)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fixres.shapes", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-val", type=int, default=3000)
    p.add_argument("--size", type=_parse_size, default=(128, 128), help="WIDTHxHEIGHT, e.g. 500x375")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--framing", choices=FRAMINGS, help="object size distribution (default: the version's)")
    p.add_argument("--version", type=int, choices=sorted(VERSION_FRAMING), default=VERSION,
                   help="the dataset's version (an older one: for runs trained on it)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = generate(a.out, n_train=a.n_train, n_val=a.n_val, width=a.size[0], height=a.size[1],
                        seed=a.seed, quality=a.quality, framing=a.framing, version=a.version)
    except ValueError as err:  # version 2 with --framing photo
        p.error(str(err))
    print(path)
    print(f"{a.n_train + a.n_val} images in {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
