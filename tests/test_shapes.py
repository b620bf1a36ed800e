import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixres import shapes
from fixres.shapes import CLASS_NAMES, default_cache_dir, ensure_shapes, generate, render_image

N_TRAIN, N_VAL = 24, 12


def _rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("ds") / "shapes", n_train=N_TRAIN, n_val=N_VAL)


def test_csv_layout(small):
    assert small.name == "labels.csv"
    assert small.read_text().splitlines()[0] == "image_id,label,is_val"
    rows = _rows(small)
    assert len(rows) == N_TRAIN + N_VAL
    assert {r["is_val"] for r in rows} == {"True", "False"}
    assert sum(r["is_val"] == "True" for r in rows) == N_VAL
    assert {r["label"] for r in rows} <= set(CLASS_NAMES)
    assert len({r["image_id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["image_id"].endswith(".jpg")
        assert (small.parent / "images" / r["image_id"]).is_file()


def test_classes_balanced_per_split(small):
    rows = _rows(small)
    for split, n in (("False", N_TRAIN), ("True", N_VAL)):
        counts = Counter(r["label"] for r in rows if r["is_val"] == split)
        assert set(counts) == set(CLASS_NAMES)
        assert max(counts.values()) - min(counts.values()) <= 1
        assert sum(counts.values()) == n
    # Shuffled, not a plain round-robin sequence.
    labels = [r["label"] for r in rows[:N_TRAIN]]
    assert labels != [CLASS_NAMES[i % len(CLASS_NAMES)] for i in range(N_TRAIN)]


def test_images_are_rgb_jpegs_of_requested_size(small):
    for r in _rows(small):
        with Image.open(small.parent / "images" / r["image_id"]) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (128, 128)


def test_non_square_size(tmp_path):
    csv_path = generate(tmp_path / "wide", n_train=6, n_val=6, width=100, height=60)
    for r in _rows(csv_path):
        with Image.open(csv_path.parent / "images" / r["image_id"]) as im:
            assert im.size == (100, 60) and im.mode == "RGB"
    tall = render_image(np.random.default_rng(0), 0, 40, 90)
    assert tall.size == (40, 90) and tall.mode == "RGB"


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_seed_dependent(tmp_path):
    kw = dict(n_train=12, n_val=6, width=64, height=48)
    a = _tree_bytes(generate(tmp_path / "a", seed=3, **kw).parent)
    b = _tree_bytes(generate(tmp_path / "b", seed=3, **kw).parent)
    c = _tree_bytes(generate(tmp_path / "c", seed=4, **kw).parent)
    assert a == b
    assert a.keys() == c.keys()
    differing = [k for k in a if k.startswith("images") and a[k] != c[k]]
    assert len(differing) == 18
    assert a["labels.csv"] != c["labels.csv"]


def test_image_depends_only_on_seed_and_index():
    # The same (seed, index) stream renders the same pixels, regardless of what came before.
    def img(i):
        return np.asarray(render_image(np.random.default_rng([shapes._TAG_IMAGE, 0, i]), 2, 32, 32))
    first = img(5)
    img(6)
    assert np.array_equal(first, img(5))


def test_second_call_reuses(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    csv_path = generate(root, n_train=6, n_val=6)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    calls = []
    monkeypatch.setattr(shapes, "render_image", lambda *a, **k: calls.append(a) or Image.new("RGB", (8, 8)))
    assert generate(root, n_train=6, n_val=6) == csv_path
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    # Different parameters into the same folder rebuild it (it is ours: the marker says so).
    monkeypatch.undo()
    generate(root, n_train=12, n_val=6)
    assert len(_rows(csv_path)) == 18
    assert json.loads((root / "shapes.json").read_text())["n_train"] == 12


def test_no_leftovers_and_refuses_foreign_folder(tmp_path):
    generate(tmp_path / "ds", n_train=6, n_val=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        generate(foreign, n_train=6, n_val=0)
    assert (foreign / "keep.txt").read_text() == "user data"


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "render_image", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "ds", n_train=6, n_val=0)
    assert list(tmp_path.iterdir()) == []


def _square_area_fractions(monkeypatch, framing: str, n: int = 60) -> np.ndarray:
    # The object is the last thing painted; record its alpha mask to get its area exactly.
    painted = []
    orig = shapes._paint
    monkeypatch.setattr(shapes, "_paint", lambda planes, mask, *a: painted.append(mask) or orig(planes, mask, *a))
    fracs = []
    for seed in range(n):
        painted.clear()
        render_image(np.random.default_rng(seed), CLASS_NAMES.index("square"), 96, 96, framing=framing)
        fracs.append(painted[-1][0].sum() / 96**2)
    return np.array(fracs)


def test_uniform_framing_spans_small_to_large_objects(monkeypatch):
    fracs = _square_area_fractions(monkeypatch, "uniform")
    # Diameter 25%..85% of the side: a square (area d^2/2) covers ~3%..36% of the image.
    assert fracs.min() < 0.05
    assert fracs.max() > 0.25
    assert fracs.min() > 0.003  # never vanishingly small


def test_photo_framing_has_a_typical_size(monkeypatch):
    """Photo framing: most objects near the typical diameter, a few much smaller or larger,
    none outside the clip range (a square of diameter d covers d^2/2 of the image)."""
    diameters = np.sqrt(2 * _square_area_fractions(monkeypatch, "photo", n=120))
    low, high = shapes._PHOTO_CLIP
    assert np.median(diameters) == pytest.approx(shapes._PHOTO_MEDIAN, rel=0.1)
    assert low * 0.9 < diameters.min() and diameters.max() < high * 1.05  # anti-aliased edges blur the area
    spread = np.std(np.log(diameters))
    assert 0.5 * shapes._PHOTO_LOG_SPREAD < spread < 1.5 * shapes._PHOTO_LOG_SPREAD
    # narrower than the uniform framing's: that is what gives the training crops a size to move away from
    assert spread < np.std(np.log(np.sqrt(2 * _square_area_fractions(monkeypatch, "uniform", n=120))))


def test_draw_diameter_refuses_an_unknown_framing():
    with pytest.raises(ValueError, match="framing"):
        shapes.draw_diameter(np.random.default_rng(0), "wide")


def test_ensure_shapes_uses_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FIXRES_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    monkeypatch.delenv("FIXRES_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "fixres"
    csv_path = ensure_shapes(n_train=6, n_val=6, width=32, height=24, seed=1, cache_dir=tmp_path)
    assert csv_path == tmp_path / f"shapes-v{shapes.VERSION}-32x24-6-6-s1" / "labels.csv"
    assert csv_path.is_file()
    assert ensure_shapes(n_train=6, n_val=6, width=32, height=24, seed=1, cache_dir=tmp_path) == csv_path


def test_cli(tmp_path, capsys):
    shapes.main(["--out", str(tmp_path / "cli"), "--n-train", "6", "--n-val", "6",
                 "--size", "50x30", "--seed", "2", "--quality", "80"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / "cli" / "labels.csv")
    assert lines[1].startswith("12 images in ")
    with Image.open(next((tmp_path / "cli" / "images").iterdir())) as im:
        assert im.size == (50, 30)


def test_rejects_bad_label():
    with pytest.raises(ValueError):
        render_image(np.random.default_rng(0), -1, 32, 32)
    with pytest.raises(ValueError):
        render_image(np.random.default_rng(0), len(CLASS_NAMES), 32, 32)


def tree_sha256(root: Path) -> str:
    """One hash of a dataset folder: every file's path and bytes."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# Version 2's dataset at 6 + 6 images of 32 x 32, seed 0, as version 2's own generator wrote it
# (fixres/shapes.py of commit c724bda, the last before version 3: ensure_shapes(n_train=6,
# n_val=6, width=32, height=32, cache_dir=...)): its folder name, images, labels.csv, shapes.json.
V2_TINY = {"version": 2, "n_train": 6, "n_val": 6, "width": 32, "height": 32, "seed": 0, "quality": 90}
V2_TINY_FOLDER = "shapes-32x32-6-6-s0"
V2_TINY_SHA256 = "1ceb02fbdc7c94e8862e649e9c3c226de237445a883ac3a12fb8ee50d8e29709"


def test_version_2_is_generated_as_its_own_generator_wrote_it(tmp_path):
    """A run of version 2 is evaluated on version 2's images: the same files, in the folder where
    version 2 cached them (an existing one is used as it is)."""
    csv_path = ensure_shapes(**V2_TINY, cache_dir=tmp_path)
    assert csv_path == tmp_path / V2_TINY_FOLDER / "labels.csv"
    assert tree_sha256(csv_path.parent) == V2_TINY_SHA256


def test_train_py_datasets_of_each_version():
    """What train.py generated without --data, from its code at the time: version 2 (commit c724bda)
    called ensure_shapes() whatever --seed was, 4,000 + 1,000 images; version 3, 4,000 + 3,000
    drawn with --seed, photo framing."""
    common = {"n_train": 4000, "width": 128, "height": 128, "quality": 90}
    assert shapes.builtin_params(5, version=2) == {"version": 2, **common, "n_val": 1000, "seed": 0}
    assert shapes.builtin_params(5) == {"version": 3, **common, "n_val": 3000, "seed": 5, "framing": "photo"}
    cache = Path("/cache")
    assert shapes.cache_root(shapes.builtin_params(5, version=2), cache) == cache / "shapes-128x128-4000-1000-s0"
    assert shapes.cache_root(shapes.builtin_params(5), cache) == cache / "shapes-v3-128x128-4000-3000-s5"


def test_a_version_the_generator_cannot_render_is_refused(tmp_path):
    with pytest.raises(ValueError, match="version 1"):
        ensure_shapes(**{**V2_TINY, "version": 1}, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="framing"):  # version 2 knew one framing only
        ensure_shapes(**V2_TINY, framing="photo", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
