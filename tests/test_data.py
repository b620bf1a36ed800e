"""Both data layouts, their one-line errors, and image decoding of real-world files."""
import io
import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from fixres.config import TrainConfig
from fixres.data import DataError, load_split
from fixres.fileio import save_weights
from fixres.images import BadImageError, open_image
from fixres.loaders import EpochSampler, ImageDataset, collate_skipping, worker_count
from fixres.preprocessing import weights_meta
from fixres.shapes import CLASS_NAMES, generate
from tests.conftest import error_line, make_csv_dataset, run_in_process
from tests.test_shapes import V2_TINY, V2_TINY_FOLDER, V2_TINY_SHA256, tree_sha256


def write_csv(tmp_path, text, images=("a.jpg", "b.jpg", "c.jpg")):
    (tmp_path / "images").mkdir(exist_ok=True)
    for name in images:
        Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / name)
    path = tmp_path / "split.csv"
    path.write_text(text)
    return path


def test_csv_layout_reads_both_splits(tiny_csv):
    split = load_split(tiny_csv)
    assert split.classes == ["blue", "green", "red"]
    assert len(split.train) == 60 and len(split.val) == 25
    path, label = split.val[0]
    assert path.endswith("0060.jpg") and split.classes[label] == "red"


def test_csv_integer_labels_and_flag_spellings(tmp_path):
    csv = write_csv(tmp_path, "image_id,label,is_val\na.jpg,0,False\nb.jpg,1,1\nc.jpg,10,true\n")
    split = load_split(csv)
    assert split.classes == ["0", "1", "10"]  # numeric order, not string order
    assert split.train == [(str((tmp_path / "images" / "a.jpg").resolve()), 0)]
    assert [label for _, label in split.val] == [1, 2]


def test_integer_labels_written_two_ways_are_one_class(tmp_path):
    names = [f"{i}.jpg" for i in range(6)]
    labels = ["3", "3.0", "1", "1", "3", "1.0"]
    rows = "".join(f"{name},{label},{i >= 4}\n" for i, (name, label) in enumerate(zip(names, labels)))
    csv = write_csv(tmp_path, "image_id,label,is_val\n" + rows, images=names)
    split = load_split(csv)
    assert split.classes == ["1", "3"]
    assert [split.classes[label] for _, label in split.train + split.val] == ["3", "3", "1", "1", "3", "1"]
    assert load_split(csv, classes=["1", "3"]).classes == ["1", "3"]  # a trained run's class list
    # "03" is 3 as well; 3.5 is not an integer, so it stays a name, as do non-numeric labels
    csv.write_text("image_id,label,is_val\n0.jpg,03,0\n1.jpg,3.5,0\n2.jpg,x,0\n3.jpg,3,1\n")
    assert load_split(csv).classes == ["3", "3.5", "x"]


def test_csv_with_byte_order_mark(tmp_path):
    csv = write_csv(tmp_path, "\ufeffimage_id,label,is_val\na.jpg,x,0\nb.jpg,y,1\n")
    assert load_split(csv).classes == ["x", "y"]


def test_fixed_class_list_keeps_training_order(tiny_csv):
    split = load_split(tiny_csv, classes=["red", "green", "blue"])
    assert split.classes[split.val[0][1]] == "red" and split.val[0][1] == 0


@pytest.mark.parametrize("text, message", [
    ("image_id,label\na.jpg,x\n", "missing column(s) is_val"),
    ("image_id,label,is_val\na.jpg,x,0\nmissing.jpg,x,1\n", "row 3: image"),
    ("image_id,label,is_val\na.jpg,x,0\n../b.jpg,x,1\n", "row 3: image_id ../b.jpg leaves the image folder"),
    ("image_id,label,is_val\na.jpg,x,0\nb.jpg,x,maybe\n", "row 3: is_val must be"),
    ("image_id,label,is_val\na.jpg,x,0\na.jpg,x,1\n", "row 3: duplicate image_id a.jpg"),
    ("image_id,label,is_val\na.jpg,,0\n", "row 2: missing label"),
    ("image_id,label,is_val\na.jpg,x,0\nb.jpg,x,0\n", "the validation split is empty"),
])
def test_csv_errors_name_file_and_row(tmp_path, text, message):
    csv = write_csv(tmp_path, text)
    with pytest.raises(DataError) as err:
        load_split(csv)
    assert message in str(err.value) and str(csv) in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_label_for_a_trained_class_list(tmp_path):
    csv = write_csv(tmp_path, "image_id,label,is_val\na.jpg,cat,0\nb.jpg,dog,1\n")
    with pytest.raises(DataError, match=r"row 3: label 'dog' is not a known class"):
        load_split(csv, classes=["cat"])


def test_image_folder_layout(tiny_folder):
    split = load_split(tiny_folder)
    assert split.classes == ["blue", "green", "red"]
    assert len(split.train) == 18 and len(split.val) == 6


def test_image_folder_unknown_val_class(tiny_folder, tmp_path):
    with pytest.raises(DataError, match="is not a known class"):
        load_split(tiny_folder, classes=["blue", "green"])


def test_missing_data_path():
    with pytest.raises(DataError, match="--data /nope: no such"):
        load_split("/nope")


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
                                       ("I;16", "PNG"), ("LA", "PNG")])
def test_any_mode_becomes_rgb(tmp_path, mode, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    Image.new(mode, (10, 6)).save(path, fmt)
    img = open_image(str(path))
    assert img.mode == "RGB" and img.size == (10, 6)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)
    assert abs(np.asarray(open_image(str(path)))[0, 0, 0] - 127) <= 1


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), "white")
    img.paste((255, 0, 0), (0, 0, 4, 10))  # a red left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    upright = np.asarray(open_image(str(path))).astype(int)
    assert upright.shape == (20, 10, 3)
    # turned clockwise, not anticlockwise: the left edge is now the top
    assert upright[0, :, 0].min() > 200 and upright[0, :, 1].max() < 60 and upright[-1, :, 1].min() > 200


@pytest.mark.parametrize("content", [b"", b"this is text, not a JPEG\n", "truncated"])
def test_undecodable_files_name_the_path(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        content = _encode(Image.new("RGB", (64, 64), "blue"), "JPEG")[:200]
    path.write_bytes(content)
    with pytest.raises(BadImageError, match=f"cannot decode image {path}"):
        open_image(str(path))


def test_skip_bad_images_drops_and_counts(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (8, 8)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    ds = ImageDataset([(str(good), 0), (str(bad), 1)], lambda img: torch.zeros(3, 2, 2), skip_bad=True)
    images, labels, skipped = collate_skipping([ds[0], ds[1]])
    assert images.shape == (1, 3, 2, 2) and labels.tolist() == [0] and skipped == 1
    with pytest.raises(BadImageError):
        ImageDataset([(str(bad), 1)], lambda img: img)[0]


def test_sampler_order_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b) and sorted(i for _, i in a) == list(range(50))
    assert {epoch for epoch, _ in a} == {2} and [i for _, i in a] == a.order()
    b.set_epoch(3)
    assert list(a) != list(b)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    csv = make_csv_dataset(tmp_path, n_train=4, n_val=1)
    split = load_split(csv)
    draw = lambda img: torch.rand(3)  # noqa: E731  stands in for a random transform
    a, b = ImageDataset(split.train, draw, seed=1), ImageDataset(split.train, draw, seed=1)
    assert torch.equal(a[2][0], b[2][0]) and not torch.equal(a[2][0], a[3][0])
    assert torch.equal(a[2][0], a[(0, 2)][0])  # a plain index is epoch 0
    assert not torch.equal(a[(0, 2)][0], b[(1, 2)][0])


def epoch_crops(loader, accelerator, epoch: int, skip: int = 0) -> dict:
    """{sample index: crop} of one pass over a prepared training loader, as train.py runs it."""
    loader.set_epoch(epoch)
    order = loader.batch_sampler.sampler.order()  # the indices in the order the batches take them
    passed = accelerator.skip_first_batches(loader, skip) if skip else loader
    images = torch.cat([batch[0] for batch in passed])
    first = skip * loader.total_batch_size
    return dict(zip(order[first:first + len(images)], images))


def test_persistent_workers_get_each_epoch_and_match_no_workers(tiny_csv):
    """Workers kept from epoch to epoch crop epoch 2 differently from epoch 1 (the epoch
    reaches them with each index), exactly as the main process alone does, also when a
    resumed run skips the batches it had trained (Accelerate's skip_first_batches)."""
    from accelerate import Accelerator

    from fixres.config import TrainConfig
    from fixres.loaders import build_loaders
    from fixres.transforms import DecodeRandomResizedCrop, eval_transform

    split = load_split(tiny_csv)
    cfg = TrainConfig(train_res=32, batch_size=16, seed=5)
    accelerator = Accelerator(cpu=True)
    crops = {}
    for workers in (0, 2):
        loader, _ = build_loaders(split, cfg, workers=workers, pin_memory=False,
                                  train_tf=DecodeRandomResizedCrop(size=32), eval_tf=eval_transform(size=32))
        loader = accelerator.prepare(loader)
        crops[workers, 0] = epoch_crops(loader, accelerator, 0)
        started = loader.base_dataloader._iterator  # the workers of epoch 1 ...
        crops[workers, 1] = epoch_crops(loader, accelerator, 1)
        if workers:  # ... are those of epoch 2
            assert loader.base_dataloader._iterator is started and started._persistent_workers
            assert all(w.is_alive() for w in started._workers)
        crops[workers, "resumed"] = epoch_crops(loader, accelerator, 1, skip=1)
    for key in (0, 1, "resumed"):
        assert crops[0, key].keys() == crops[2, key].keys()
        assert all(torch.equal(crops[0, key][i], crops[2, key][i]) for i in crops[0, key])
    assert len(crops[0, 0]) == len(crops[0, 1]) == 48  # 60 images, batches of 16, the last one dropped
    assert len(crops[2, "resumed"]) == 32 and all(torch.equal(crops[2, "resumed"][i], crops[2, 1][i])
                                                  for i in crops[2, "resumed"])
    both = crops[2, 0].keys() & crops[2, 1].keys()
    changed = sum(not torch.equal(crops[2, 0][i], crops[2, 1][i]) for i in both)
    assert len(both) >= 30 and changed == len(both), f"{len(both) - changed} of {len(both)} crops repeat epoch 1's"


@pytest.mark.parametrize("cores, local_processes, expected", [(16, None, 15), (16, "2", 7), (64, None, 16),
                                                               (2, None, 1), (1, None, 0), (4, "8", 0)])
def test_worker_count_follows_the_cores_per_process(monkeypatch, cores, local_processes, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local_processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
    assert worker_count() == expected
    assert worker_count(3) == 3 and worker_count(0) == 0  # --workers wins


# The built-in dataset's version: a run is evaluated, fine-tuned and resumed on the images it was
# trained on (version 2's, which differ from version 3's), or refused.

@pytest.fixture
def cache(tmp_path, monkeypatch):
    """$FIXRES_CACHE, holding train.py's dataset of version 3 (seed 0), as after any run of it; a
    few images of 32 px stand in for its 7,000 of 128 px (a minute to generate)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FIXRES_CACHE", str(cache))
    csv = generate(cache / "shapes-v3-128x128-4000-3000-s0", n_train=6, n_val=6, width=32, height=32)
    (csv.parent / "shapes.json").write_text(json.dumps(
        {"version": 3, "n_train": 4000, "n_val": 3000, "width": 128, "height": 128, "seed": 0, "quality": 90,
         "framing": "photo"}))
    return cache


def built_in_config(config: dict, record: dict | None) -> dict:
    """A run's config as train.py writes it without --data: data null, and `record`, which
    data it used (None: no record, as a run from before fixres kept one)."""
    config = {**config, "data": None, "images": None}
    config.pop("shapes", None)
    return config if record is None else {**config, "shapes": record}


def built_in_run(folder, record: dict | None):
    """A run folder of the built-in data (its weights untrained: only the data matters here)."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=len(CLASS_NAMES))
    cfg = TrainConfig(model="test_resnet", train_res=32, batch_size=4, workers=0)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(built_in_config(cfg.to_dict(), record)))
    save_weights(folder / "best.safetensors", model.state_dict(), weights_meta(cfg, list(CLASS_NAMES)))
    return folder


def test_train_records_the_built_in_data_it_used(cache, tmp_path, capsys):
    """Without --data, the run's config keeps data null and says which dataset it was: its version
    and all its images depend on, and the CSV read."""
    result = run_in_process("train.py", "--train-res", "32", "--batch-size", "4", "--workers", "0", "--epochs", "1",
                            "--output", tmp_path / "runs", "--name", "run", capsys=capsys)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "runs" / "run" / "config.json").read_text())
    assert config["data"] is None
    assert config["shapes"] == {"version": 3, "n_train": 4000, "n_val": 3000, "width": 128, "height": 128, "seed": 0,
                                "quality": 90, "framing": "photo",
                                "csv": str(cache / "shapes-v3-128x128-4000-3000-s0" / "labels.csv")}


def test_sweep_uses_the_recorded_version_2(cache, tmp_path, capsys):
    """A run recorded as trained on version 2 (its CSV since deleted) is swept (and fine-tuned,
    below) on version 2's images, generated again, not on the cached version 3's."""
    run = built_in_run(tmp_path / "run", {**V2_TINY, "csv": str(tmp_path / "gone" / V2_TINY_FOLDER / "labels.csv")})
    v2_csv = cache / V2_TINY_FOLDER / "labels.csv"
    swept = run_in_process("sweep.py", "--no-plots", "--checkpoint", run, "--sizes", "32", "--cpu", "--workers", "0",
                           "--speed-repeats", "1", capsys=capsys)
    assert swept.returncode == 0, swept.stderr
    assert json.loads((run / "sweep.json").read_text())["meta"]["data"] == str(v2_csv)
    assert tree_sha256(v2_csv.parent) == V2_TINY_SHA256  # version 2's images as its generator wrote them


def test_finetune_uses_the_recorded_version_2(cache, tmp_path, capsys):
    run = built_in_run(tmp_path / "run", {**V2_TINY, "csv": str(tmp_path / "gone" / V2_TINY_FOLDER / "labels.csv")})
    v2_csv = cache / V2_TINY_FOLDER / "labels.csv"
    tuned = run_in_process("finetune.py", "--no-plots", "--checkpoint", run, "--res", "32", "--method", "bn-stats", "--cpu",
                           "--workers", "0", "--output", tmp_path / "out", "--name", "bn", capsys=capsys)
    assert tuned.returncode == 0, tuned.stderr
    assert json.loads((tmp_path / "out" / "bn" / "config.json").read_text())["data"] == str(v2_csv)


def test_a_run_without_a_recorded_version_is_refused(cache, tmp_path, capsys):
    """Written before fixres recorded the version: it may be 2 or 3, so nothing is evaluated on a
    guess; the line says which CSV each would be."""
    run = built_in_run(tmp_path / "old", None)
    candidates = (f"{cache / 'shapes-v3-128x128-4000-3000-s0' / 'labels.csv'} (version 3) or "
                  f"{cache / 'shapes-128x128-4000-1000-s0' / 'labels.csv'} (version 2)")
    for script, *args in (("sweep.py", "--sizes", "32"), ("finetune.py", "--res", "32", "--method", "bn-stats")):
        result = run_in_process(script, "--checkpoint", run, *args, "--cpu", "--workers", "0", capsys=capsys)
        assert error_line(result) == (
            f"error: {run / 'config.json'}: the run used the built-in data, but predates fixres recording which "
            f"version (2 and 3 differ): give --data with the CSV it was trained on, {candidates}")
    assert sorted(p.name for p in run.iterdir()) == ["best.safetensors", "config.json"]


def test_a_version_the_generator_cannot_make_is_refused(cache, tmp_path, capsys):
    run = built_in_run(tmp_path / "v1", {**V2_TINY, "version": 1, "csv": "/gone/labels.csv"})
    result = run_in_process("sweep.py", "--checkpoint", run, "--sizes", "32", "--cpu", "--workers", "0", capsys=capsys)
    assert error_line(result) == (
        f"error: {run / 'config.json'}: the run was trained on version 1 of the built-in data, which this fixres "
        f"cannot generate (it makes version 3, and 2): give --data with the CSV of its images")


def trained_on_version_2(tmp_path, capsys, record) -> tuple:
    """One epoch of two of train.py on version 2's images (given as --data: the code before the
    fix could not make them itself), its config.json then rewritten as train.py writes it
    without --data (`record`: see built_in_config). (run folder, the CSV trained on)."""
    csv = generate(tmp_path / "v2-data", n_train=8, n_val=4, width=32, height=32, framing="uniform")
    run = tmp_path / "runs" / "run"
    first = run_in_process("train.py", "--data", csv, "--model", "test_resnet", "--train-res", "32", "--batch-size", "4",
                           "--workers", "0", "--epochs", "2", "--stop-after", "1", "--output", run.parent, "--name",
                           "run", capsys=capsys)
    assert first.returncode == 0, first.stderr
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(built_in_config(config, record)))
    return run, csv


def test_resume_continues_on_the_recorded_version_2(cache, tmp_path, capsys):
    record = {"version": 2, "n_train": 8, "n_val": 4, "width": 32, "height": 32, "seed": 0, "quality": 90}
    run, trained_on = trained_on_version_2(tmp_path, capsys, {**record, "csv": str(tmp_path / "gone.csv")})
    resumed = run_in_process("train.py", "--resume", run, capsys=capsys)
    assert resumed.returncode == 0, resumed.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["data"] is None and {k: config["shapes"][k] for k in record} == record
    used = config["shapes"]["csv"]  # generated again: the same images and split as the first epoch's
    assert used == str(cache / "shapes-32x32-8-4-s0" / "labels.csv")
    for name in ["labels.csv"] + [f"images/{i:06d}.jpg" for i in range(12)]:
        assert (cache / "shapes-32x32-8-4-s0" / name).read_bytes() == (trained_on.parent / name).read_bytes(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_count"] for r in records] == [4, 4]


def test_resume_of_a_run_without_a_recorded_version_is_refused(cache, tmp_path, capsys):
    run, _ = trained_on_version_2(tmp_path, capsys, None)
    result = run_in_process("train.py", "--resume", run, capsys=capsys)
    assert error_line(result) == (
        f"error: {run / 'config.json'}: the run used the built-in data, but predates fixres recording which version "
        f"(2 and 3 differ): set its \"data\" to the CSV it was trained on, "
        f"{cache / 'shapes-v3-128x128-4000-3000-s0' / 'labels.csv'} (version 3) or "
        f"{cache / 'shapes-128x128-4000-1000-s0' / 'labels.csv'} (version 2)")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # nothing trained on a guess
