"""The recipe features (model EMA, Mixup/CutMix, TrivialAugment/RandAugment, random erasing,
gradient clipping) and the --recipe preset: what each changes, and resume with them on.

    python -m pytest -q tests/test_recipe.py     # about 4 minutes on 2 busy cores
"""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from fixres import checkpoint as ckpt
from fixres import fileio
from fixres.config import TrainConfig
from fixres.layers import parse_command_line
from fixres.presets import train_preset
from fixres.ema import ModelEma
from fixres.engine import TrainStep, to_device_batch, train_one_epoch
from fixres.resolution import resize_size
from fixres.sweep import sweep
from fixres.ema import epoch_score
from fixres.preprocessing import create_transform
from fixres.runtime import make_accelerator
from fixres.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchMix, crop_augment
from tests import kill_harness as harness
from tests.conftest import TINY_TRAIN, finish, parsed, run_in_process


def seeded(transform, source, seed: int = 0):
    torch.manual_seed(seed)
    return transform(source)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A JPEG with structure everywhere, so that any augmentation shows."""
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    torch.manual_seed(0)
    pixels = (torch.rand(90, 120, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path, quality=95)
    return path


# ----------------------------------------------------------------------------- per-image augmentation

@pytest.mark.parametrize("fast", [True, False], ids=["fast-decode", "decoded-image"])
@pytest.mark.parametrize("auto_augment", ["ta_wide", "ra"])
def test_auto_augment_changes_the_crop_on_both_paths(photo, fast, auto_augment):
    cfg = dict(fast_decode=fast, train_res=32, min_scale=0.5)
    plain = create_transform(TrainConfig(**cfg), "train", device=torch.device("cpu"))
    augmented = create_transform(TrainConfig(**cfg, auto_augment=auto_augment), "train", device=torch.device("cpu"))
    source = str(photo) if fast else Image.open(photo).convert("RGB")
    changed = 0
    for seed in range(8):
        a, b = seeded(plain, source, seed), seeded(augmented, source, seed)
        assert a.shape == b.shape == (3, 32, 32) and a.dtype == b.dtype
        assert torch.equal(b, seeded(augmented, source, seed))  # a function of the sample's seed
        changed += not torch.equal(a, b)
    assert changed >= 6  # TrivialAugment's "identity" op, or a no-op magnitude, may leave one alone


@pytest.mark.parametrize("fast", [True, False], ids=["fast-decode", "decoded-image"])
@pytest.mark.parametrize("mean, std", [(None, None), ([0.3, 0.6, 0.2], [0.2, 0.3, 0.25])], ids=["imagenet", "own"])
def test_random_erasing_is_zero_after_the_runs_own_normalisation(photo, fast, mean, std):
    """The model's input (the workers' crops, then to_device_batch as in training): a rectangle of
    exact zeros, as torchvision erases after normalising, and elsewhere the crop without erasing."""
    cfg = dict(fast_decode=fast, train_res=48, min_scale=0.5, mean=mean, std=std)
    norm = dict(mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD)
    source = str(photo) if fast else Image.open(photo).convert("RGB")
    erasing = create_transform(TrainConfig(**cfg, random_erase=1.0), "train", device=torch.device("cpu"))
    plain = create_transform(TrainConfig(**cfg), "train", device=torch.device("cpu"))
    seeds = range(4)
    erased = to_device_batch(torch.stack([seeded(erasing, source, s) for s in seeds]), False, **norm)
    kept = to_device_batch(torch.stack([seeded(plain, source, s) for s in seeds]), False, **norm)
    for image, reference in zip(erased, kept):
        zero = (image == 0).all(0)
        assert zero.any(), f"no pixel is 0 after normalisation; the smallest: {image.abs().amax(0).min():.4f}"
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        rectangle = torch.zeros_like(zero)
        rectangle[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(zero, rectangle) and zero.sum() >= 0.02 * 48 * 48  # RandomErasing's smallest area
        assert not (reference == 0).all(0).any()  # no pixel of the photo is the mean colour
        assert torch.allclose(image[:, ~zero], reference[:, ~zero], atol=1e-5)
    assert crop_augment(random_erase=0.0) is None and crop_augment() is None


# ----------------------------------------------------------------------------- Mixup and CutMix

def batch(n=8, classes=4):
    torch.manual_seed(1)
    return torch.randn(n, 3, 16, 16), torch.arange(n) % classes


@pytest.mark.parametrize("alphas", [dict(mixup_alpha=0.2), dict(cutmix_alpha=1.0), dict(mixup_alpha=0.2, cutmix_alpha=1.0)])
def test_batch_mix_gives_soft_targets_of_two_classes_drawn_from_its_own_seed(alphas):
    images, labels = batch()
    mix = BatchMix(num_classes=4, seed=3, **alphas)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    mixed, targets = mix(images, labels, epoch=2, batch=5)
    assert torch.equal(torch.rand(1), expected_next)  # the global generator is as it was
    assert targets.shape == (8, 4) and torch.allclose(targets.sum(1), torch.ones(8))
    assert ((targets > 0).sum(1) <= 2).all() and not torch.equal(targets, nn.functional.one_hot(labels, 4).float())
    again = mix(images, labels, epoch=2, batch=5)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], targets)  # a resumed run mixes as the first did
    others = [mix(images, labels, epoch=2, batch=b)[1] for b in range(6, 10)]
    assert any(not torch.equal(t, targets) for t in others)


def test_mixup_images_are_the_mixtures_their_targets_say():
    images, labels = batch()
    mixed, targets = BatchMix(num_classes=4, mixup_alpha=0.4, seed=0)(images, labels, epoch=0, batch=0)
    own = targets[torch.arange(8), labels]  # each image's weight on its own class
    neighbour = images.roll(1, 0)  # torchvision's MixUp pairs each image with the one before it
    expected = own.view(-1, 1, 1, 1) * images + (1 - own.view(-1, 1, 1, 1)) * neighbour
    assert torch.allclose(mixed, expected, atol=1e-5)


# ----------------------------------------------------------------------------- clipping, EMA

def one_step(clip: float | None) -> float:
    """The L2 norm of the change one plain SGD step (lr 1) makes to a linear model."""
    accelerator = make_accelerator(TrainConfig(cpu=True))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = [(torch.randn(4, 3, 2, 2) * 10, torch.tensor([0, 1, 2, 0]), 0)]
    train_one_epoch(TrainStep(model, optimizer, accelerator, lr_at=lambda step: 1.0, clip_grad_norm=clip), loader,
                    first_step=0)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return float((after - before).norm())


def test_clip_grad_norm_bounds_the_step():
    unclipped = one_step(None)
    assert unclipped > 0.5
    assert one_step(0.1) == pytest.approx(0.1, rel=1e-4)
    assert one_step(2 * unclipped) == pytest.approx(unclipped, rel=1e-6)  # a norm under the bound is left alone


def test_ema_averages_every_n_steps_and_copies_during_warm_up():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    nn.init.zeros_(model[0].weight)
    ema = ModelEma(model, decay=0.75, every=2, warmup_steps=2)
    assert ema.horizon_steps == 8
    weight = lambda m: float(m[0].weight)  # noqa: E731
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model, 1)  # not a multiple of 2: nothing
    assert weight(ema.module) == 0.0
    ema.update(model, 2)  # in the warm-up: a copy
    assert weight(ema.module) == 1.0 and int(ema.module[1].num_batches_tracked) == 7
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(4.0)
    ema.update(model, 4)  # 0.75 * old + 0.25 * new, buffers too
    assert weight(ema.module) == pytest.approx(1.5) and float(ema.module[1].running_mean) == pytest.approx(1.0)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_best_is_the_ema_when_it_scores_higher_and_says_so():
    raw, averaged = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    record = {"epoch": 3, "val_acc": 0.5, "val_loss": 0.9, "ema_val_acc": 0.75, "ema_val_loss": 1.2}
    assert epoch_score(record) == {"epoch": 3, "which": "ema", "top1": 0.75, "loss": 1.2}
    # the one rule for "best": equal top-1 goes to the lower loss, and an exact tie to the raw weights
    assert epoch_score({**record, "ema_val_acc": 0.5})["which"] == "raw"
    assert epoch_score({**record, "ema_val_acc": 0.5, "ema_val_loss": 0.8})["which"] == "ema"
    assert epoch_score({**record, "ema_val_acc": 0.5, "ema_val_loss": 0.9})["which"] == "raw"
    files = ckpt.RunFolder.epoch_weights_files({"model": "m"}, raw, averaged, record, best="ema")
    assert files["best.safetensors"] == files["ema.safetensors"]
    assert files["best.safetensors"][1] == {"model": "m", "epoch": 3, "val_acc": 0.75, "ema": True}
    assert files["last.safetensors"][1] == {"model": "m", "epoch": 3, "val_acc": 0.5, "ema": False}
    assert "best.safetensors" not in ckpt.RunFolder.epoch_weights_files({}, raw, averaged, record, best=None)


# ----------------------------------------------------------------------------- the --recipe preset

def test_tv_resnet50_v2_recipe_resolves_to_torchvisions_values():
    cfg, given = parsed(TrainConfig, ["--data", "x.csv", "--recipe", "tv-resnet50-v2", "--epochs", "90"], train_preset)
    # torchvision's blog post and references/classification README, with ours for what differs
    assert (cfg.model, cfg.train_res, cfg.test_res, resize_size(cfg.test_res, cfg.crop_pct)) == ("tv:resnet50", 176, 224, 232)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.warmup_epochs) == ("sgd", 0.5, 0.9, 2e-5, 5)
    assert (cfg.batch_size, cfg.label_smoothing, cfg.interpolation, cfg.min_scale) == (128, 0.1, "bilinear", 0.08)
    assert (cfg.auto_augment, cfg.random_erase, cfg.mixup_alpha, cfg.cutmix_alpha) == ("ta_wide", 0.1, 0.2, 1.0)
    assert (cfg.model_ema, cfg.model_ema_steps) == (True, 32)
    assert cfg.model_ema_decay == pytest.approx(0.998908, abs=1e-6)  # torchvision's 0.99998 at 8 x 128 images per step
    assert cfg.epochs == 90 and set(given) == {"data", "recipe", "epochs"}  # what is given wins
    assert parsed(TrainConfig, ["--data", "x.csv", "--recipe", "tv-resnet50-v2"], train_preset)[0].epochs == 600
    plain = parsed(TrainConfig, ["--data", "x.csv"], train_preset)[0]
    assert (plain.model_ema, plain.auto_augment, plain.mixup_alpha, plain.random_erase, plain.clip_grad_norm) == \
        (False, None, 0.0, 0.0, None)


@pytest.mark.parametrize("args, message", [
    (["--random-erase", "1.5"], "--random-erase must be a probability in [0, 1], got 1.5"),
    (["--mixup-alpha", "-1"], "--mixup-alpha must be >= 0 (0 = off), got -1.0"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm must be > 0, got 0.0"),
    (["--model-ema-decay", "1"], "--model-ema-decay must be in (0, 1), got 1.0"),
    (["--model-ema-steps", "0"], "--model-ema-steps must be >= 1, got 0"),
    (["--recipe", "tv-resnet50-v3"], "argument --recipe: invalid choice: 'tv-resnet50-v3'"),
    (["--auto-augment", "aa"], "invalid choice: 'aa' (choose from 'ta_wide', 'ra')"),
])
def test_bad_recipe_options_are_refused(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        parse_command_line(TrainConfig, ["--data", "x.csv", *args], "train", preset=train_preset)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- train.py with all of them

# EMA updates at steps 2 (a copy: the warm-up is 3 steps), 4, 6, 8; 3 steps an epoch
FEATURES = ["--model-ema", "--model-ema-decay", 0.5, "--model-ema-steps", 2, "--mixup-alpha", 0.2, "--cutmix-alpha",
            1.0, "--auto-augment", "ta_wide", "--random-erase", 0.5, "--clip-grad-norm", 0.5, "--label-smoothing", 0.1]


def featured_args(data, out, *extra) -> list:
    return ["--data", data, *TINY_TRAIN, "--epochs", 3, "--output", out, "--name", "run", *FEATURES, *extra]


def stdout_of(run) -> str:
    """A run (a process, or a result of one in this process) that finished or stopped with its
    checkpoint (exit status 75)."""
    result = finish(run, timeout=300) if isinstance(run, subprocess.Popen) else run
    assert result.returncode in (0, 75), result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


EMA_TWO = "test_recipe.py: EMA with 2 processes"


def start_early(started, fixtures: set[str], tmp_path_factory, tiny_csv) -> None:
    """conftest's early_runs calls this as the session starts: the 2-process run (under torchrun, in
    the session's one launch of such runs: start_together) trains in the background, beside the test files before this one; each
    process's BatchNorm statistics follow its own batches."""
    if "stopped_featured_run" in fixtures:  # a real run stopped by a signal, in a thread (stop_a_featured_run)
        root = tmp_path_factory.mktemp("stopped_featured")
        started.call("stopped_featured_run", stop_a_featured_run, tiny_csv, root, real_runs=True, folder=root)
    if "ema_two_processes" in fixtures:
        out = tmp_path_factory.mktemp("ema_two")
        started.start_together(EMA_TWO, "train.py", "--data", tiny_csv, "--model", "test_resnet", "--train-res", 32,
                               "--batch-size", 8, "--workers", 0, "--epochs", 1, "--cpu", "--warmup-epochs", 0,
                               "--model-ema", "--model-ema-decay", 0.5, "--model-ema-steps", 1, "--output", out,
                               "--name", "ema_two", folder=out / "ema_two")


@pytest.fixture
def ema_two_processes(early_runs):
    """start_early's run: its result and run folder."""
    return early_runs.run(EMA_TWO)


@pytest.fixture(scope="session")  # the late resume test reads it after the other files' tests
def featured_run(tmp_path_factory, tiny_csv):
    """train.py with all the recipe features, in this process: its run folder and what it printed."""
    out = tmp_path_factory.mktemp("featured")
    result, run = run_in_process("train.py", *featured_args(tiny_csv, out)), out / "run"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run, result.stdout


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ema_is_evaluated_beside_the_weights_and_saved(featured_run):
    run, stdout = featured_run
    rows = records(run)
    assert all(r["train_acc"] is None for r in rows)  # mixed batches: no training accuracy
    assert all({"ema_val_acc", "ema_val_loss"} <= set(r) for r in rows)
    assert [r["ema_val_loss"] != r["val_loss"] for r in rows][1:] == [True, True]  # averaged after the warm-up
    epoch_lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 3 and all("train loss" in line and "acc - |" in line and "EMA val loss" in line
                                         for line in epoch_lines)
    assert "--model-ema: decay 0.5 every 2 optimizer steps averages over about 1.33 epochs" in stdout
    candidates = [(r[f"{p}val_acc"], -r[f"{p}val_loss"], "ema" if p else "raw") for r in rows for p in ("", "ema_")]
    which = max(candidates, key=lambda c: c[:2])[2]  # the highest top-1, then the lowest loss
    assert "best.safetensors: epoch" in stdout and f"the {'EMA' if which == 'ema' else 'raw'} weights" in stdout
    ema_weights, ema_meta = fileio.load_weights(run / "ema.safetensors")
    assert ema_meta["ema"] is True and ema_meta["val_acc"] == rows[-1]["ema_val_acc"] and ema_meta["epoch"] == 3
    assert fileio.load_weights(run / "best.safetensors")[1]["ema"] is (which == "ema")
    assert fileio.load_weights(run / "last.safetensors")[1]["ema"] is False
    saved = ckpt.RunFolder.read_training_state(ckpt.RunFolder(run).checkpoints()[-1])
    assert all(torch.equal(saved["ema"][k].cpu(), v) for k, v in ema_weights.items())
    # sweep.py --which ema evaluates the EMA that train.py evaluated
    sweep(dict(checkpoint=str(run), which="ema", sizes=[32], workers=0, output=str(run / "ema-sweep")))
    row = json.loads((run / "ema-sweep" / "sweep.json").read_text())["rows"][0]
    assert row["top1"] == rows[-1]["ema_val_acc"] and row["loss"] == pytest.approx(rows[-1]["ema_val_loss"], abs=1e-6)


def stop_a_featured_run(tiny_csv, root: Path) -> str:
    """A run with the recipe features stopped by SIGTERM before optimizer step 4 (epoch 2, batch 2),
    in <root>/runs: what it printed (stdout_of)."""
    process = harness.start(featured_args(tiny_csv, root / "runs"), events=root / "events.jsonl", pause_at="train step 4")
    harness.wait_for(root / "events.jsonl", "paused", process, timeout=240)
    process.send_signal(signal.SIGTERM)
    return stdout_of(process)


@pytest.fixture
def stopped_featured_run(early_runs) -> tuple[str, Path]:
    """stop_a_featured_run's output (started with the session, in a thread: start_early) and its folder."""
    return early_runs["stopped_featured_run"], early_runs.folders["stopped_featured_run"]


@pytest.mark.slow
@pytest.mark.late  # its stop runs in the background: read after the other tests
def test_recipe_features_resume_exactly_mid_epoch_and_at_an_epoch_end(featured_run, tiny_csv, stopped_featured_run):
    """Stopped by SIGTERM before optimizer step 4 (epoch 2, batch 2), resumed for one epoch
    (--stop-after 1: to the end of epoch 2), resumed to the end: the weights, the EMA and the
    numbers of the uninterrupted run."""
    reference, _ = featured_run
    stopped, root = stopped_featured_run
    out = root / "runs"
    assert "checkpoint saved at epoch 2, batch 2" in stopped
    # the resumed runs have no moment to be stopped at: in this process
    assert "resumed from" in stdout_of(run_in_process("train.py", *featured_args(tiny_csv, out, "--resume", "auto",
                                                                                 "--stop-after", 1)))
    assert ckpt.RunFolder(out / "run").checkpoints()[-1].name == "epoch-0002-step-000006"
    stdout_of(run_in_process("train.py", *featured_args(tiny_csv, out, "--resume", "auto")))
    for name in ("last.safetensors", "ema.safetensors", "best.safetensors"):
        expected, expected_meta = fileio.load_weights(reference / name)
        resumed, resumed_meta = fileio.load_weights(out / "run" / name)
        assert resumed_meta == expected_meta, name
        assert all(torch.equal(expected[k], resumed[k]) for k in expected), name
    # the evaluations; an epoch resumed in its middle reports the training loss of the batches after the resume
    kept = ("epoch", "lr", "val_loss", "val_acc", "ema_val_loss", "ema_val_acc")
    assert [{k: r[k] for k in kept} for r in records(out / "run")] == [{k: r[k] for k in kept} for r in records(reference)]


@pytest.mark.slow
def test_two_processes_evaluate_and_save_the_same_ema(ema_two_processes, tmp_path):
    """Each process's BatchNorm statistics follow its own batches; the EMA that two processes
    evaluate must be the one saved, which one process then evaluates alike."""
    result, run = ema_two_processes
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = records(run)[0]
    sweep(dict(checkpoint=str(run), which="ema", sizes=[32], workers=0, output=str(tmp_path / "s")))
    row = json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"][0]
    assert row["top1"] == record["ema_val_acc"] and row["loss"] == pytest.approx(record["ema_val_loss"], abs=1e-5)


def test_which_ema_of_a_run_without_it_is_refused(tmp_path):
    (tmp_path / "last.safetensors").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="holds no ema.safetensors"):
        ckpt.RunFolder.find_weights(tmp_path, "ema")
