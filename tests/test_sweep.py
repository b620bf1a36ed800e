"""sweep.py: sharding, decode-once, plots, bad input, and the same table with 1 and 2 processes.

    python -m pytest tests/test_sweep.py -q      # about a minute and a half on 2 CPU cores
"""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from fixres import device_decode
from fixres import loaders as loaders_lib
from fixres.cli import run_main
from fixres.config import ConfigError, SweepConfig
from fixres.data import load_split
from fixres.engine import evaluate
from fixres.fileio import save_weights
from fixres.loaders import ImageDataset, collate_skipping, shard_indices
from fixres.models import create_model
from fixres.resolution import default_sizes
from fixres.report import crop_grid, sweep_table
from fixres.stats import add_differences, best_of
from fixres.sweep import run_sweep, sweep_pairs
from fixres.trained_model import load_run_model
from fixres.transforms import eval_transform
from tests.conftest import run_in_process, script_main

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
N_IMAGES, N_VAL = 60, 23      # 23 validation images: batches of 4 split 12 / 11 over 2 processes
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SWEEP_MAIN = script_main("sweep.py")


@pytest.fixture(scope="session")
def data_csv(tmp_path_factory) -> Path:
    """3 classes of coloured noise, 48x40 JPEGs, in the Cassava CSV layout."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    rows = ["image_id,label,is_val"]
    for i in range(N_IMAGES):
        label = names[i % 3]
        pixels = np.clip(rng.normal(COLOURS[label], 60, size=(40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.jpg", quality=90)
        rows.append(f"{i:03d}.jpg,{label},{i >= N_IMAGES - N_VAL}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


TWO_PROCESS_SWEEPS = "test_sweep.py: the 2-process sweeps"


@pytest.fixture(scope="session")
def tiny_run(request, data_csv, tmp_path_factory, early_runs) -> Path:
    """A test_resnet run folder written by train.py itself (one epoch at 32 px). Once it is there,
    the 2-process sweeps of this file's late tests start in the background (start_two_process_sweeps)."""
    out = tmp_path_factory.mktemp("runs")
    result = run_in_process("train.py", "--data", data_csv, "--model", "test_resnet", "--train-res", "32", "--epochs", "1",
                            "--batch-size", "16", "--workers", "0", "--output", out, "--name", "tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    fixtures = {name for item in request.session.items for name in item.fixturenames}
    if fixtures & {"one_and_two", "seven_class_run"}:
        start_two_process_sweeps(early_runs, out / "tiny", tmp_path_factory)
    return out / "tiny"


@pytest.fixture(scope="session")
def tv_run(data_csv, tmp_path_factory) -> Path:
    """A torchvision resnet18 run folder built in-process (untrained weights are enough here)."""
    run = tmp_path_factory.mktemp("tvrun")
    torch.manual_seed(0)
    model = create_model("tv:resnet18", 3)
    meta = {"model": "tv:resnet18", "classes": sorted(COLOURS), "train_res": 32, "test_res": 32,
            "crop_pct": 0.875, "interpolation": "bilinear"}
    save_weights(run / "best.safetensors", model.state_dict(), meta)
    (run / "config.json").write_text(json.dumps({"data": str(data_csv), "images": None, "min_scale": 0.08}))
    torch.save(model.state_dict(), run / "plain.pth")
    return run


def table_rows(stdout: str) -> list[list[str]]:
    """The sweep table's cells (size, crop_pct, resize, top-1, vs trained, gained, lost, top-5,
    loss, images, notes), without the timing columns (forward img/s, img/s at the batch, ms at batch 1)."""
    rows = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0].isdigit() and len(cells) == 14:
            rows.append(cells[:10] + cells[13:])
    return rows


# ---- pure helpers ---------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n,batch", [(0, 4), (1, 4), (23, 4), (24, 4), (7, 1), (100, 64)])
def test_shards_cover_every_image_once_in_the_same_batches(n, batch, world):
    shards = [shard_indices(n, batch, rank, world) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    single = [list(range(n))[i:i + batch] for i in range(0, n, batch)]
    for s in shards:  # a DataLoader over a shard re-forms the single-process batches
        assert all(s[i:i + batch] in single for i in range(0, len(s), batch))


def test_default_sizes_ladder():
    assert default_sizes(64, 79) == [32, 48, 56, 64, 72, 79, 88, 96, 112, 128]
    sizes = default_sizes(224, 277)
    assert 224 in sizes and 277 in sizes and 280 not in sizes
    assert min(sizes) == 112 and max(sizes) == 448


@pytest.mark.parametrize("kwargs,named", [
    (dict(sizes=[0, 32]), "--sizes"), (dict(sizes=[-8]), "--sizes"), (dict(sizes=[4096]), "--sizes"),
    (dict(crop_pct=0.0), "--crop-pct"), (dict(crop_pct=1.5), "--crop-pct"), (dict(batch_size=0), "--batch-size"),
    (dict(crop_pcts=[0.9, 0.0]), "--crop-pcts"), (dict(crop_pcts=[1.01]), "--crop-pcts"),
    (dict(crop_pcts=[float("nan")]), "--crop-pcts"), (dict(crop_pcts=[]), "--crop-pcts"),
    (dict(weights="w.pth"), "--checkpoint"),
    (dict(checkpoint=None, weights="w.pth"), "--model"),
])
def test_config_refuses(kwargs, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        SweepConfig(**{"checkpoint": "runs/x", **kwargs})


def test_crop_pcts_once_each_in_order():
    assert SweepConfig(checkpoint="runs/x", crop_pcts=[1.0, 0.875, 1.0, 0.95]).crop_pcts == [0.875, 0.95, 1.0]
    assert sweep_pairs([48, 32], 0.875, [1.0, 0.875]) == [(48, 0.875), (48, 1.0), (32, 0.875), (32, 1.0)]
    assert sweep_pairs([32], 0.875) == [(32, 0.875)]


def test_best_pair_tie_goes_to_the_first_row_in_size_then_crop_order():
    """Two pairs equal in top-1 and loss: best_of keeps the first, the smaller crop_pct at the
    smaller size, and the grid and the table mark that one only."""
    rows = [{"size": s, "crop_pct": c, "resize": int(s / c), "top1": top1, "loss": 0.5, "top5": 1.0, "count": 10,
             "gained": 0, "lost": 0, "diff_vs_train": 0.0, "diff_low": 0.0, "diff_high": 0.0, "images_per_s": 1.0}
            for (s, c), top1 in zip(sweep_pairs([32, 40], 0.875, [1.0]), (0.5, 0.5, 0.7, 0.7))]
    best = best_of(rows)
    assert (best["size"], best["crop_pct"]) == (40, 0.875)
    console = Console(record=True, width=200)
    console.print(crop_grid(rows, train_res=32, crop_pct=0.875, best=best))
    console.print(sweep_table(rows, train_res=32, crop_pct=0.875, predicted=40, best=best))
    text = console.export_text()
    assert re.search(r"│ +40 │ +70\.00% best │ +70\.00% │", text) and text.count("% best") == 1
    assert re.search(r"│ +40 │ +0\.875 │ +45 │ .*│ predicted, best +│", text) and text.count(", best") == 1


# ---- in-process sweeps ------------------------------------------------------------------------

@pytest.mark.slow
def test_decode_once_and_same_numbers_as_train_evaluation(tiny_run, monkeypatch):
    """Each validation image is decoded once for 3 sizes, and each size scores exactly what
    train.py's evaluation scores at that size (which decodes again per size)."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    model, meta = load_run_model(tiny_run)
    assert model.training
    split = load_split(json.loads((tiny_run / "config.json").read_text())["data"], classes=meta["classes"])
    decoded = []
    real_open = loaders_lib.open_image
    monkeypatch.setattr(loaders_lib, "open_image", lambda path: decoded.append(path) or real_open(path))
    sizes = [24, 32, 40]
    rows = run_sweep(model, meta, split, sizes, 0.875, accelerator, batch_size=4, workers=0, activations=True)
    assert len(decoded) == len(split.val) == N_VAL
    assert sorted(decoded) == sorted(p for p, _ in split.val)
    assert [r["size"] for r in rows] == sizes and all(r["count"] == N_VAL for r in rows)
    assert model.training  # modes restored (a fresh model is in train mode)
    model = model.to(memory_format=torch.channels_last)  # as train.py evaluates (channels_last default)
    for row in rows:
        tf = eval_transform(size=row["size"], crop_pct=0.875)
        loader = torch.utils.data.DataLoader(ImageDataset(split.val, tf), batch_size=8, collate_fn=collate_skipping)
        ref = evaluate(model, loader, accelerator, channels_last=True)
        assert row["correct"] == round(ref["accuracy"] * ref["count"]) and row["count"] == ref["count"]
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert 0 <= row["act_zero_frac"] <= 1 and row["act_std"] > 0
        assert sum(row["act_hist"]) == N_VAL * 96  # test_resnet pools 96 features
        assert row["per_image_correct"].shape == (N_VAL,) and int(row["per_image_correct"].sum()) == row["correct"]
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # no inference tensors: finetune can still train it


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_crop_pct_sweep_equals_single_pair_sweeps_image_for_image(tiny_run, monkeypatch, decode):
    """3 sizes x 3 crop_pcts from one decode of each image; each pair scores what a sweep of
    that pair alone scores (which decodes again), image for image. gpu: the device path
    (fixres.device_decode), here on the CPU through torchcodec."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    model, meta = load_run_model(tiny_run)
    split = load_split(json.loads((tiny_run / "config.json").read_text())["data"], classes=meta["classes"])
    decoded = []
    if decode == "cpu":
        real_open = loaders_lib.open_image
        monkeypatch.setattr(loaders_lib, "open_image", lambda path: decoded.append(path) or real_open(path))
    else:
        real_decode = device_decode.torchcodec_decode_jpeg()
        if real_decode is None:
            pytest.skip("torchcodec is not installed")
        counting = lambda sources, **kw: decoded.extend(sources) or real_decode(sources, **kw)  # noqa: E731
        monkeypatch.setattr(device_decode, "torchcodec_decode_jpeg", lambda: counting)
    rows = run_sweep(model, meta, split, [24, 32, 40], 0.875, accelerator, crop_pcts=[1.0, 0.8], batch_size=4,
                     decode=decode)
    assert len(decoded) == len(split.val)  # once each, for all 9 pairs
    if decode == "cpu":
        assert sorted(decoded) == sorted(p for p, _ in split.val)
    assert [(r["size"], r["crop_pct"]) for r in rows] == [(s, c) for s in (24, 32, 40) for c in (0.8, 0.875, 1.0)]
    for row in rows:
        [alone] = run_sweep(model, meta, split, [row["size"]], row["crop_pct"], accelerator, batch_size=4,
                            decode=decode)
        assert row["resize"] == alone["resize"] == int(row["size"] / row["crop_pct"])
        assert torch.equal(row["per_image_correct"], alone["per_image_correct"]), (row["size"], row["crop_pct"])
        assert (row["correct"], row["correct5"], row["count"]) == (alone["correct"], alone["correct5"], alone["count"])
        assert row["loss"] == pytest.approx(alone["loss"], rel=1e-6, abs=1e-6)
    assert len({r["correct"] for r in rows}) > 1  # the pairs differ: the pairing of outputs to pairs is tested
    add_differences(rows, 32, 0.875)
    reference = next(r for r in rows if (r["size"], r["crop_pct"]) == (32, 0.875))
    for row in rows:
        right, ref = row["per_image_correct"], reference["per_image_correct"]
        assert (row["gained"], row["lost"]) == (int((right & ~ref).sum()), int((ref & ~right).sum()))


def reference_eval(path: str, *, size: int, crop_pct: float, resample) -> np.ndarray:
    """The test preprocessing written out with PIL and numpy: the shorter side to
    int(size / crop_pct) (the longer in proportion, rounded down), the centre size x size,
    scaled to [0, 1] and normalised with ImageNet's mean and std; CHW float32."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    short = int(size / crop_pct)
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize(new, resample)
    left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
    pixels = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("crop_pct, interpolation", [(0.875, "bilinear"), (0.8, "bicubic"), (0.875, "bicubic")])
def test_sweep_equals_the_preprocessing_written_out(tiny_run, tmp_path, crop_pct, interpolation):
    """Top-1 and loss at two sizes against the model fed by reference_eval: the sweep's
    preprocessing is the documented one, not just the same as train.py's."""
    from accelerate import Accelerator
    model, meta = load_run_model(tiny_run)
    split = load_split(json.loads((tiny_run / "config.json").read_text())["data"], classes=meta["classes"])
    portrait = tmp_path / "portrait.jpg"  # the data's images are landscape: one of each, and odd sizes
    Image.open(split.val[0][0]).transpose(Image.Transpose.ROTATE_90).resize((37, 53)).save(portrait)
    split.val = split.val + [(str(portrait), split.val[0][1])]
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[interpolation]
    rows = add_differences(run_sweep(model, {**meta, "interpolation": interpolation}, split, [12, 16, 24, 32, 48], crop_pct,
                                     Accelerator(cpu=True), batch_size=8, workers=0), 32)
    labels = torch.tensor([label for _, label in split.val])
    model.eval()
    right = {}
    for row in rows:
        batch = torch.from_numpy(np.stack([reference_eval(path, size=row["size"], crop_pct=crop_pct, resample=resample)
                                           for path, _ in split.val]))
        with torch.no_grad():
            logits = model(batch)
        right[row["size"]] = logits.argmax(1) == labels
        assert row["resize"] == int(row["size"] / crop_pct) and row["count"] == len(labels)
        assert row["correct"] == right[row["size"]].sum().item()
        assert row["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    # the paired counts against the training size, from the written-out preprocessing's answers
    for row in rows:
        gained = (right[row["size"]] & ~right[32]).sum().item()
        lost = (~right[row["size"]] & right[32]).sum().item()
        assert (row["gained"], row["lost"]) == (gained, lost), row["size"]
        assert row["diff_vs_train"] == pytest.approx((gained - lost) / len(labels))


def test_torchvision_model_and_plots(tv_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(SWEEP_MAIN, ["--checkpoint", str(tv_run), "--sizes", "48", "--cpu", "--workers", "0",
                                  "--speed-repeats", "1", "--batch-size", "8", "--activations", "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "32 48 (with 32, the training size: the reference)" in stdout
    rows = table_rows(stdout)
    assert [r[0] for r in rows] == ["32", "48"] and rows[0][4:7] == ["reference", "0", "0"]
    assert [r[1] for r in rows] == ["0.875", "0.875"]
    assert re.fullmatch(r"[+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", rows[1][4])
    assert (f"vs 32 px: the difference in top-1 from the training size, in points, on the same {N_VAL} validation "
            "images; 95% interval: paired bootstrap over the images (10000 resamples, seed 0)") in stdout
    assert re.search(r"best: \d+ px \(top-1 [\d.]+%\), trained at 32 px, predicted 40 px", stdout)
    for name in ("sweep.png", "activations.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(out / name) as img:
            img.verify()
    record = json.loads((out / "sweep.json").read_text())
    assert record["meta"]["predicted_best"] == 40 and record["meta"]["train_res"] == 32
    assert len(record["activations"]["edges"]) + 1 == len(record["activations"]["hist"]["32"])

    # again with --no-plots, at another size, into the same folder: new tables, the figures left as they were, and said so
    figures = {name: (out / name).read_bytes() for name in ("sweep.png", "sweep_speed.png", "activations.png")}
    assert run_main(SWEEP_MAIN, ["--checkpoint", str(tv_run), "--sizes", "40", "--cpu", "--workers", "0",
                                  "--speed-repeats", "1", "--batch-size", "8", "--output", str(out), "--no-plots"]) == 0
    stdout = " ".join(capsys.readouterr().out.split())  # rich folds long lines
    assert f"sweep.png, sweep_speed.png, activations.png in {out}: not from this sweep" in stdout
    assert stdout.endswith(f"wrote {out}/sweep.csv, sweep.json")
    assert [r["size"] for r in json.loads((out / "sweep.json").read_text())["rows"]] == [32, 40]
    assert {name: (out / name).read_bytes() for name in figures} == figures


def framed_colour_csv(root: Path, n: int = 27) -> Path:
    """Validation images whose centre has the label's colour and whose frame another's: a crop
    that keeps more frame turns the tiny run's answer (it learned colours), so crops differ."""
    rng, names = np.random.default_rng(3), list(COLOURS)
    (root / "images").mkdir(parents=True)
    rows = ["image_id,label,is_val"]
    for i in range(n):
        label, frame = names[i % 3], names[(i + 1 + (i // 3) % 2) % 3]
        pixels = rng.normal(COLOURS[frame], 60, size=(40, 48, 3))
        inner = 6 + i % 7  # the centre's half-side varies: each crop turns some images
        pixels[20 - inner:20 + inner, 24 - inner:24 + inner] = rng.normal(COLOURS[label], 60, size=(2 * inner, 2 * inner, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:03d}.jpg", quality=90)
        rows.append(f"{i:03d}.jpg,{label},{i >= 3}")  # three training images: a split needs some
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_crop_pct_sweep_compares_every_pair_with_the_training_pair(tiny_run, tmp_path):
    """sweep.py's paired differences are against (train_res, the run's crop_pct), not another
    crop of the training size, on images where the crop changes the answer."""
    result = SWEEP_MAIN(["--checkpoint", str(tiny_run), "--data", str(framed_colour_csv(tmp_path / "framed")),
                         "--sizes", "32", "--crop-pcts", "0.5", "1.0", "--cpu", "--workers", "0", "--no-speed",
                         "--output", str(tmp_path / "out")])
    rows = {(r["size"], r["crop_pct"]): r for r in result["rows"]}
    reference = rows[32, 0.875]["per_image_correct"]
    assert not torch.equal(rows[32, 0.5]["per_image_correct"], reference)  # a wrong reference would show
    for row in rows.values():
        right = row["per_image_correct"]
        assert (row["gained"], row["lost"]) == (int((right & ~reference).sum()), int((reference & ~right).sum()))


def test_plain_pretrained_weights(tv_run, data_csv, tmp_path, capsys):
    argv = ["--model", "tv:resnet18", "--weights", str(tv_run / "plain.pth"), "--data", str(data_csv),
            "--train-res", "32", "--sizes", "32", "--cpu", "--workers", "0", "--speed-repeats", "1",
            "--output", str(tmp_path)]
    assert run_main(SWEEP_MAIN, argv) == 0
    assert "trained at 32 px, predicted 40 px" in capsys.readouterr().out
    assert (tmp_path / "sweep.csv").read_text().startswith(
        "size,crop_pct,resize,top1,top5,loss,correct,correct5,count,diff_vs_train,diff_low,diff_high,gained,lost,")


def test_without_checkpoint_the_newest_run_under_runs(tv_run, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    for name, written in (("older", 1000), ("newer", 2000), ("oldest", 10)):
        shutil.copytree(tv_run, runs / name)
        os.utime(runs / name / "best.safetensors", (written, written))
    (runs / "notes").mkdir()  # newer, but not a run: no config.json nor weights
    (runs / "halfway").mkdir()
    (runs / "halfway" / "config.json").write_text("{}")  # a run that has not saved weights yet
    monkeypatch.chdir(tmp_path)
    argv = ["--sizes", "32", "--cpu", "--workers", "0", "--speed-repeats", "1", "--output", str(tmp_path / "out")]
    assert run_main(SWEEP_MAIN, argv) == 0
    assert "--checkpoint not given: using the newest run runs/newer\n" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["meta"]["weights"] == "runs/newer/best.safetensors"

    monkeypatch.chdir(tmp_path / "out")  # no runs/ here
    assert run_main(SWEEP_MAIN, argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --checkpoint not given, and runs/ holds no run (a folder with config.json and best.safetensors or "
        "last.safetensors): give --checkpoint"]


# ---- bad input: one line, exit status 2, before any evaluation ---------------------------------

def _bad_cases(tiny_run, data_csv, tmp: Path):
    (tmp / "empty").mkdir()
    foreign = tmp / "foreign.safetensors"  # fixres metadata says test_resnet, tensors are resnet18
    save_weights(foreign, create_model("tv:resnet18", 3).state_dict(),
                 {"model": "test_resnet", "classes": sorted(COLOURS), "train_res": 32})
    wrong_classes = data_csv.parent / "wrong_classes.csv"
    wrong_classes.write_text(data_csv.read_text().replace("red,True", "purple,True", 1))
    four = create_model("tv:resnet18", 4).state_dict()
    torch.save(four, tmp / "four.pth")
    run = ["--checkpoint", str(tiny_run)]
    return [
        (["--checkpoint", str(tmp / "missing")], "missing: no such checkpoint folder"),
        (["--checkpoint", str(tmp / "empty")], "empty: holds no weights"),
        (["--checkpoint", str(foreign)], "foreign.safetensors"),
        (["--model", "resnet18", "--weights", str(tiny_run / "best.safetensors"), "--data", str(data_csv)],
         "best.safetensors: "),
        (run + ["--data", str(wrong_classes)], "wrong_classes.csv row"),
        (["--model", "tv:resnet18", "--weights", str(tmp / "four.pth"), "--data", str(data_csv)], "4-class"),
        (run + ["--sizes", "0", "32"], "--sizes"),
        (run + ["--sizes", "32", "100000"], "--sizes"),
        (run + ["--crop-pct", "0"], "--crop-pct"),
        (run + ["--crop-pct", "1.2"], "--crop-pct"),
        (run + ["--crop-pcts", "0.9", "1.2"], "--crop-pcts"),
    ]


@pytest.mark.slow
def test_bad_input_is_one_line_and_status_2(tiny_run, data_csv, tmp_path, capsys):
    for argv, named in _bad_cases(tiny_run, data_csv, tmp_path):
        argv = argv + ["--cpu", "--output", str(tmp_path / "out")]
        try:
            status = run_main(SWEEP_MAIN, argv)
        except SystemExit as exit_:  # argparse refuses bad option values itself
            status = exit_.code
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2, argv
        assert re.match(r"(\S+: )?error: ", err[-1]) and named in err[-1], (argv, err)
        if err[-1].startswith("error: "):  # user errors: all of stderr is one line (argparse adds usage)
            assert len(err) == 1, err
        assert not (tmp_path / "out").exists(), argv  # refused before any evaluation


def test_script_error_is_one_line(tmp_path, capsys):
    result = run_in_process("sweep.py", "--checkpoint", tmp_path / "nope", capsys=capsys)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such checkpoint folder or file"]


# ---- the real script: 1 process vs 2 -----------------------------------------------------------

# 16 px: the 1-epoch model changes its answer on one image there (the others: on none)
def sweep_argv(run: Path, out: Path, *extra) -> list:
    return ["--checkpoint", run, "--sizes", "16", "24", "32", "40", "--batch-size", "4", "--activations", "--output", out,
            *extra]


TWO_PROCESSES = ["--cpu", "--workers", "0"]  # under torchrun, no loader workers


def start_two_process_sweeps(early_runs, tiny: Path, tmp_path_factory) -> None:
    """sweep.py with 2 processes, in one torchrun launch (tests/sweep_runs.py) started in the
    background: tiny_run at its own crop_pct and with --crop-pcts 0.8 1.0 (into <out>/two and
    <out>/two-crop), then seven_class_run (into <seven>/two). The 1-process sweeps run here."""
    out = tmp_path_factory.mktemp("one-and-two")
    seven = make_seven_class_run(tmp_path_factory.mktemp("seven"))
    args = [*sweep_argv(tiny, out / "two", *TWO_PROCESSES), "--",
            *sweep_argv(tiny, out / "two-crop", "--crop-pcts", "0.8", "1.0", *TWO_PROCESSES), "--",
            *sweep_argv(seven, seven.parent / "two", *TWO_PROCESSES)]
    early_runs.start(TWO_PROCESS_SWEEPS, "tests/sweep_runs.py", *args, processes=2, folder=out)
    early_runs.folders[f"{TWO_PROCESS_SWEEPS}: seven"] = seven


def two_process_sweeps(early_runs) -> str:
    """What start_two_process_sweeps' launch printed, once it has ended well."""
    result = early_runs[TWO_PROCESS_SWEEPS]
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="session")
def one_and_two(tiny_run, early_runs) -> tuple[Path, str, str]:
    """tiny_run swept with 1 process here (a loader worker) and 2 in the background, at its own
    crop_pct and with --crop-pcts 0.8 1.0: (the folder of the four outputs, what 1 process printed,
    what 2 printed)."""
    out = early_runs.folders[TWO_PROCESS_SWEEPS]
    one = run_in_process("tests/sweep_runs.py", *sweep_argv(tiny_run, out / "one", "--workers", "1"), "--",
                         *sweep_argv(tiny_run, out / "one-crop", "--crop-pcts", "0.8", "1.0", "--workers", "1"))
    assert one.returncode == 0, one.stderr[-3000:]
    return out, one.stdout, two_process_sweeps(early_runs)


def sweeps_printed(stdout: str) -> list[str]:
    """What each sweep of a launch printed (each begins with its resolved config)."""
    return ["fixres sweep: resolved config" + part for part in stdout.split("fixres sweep: resolved config")[1:]]


@pytest.mark.slow
@pytest.mark.late
def test_same_table_with_one_and_two_processes(one_and_two):
    tmp_path, one, two = one_and_two
    ranks = {}  # each rank's speeds line after each of the launch's sweeps (their lines interleave in stdout)
    for rank, speeds in re.findall(r"^rank (\d): speeds (.*)$", two, re.M):
        ranks.setdefault(rank, []).append(speeds)
    assert sorted(ranks) == ["0", "1"] and ranks["0"] == ranks["1"]  # measured on rank 0 and broadcast
    assert len(ranks["0"]) == 3 and sorted(json.loads(ranks["0"][0])) == ["16", "24", "32", "40"]  # 3 sweeps a launch
    one, two = sweeps_printed(one)[0], sweeps_printed(two)[0]
    assert re.search(r"processes\s+2\b", two) and re.search(r"processes\s+1\b", one)
    rows_one, rows_two = table_rows(one), table_rows(two)
    assert [r[0] for r in rows_one] == ["16", "24", "32", "40"]
    assert all(r[9] == str(N_VAL) for r in rows_one)
    # size, crop_pct, resize, top-1, vs trained, gained, lost, top-5, loss (4 decimals), images, notes
    assert rows_one == rows_two
    assert re.search(r"best: \d+ px .*trained at 32 px, predicted 40 px", one)
    a, b = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("one", "two"))
    assert a["meta"]["processes"] == 1 and b["meta"]["processes"] == 2
    paired = ("diff_vs_train", "diff_low", "diff_high", "gained", "lost")
    for ra, rb in zip(a["rows"], b["rows"]):
        assert (ra["size"], ra["correct"], ra["correct5"], ra["count"]) == (rb["size"], rb["correct"], rb["correct5"],
                                                                          rb["count"])
        assert ra["correct"] <= ra["correct5"] <= ra["count"] and ra["top5"] == ra["correct5"] / N_VAL
        assert [ra[k] for k in paired] == [rb[k] for k in paired]  # per-image results gathered exactly
        assert ra["diff_vs_train"] == (ra["gained"] - ra["lost"]) / N_VAL
        assert ra["diff_vs_train"] == pytest.approx(ra["top1"] - a["rows"][2]["top1"])  # 32 px: the reference
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)   # summation order may differ
    assert a["activations"]["hist"] == b["activations"]["hist"]    # exact counts
    assert a["per_class"] == b["per_class"] and a["meta"]["top5_k"] == 3  # 3 classes: top-5 is top-3
    for row in a["rows"]:
        per_class = a["per_class"][str(row["size"])]
        assert sorted(per_class) == sorted(COLOURS) and sum(c["count"] for c in per_class.values()) == N_VAL
        assert sum(c["correct"] for c in per_class.values()) == row["correct"]
    assert any(r["gained"] + r["lost"] for r in a["rows"])  # some images change: the pairing is tested
    for d in ("one", "two"):
        for name in ("sweep.csv", "sweep.json", "sweep.png", "activations.png"):
            assert (tmp_path / d / name).is_file()
        assert (tmp_path / d / "sweep.png").read_bytes().startswith(PNG_SIGNATURE)
        csv_lines = (tmp_path / d / "sweep.csv").read_text().splitlines()
        assert len(csv_lines) == 5 and csv_lines[0].startswith("size,crop_pct,resize,top1,top5,loss")
        assert not (tmp_path / d / "sweep_crop.png").exists()  # one crop_pct: no heat map


@pytest.mark.slow
@pytest.mark.late
def test_crop_pct_sweep_same_with_one_and_two_processes(one_and_two):
    """--crop-pcts 0.8 1.0 beside the run's 0.875: every (size, crop_pct) pair, the same image for
    image with 1 and 2 processes and on both ranks; its 0.875 rows are the plain sweep's; the
    best pair is best_of's; the reference is (32 px, 0.875)."""
    out, one, two = one_and_two
    pairs = [(s, c) for s in (16, 24, 32, 40) for c in (0.8, 0.875, 1.0)]
    printed = {"one": sweeps_printed(one)[1], "two": sweeps_printed(two)[1]}
    rows_one = table_rows(printed["one"])
    assert [(int(r[0]), float(r[1])) for r in rows_one] == pairs and rows_one == table_rows(printed["two"])
    assert "vs 32 px at 0.875 (95% CI)" in printed["one"] and "top-1 by test size and crop_pct" in printed["one"]
    assert re.search(r"crop_pct\s+0\.8 0\.875 1\.0 \(the reference: 0\.875, the run's\)", printed["one"])
    record = {d: json.loads((out / d / "sweep.json").read_text()) for d in ("one", "two", "one-crop", "two-crop")}
    images = {d: [json.loads((out / d / f"per_image_correct.{rank}.json").read_text()) for rank in ranks]
              for d, ranks in (("one", "0"), ("two", "01"), ("one-crop", "0"), ("two-crop", "01"))}
    # image for image, every pair: 1 process, and each of the 2 processes
    assert images["one-crop"][0] == images["two-crop"][0] == images["two-crop"][1]
    assert images["one"][0] == images["two"][0] == images["two"][1]
    assert list(images["one-crop"][0]) == [f"{s}@{c}" for s, c in pairs]
    for size in (16, 24, 32, 40):  # the run's own crop_pct: as the sweep without --crop-pcts
        assert images["one-crop"][0][f"{size}@0.875"] == images["one"][0][f"{size}@0.875"]
    plain = {r["size"]: r for r in record["one"]["rows"]}
    exact = ("resize", "correct", "correct5", "count", "diff_vs_train", "diff_low", "diff_high", "gained", "lost")
    for a, b in zip(record["one-crop"]["rows"], record["two-crop"]["rows"], strict=True):
        assert {k: a[k] for k in ("size", "crop_pct", *exact)} == {k: b[k] for k in ("size", "crop_pct", *exact)}
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["diff_vs_train"] == (a["gained"] - a["lost"]) / N_VAL
        if a["crop_pct"] == 0.875:
            assert {k: a[k] for k in exact} == {k: plain[a["size"]][k] for k in exact}
    assert any(a["correct"] != plain[a["size"]]["correct"] for a in record["one-crop"]["rows"])  # crops differ
    reference = next(r for r in record["one-crop"]["rows"] if (r["size"], r["crop_pct"]) == (32, 0.875))
    assert reference["gained"] == reference["lost"] == 0
    # every pair against the reference pair, not against another crop of the training size
    by_pair, ref_images = images["one-crop"][0], images["one-crop"][0]["32@0.875"]
    for row in record["one-crop"]["rows"]:
        right = by_pair[f"{row['size']}@{row['crop_pct']}"]
        assert (row["gained"], row["lost"]) == (sum(a > b for a, b in zip(right, ref_images)),
                                                sum(b > a for a, b in zip(right, ref_images)))
    for d in ("one-crop", "two-crop"):
        meta, best = record[d]["meta"], best_of(record[d]["rows"])
        assert (meta["crop_pct"], meta["crop_pcts"]) == (0.875, [0.8, 0.875, 1.0])
        assert (meta["measured_best"], meta["measured_best_crop_pct"]) == (best["size"], best["crop_pct"])
        assert sorted(record[d]["per_class"]) == sorted(f"{s}@{c}" for s, c in pairs)
        assert sorted(record[d]["activations"]["hist"]) == sorted(record[d]["per_class"])
        assert (out / d / "sweep_crop.png").read_bytes().startswith(PNG_SIGNATURE)
        csv_lines = (out / d / "sweep.csv").read_text().splitlines()
        assert len(csv_lines) == 13 and csv_lines[1].startswith("16,0.8,20,")
    assert record["one-crop"]["per_class"] == record["two-crop"]["per_class"]
    best_at = f"{meta['measured_best']} px at crop_pct {meta['measured_best_crop_pct']:g}"
    assert re.search(rf"best: {best_at} \(top-1 [\d.]+%\), trained at 32 px at crop_pct 0\.875, predicted 40 px",
                     printed["one"])


def make_seven_class_run(root: Path) -> Path:
    """7 classes, so that top-5 is not every class; untrained weights: top-5 hits vary."""
    (root / "images").mkdir()
    rng = np.random.default_rng(7)
    rows = ["image_id,label,is_val"]
    for i in range(37):
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        rows.append(f"{i}.jpg,c{i % 7},{i >= 7}")  # 30 validation images
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("test_resnet", 7)
    save_weights(root / "run" / "best.safetensors", model.state_dict(),
                 {"model": "test_resnet", "classes": [f"c{k}" for k in range(7)], "train_res": 32, "test_res": 32,
                  "crop_pct": 0.875, "interpolation": "bilinear"})
    (root / "run" / "config.json").write_text(json.dumps({"data": str(root / "labels.csv"), "images": None}))
    return root / "run"


@pytest.fixture(scope="session")
def seven_class_run(tiny_run, early_runs) -> Path:
    """make_seven_class_run's run, made (and swept with 2 processes) once tiny_run is there."""
    return early_runs.folders[f"{TWO_PROCESS_SWEEPS}: seven"]


@pytest.mark.slow
@pytest.mark.late
def test_top5_and_per_class_counts_are_the_same_with_two_processes(seven_class_run, early_runs):
    one = run_in_process("sweep.py", *sweep_argv(seven_class_run, seven_class_run.parent / "one", "--workers", "0"))
    assert one.returncode == 0, one.stderr[-3000:]
    two_process_sweeps(early_runs)
    a, b = (json.loads((seven_class_run.parent / d / "sweep.json").read_text()) for d in ("one", "two"))
    assert a["meta"]["top5_k"] == 5
    assert [r["correct5"] for r in a["rows"]] == [r["correct5"] for r in b["rows"]]
    assert any(0 < r["correct5"] < 30 for r in a["rows"])  # some images outside the top 5: the count is tested
    assert a["per_class"] == b["per_class"]
