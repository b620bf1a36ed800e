"""train.py end to end, run as a user runs it: files, printed lines, resume, two processes, bad input."""
import json
import re
import shutil

import pytest
import torch

from fixres import shapes
from fixres.checkpoint import RunFolder
from fixres.config import TrainConfig
from fixres.fileio import load_weights
from fixres.presets import RECIPES, train_preset
from tests.conftest import TINY_TRAIN, Started, error_line, make_image_folder, parsed, run_in_process


TWO = "test_train.py: train.py with 2 processes"


def start_early(started, fixtures: set[str], tmp_path_factory, tiny_csv) -> None:
    """conftest's early_runs calls this as the session starts: the 2-process run (under torchrun, in
    the session's one launch of such runs: start_together) trains in the background, beside the test files before this one."""
    if "two_process_run" in fixtures:
        out = tmp_path_factory.mktemp("train_two")
        started.start_together(TWO, "train.py", "--data", tiny_csv, *TINY_TRAIN, "--output", out, "--name", "run",
                               "--epochs", 1, "--cpu", folder=out / "run")


@pytest.fixture
def two_process_run(early_runs):
    """start_early's run: its result and run folder."""
    return early_runs.run(TWO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_csv, tiny_folder):
    """The runs of this file that need no other run, each done in this process when a test first
    asks (`runs.run(key)`: its result and run folder), each in a folder of its own."""
    root = tmp_path_factory.mktemp("train")
    bad_data = shutil.copytree(tiny_csv.parent, root / "bad_data")
    (bad_data / "images" / "0005.jpg").write_bytes(b"not a jpeg")
    started = Started()
    for key, data, name, args in [
        ("split", tiny_csv, "split", ["--epochs", 2, "--stop-after", 1]),
        ("workers", tiny_csv, "w2", ["--epochs", 2, "--workers", 2]),
        ("fresh", tiny_csv, "run", ["--epochs", 1, "--resume", "auto"]),
        ("image_folder", tiny_folder, "run", ["--epochs", 1, "--model", "tv:resnet18"]),
        # batch 12 divides the 60 training images, so no batch is dropped and the bad one is read
        ("skips", bad_data / "labels.csv", "skips", ["--epochs", 1, "--batch-size", 12, "--skip-bad-images"]),
    ]:
        started.start(key, "train.py", "--data", data, *TINY_TRAIN, "--output", root / key, "--name", name, *args,
                      in_process=True, folder=root / key / name)
    yield started
    started.collect_all()


def refused(tmp_path, capsys, *args, name="run", data):
    """train.py's answer to input it refuses, run in this process (no interpreter to start)."""
    return run_in_process("train.py", "--data", data, *TINY_TRAIN, "--output", tmp_path / "runs", "--name", name,
                          *args, capsys=capsys)


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_epochs_write_the_run_folder(trained_run):
    result, run = trained_run  # train.py --epochs 2
    assert_ok(result)
    assert "fixres train: resolved config" in result.stdout
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("(n=25)" in line and "data wait " in line for line in epoch_lines)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "images_per_s", "seconds"} <= set(records[0])
    assert all(0 <= r["data_wait_frac"] <= 1 and 0 < r["val_seconds"] < r["seconds"] for r in records)
    assert records[-1]["val_top5"] == 1.0 and "val top-3" in result.stdout  # 3 classes: top-5 is top-3, named so
    assert records[-1]["val_acc"] > 0.5  # three colours: chance is 1/3
    assert json.loads((run / "classes.json").read_text()) == ["blue", "green", "red"]
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "test_resnet" and config["train_res"] == 32

    _, meta = load_weights(run / "best.safetensors")
    assert meta["classes"] == ["blue", "green", "red"] and meta["test_res"] == 32 and meta["crop_pct"] == 0.875
    assert len(RunFolder(run).checkpoints()) == 2
    assert result.stdout.splitlines()[-2:] == [f"next: python sweep.py --checkpoint {run}",
                                               f"then: python finetune.py --checkpoint {run}"]


@pytest.mark.slow
def test_resume_is_exact(runs, trained_run):
    full, full_run = trained_run  # train.py --epochs 2
    assert_ok(full)
    first, split_run = runs.run("split")  # --epochs 2 --stop-after 1
    assert_ok(first)
    assert "next: " not in first.stdout  # not finished: the next step is --resume
    assert len((split_run / "metrics.jsonl").read_text().splitlines()) == 1
    second = run_in_process("train.py", "--resume", split_run)
    assert_ok(second)
    assert "resumed from" in second.stdout and "at epoch 2" in second.stdout

    expected, _ = load_weights(full_run / "last.safetensors")
    resumed, meta = load_weights(split_run / "last.safetensors")
    assert meta["epoch"] == 2
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


@pytest.mark.slow
def test_resume_passes_over_an_unreadable_newest_checkpoint(tmp_path, trained_run, capsys):
    """A truncated newest checkpoint (a disk that filled, a copy cut short): --resume warns,
    naming it, and continues from the one before, to the same weights; none readable: one line."""
    result, finished = trained_run  # train.py --epochs 2
    assert_ok(result)
    run = shutil.copytree(finished, tmp_path / "runs" / "run")
    expected, _ = load_weights(run / "last.safetensors")
    older, newest = RunFolder(run).checkpoints()
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    resumed = run_in_process("train.py", "--resume", run)
    assert_ok(resumed)
    assert "passed over" in resumed.stderr and str(weights) in resumed.stderr and str(older) in resumed.stderr
    assert "at epoch 2" in resumed.stdout
    again, meta = load_weights(run / "last.safetensors")
    assert meta["epoch"] == 2 and all(torch.equal(expected[k], again[k]) for k in expected)

    for checkpoint in RunFolder(run).checkpoints():
        (checkpoint / "state.pt").write_bytes(b"not a checkpoint")
    refused = run_in_process("train.py", "--resume", run, capsys=capsys)
    assert refused.returncode != 0
    line = error_line(refused)
    assert line.startswith(f"error: {RunFolder(run).checkpoints()[-1]}/state.pt: ") and line.endswith(
        "(the 1 older checkpoint(s) cannot be read either)"), line


@pytest.mark.slow
def test_workers_that_stay_train_the_weights_of_no_workers(runs, trained_run):
    """Two loader workers kept over both epochs (persistent) crop every image as the main
    process alone does, epoch 2 included (tests/test_data.py checks that its crops change)."""
    by_workers = {0: trained_run,  # train.py --epochs 2 --workers 0
                  2: runs.run("workers")}
    for result, _ in by_workers.values():
        assert_ok(result)
    expected, _ = load_weights(by_workers[0][1] / "last.safetensors")
    with_workers, _ = load_weights(by_workers[2][1] / "last.safetensors")
    for key in expected:
        assert torch.equal(expected[key], with_workers[key]), key


@pytest.mark.slow
def test_resume_auto_with_nothing_to_resume_starts_fresh(runs):
    result, run = runs.run("fresh")  # --epochs 1 --resume auto
    assert_ok(result)
    assert "no checkpoint under" in result.stdout and "starting fresh" in result.stdout
    assert (run / "last.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_count_every_validation_image_once(two_process_run):
    result, run = two_process_run  # --epochs 1 --cpu, under torchrun with 2 processes
    assert_ok(result)
    assert re.search(r"^processes\s+2\s*$", result.stdout, re.M)
    record = json.loads((run / "metrics.jsonl").read_text())
    assert record["val_count"] == 25  # the split's size, not rounded up to the padded batches
    assert sum(line.startswith("epoch ") for line in result.stdout.splitlines()) == 1  # rank 1 prints nothing


@pytest.mark.slow
def test_image_folder_and_torchvision_model(runs):
    result, run = runs.run("image_folder")  # --epochs 1 --model tv:resnet18 on tiny_folder
    assert_ok(result)
    assert "(n=6)" in result.stdout
    assert load_weights(run / "last.safetensors")[1]["model"] == "tv:resnet18"


@pytest.mark.parametrize("edit, message", [
    (lambda csv: csv.write_text(csv.read_text().replace("is_val", "split")), "missing column(s) is_val"),
    (lambda csv: (csv.parent / "images" / "0003.jpg").unlink(), "0003.jpg does not exist"),
    (lambda csv: csv.write_text(csv.read_text().replace("0004.jpg", "../0004.jpg")), "leaves the image folder"),
    (lambda csv: csv.write_text(csv.read_text().replace("True", "False")), "the validation split is empty"),
])
def test_bad_data_is_refused_before_training(tmp_path, tiny_csv, capsys, edit, message):
    shutil.copytree(tiny_csv.parent, tmp_path / "data")
    csv = tmp_path / "data" / "labels.csv"
    edit(csv)
    result = refused(tmp_path, capsys, "--epochs", "1", data=csv)
    line = error_line(result)
    assert message in line and str(csv) in line
    assert "epoch " not in result.stdout


def test_label_that_is_not_a_known_class(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", per_class=2)
    (root / "val" / "purple").mkdir()
    (root / "val" / "blue" / "0.jpg").rename(root / "val" / "purple" / "0.jpg")
    result = refused(tmp_path, capsys, "--epochs", "1", data=root)
    assert "class 'purple' is not a known class" in error_line(result)


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet5O"], "--model resnet5O: unknown timm model"),
    (["--train-res", "0"], "--train-res must be > 0, got 0"),
    (["--test-res", "-32"], "--test-res must be > 0, got -32"),
    (["--crop-pct", "1.5"], "--crop-pct must be in (0, 1]"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--resume", "/nonexistent"], "--resume /nonexistent: no such run folder"),
])
def test_bad_options_are_refused(tmp_path, tiny_csv, capsys, args, message):
    result = refused(tmp_path, capsys, *args, data=tiny_csv)
    assert message in error_line(result)


@pytest.mark.slow
def test_undecodable_image_stops_or_is_skipped(tmp_path, runs, capsys):
    result, run = runs.run("skips")  # --epochs 1 --batch-size 12 --skip-bad-images, 0005.jpg not a JPEG
    csv = run.parent.parent / "bad_data" / "labels.csv"
    bad = csv.parent / "images" / "0005.jpg"
    # batch 12 divides the 60 training images, so no batch is dropped and the bad one is read
    stopped = refused(tmp_path, capsys, "--epochs", "1", "--batch-size", "12", name="stops", data=csv)
    assert f"cannot decode image {bad}" in error_line(stopped)

    assert_ok(result)
    assert "skipped 1 bad images" in result.stdout
    assert json.loads((run / "metrics.jsonl").read_text())["skipped"] == 1


VIT_KWARGS = RECIPES["shapes-vit"]["model_kwargs"]


@pytest.mark.parametrize("args, model, output_stride, model_kwargs", [
    ([], "test_resnet", 8, None),                                          # the preset's model: its stride
    (["--model", "test_resnet"], "test_resnet", 8, None),                  # the same model, named
    (["--model", "test_vit"], "test_vit", None, None),                     # another model: no stride it may not take
    (["--model", "test_vit", "--output-stride", "16"], "test_vit", 16, None),  # given: kept
    (["--recipe", "tv-resnet50-v2"], "tv:resnet50", None, None),           # the recipe's model
    (["--data", "x.csv"], "resnet50", None, None),                         # no preset
    (["--recipe", "shapes-vit"], "vit_tiny_r_s16_p8_224", None, VIT_KWARGS),  # the recipe's model, its keywords
    (["--recipe", "shapes-vit", "--model", "test_vit"], "test_vit", None, None),  # another model: not its keywords
    (["--recipe", "shapes-vit", "--model", "test_vit", "--model-kwargs", "depth=2"], "test_vit", None, {"depth": 2}),
])
def test_a_preset_or_recipes_model_options_go_with_its_model_only(args, model, output_stride, model_kwargs):
    cfg, _ = parsed(TrainConfig, args, train_preset)
    assert (cfg.model, cfg.output_stride, cfg.model_kwargs) == (model, output_stride, model_kwargs)


def test_another_model_trains_on_the_built_in_data(tmp_path, monkeypatch, capsys):
    """`train.py --model test_vit` with no --data: the built-in preset's --output-stride 8 is its
    test_resnet's, which timm's ViT does not take. The built-in generator, with fewer images."""
    real = shapes.ensure_shapes
    monkeypatch.setattr(shapes, "ensure_shapes",
                        lambda **params: real(**{**params, "n_train": 24, "n_val": 12, "cache_dir": tmp_path / "cache"}))
    result = run_in_process("train.py", "--model", "test_vit", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                            "--output", tmp_path / "runs", "--name", "vit", capsys=capsys)
    assert_ok(result)
    config = json.loads((tmp_path / "runs" / "vit" / "config.json").read_text())
    assert (config["model"], config["output_stride"], config["train_res"]) == ("test_vit", None, 64)
    assert len((tmp_path / "runs" / "vit" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("recipe", ["shapes-convnext", "shapes-vit"])
def test_the_built_in_datas_family_recipes_train_their_model(tmp_path, monkeypatch, capsys, recipe):
    """`train.py --recipe shapes-vit` (or shapes-convnext) with no --data: the recipe's model with
    its constructor keywords (the ViT built at the preset's 64 px), not the preset's stride; the
    recipe's options over the preset's, and an option given still wins."""
    real = shapes.ensure_shapes
    monkeypatch.setattr(shapes, "ensure_shapes",
                        lambda **params: real(**{**params, "n_train": 24, "n_val": 12, "cache_dir": tmp_path / "cache"}))
    result = run_in_process("train.py", "--recipe", recipe, "--epochs", "1", "--batch-size", "8", "--workers", "0",
                            "--output", tmp_path / "runs", "--name", "r", capsys=capsys)
    assert_ok(result)
    config = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    expected = RECIPES[recipe]
    assert (config["model"], config["output_stride"], config["train_res"], config["epochs"]) == (
        expected["model"], None, 64, 1)
    assert (config["lr"], config["min_scale"], config["batch_size"]) == (expected["lr"], expected["min_scale"], 8)
    _, meta = load_weights(tmp_path / "runs" / "r" / "best.safetensors")
    size = {"img_size": 64} if recipe == "shapes-vit" else {}
    assert meta["model_kwargs"] == {**expected["model_kwargs"], **size}
