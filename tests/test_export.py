"""The model's own normalisation, the run's timm export, top-5.

    python -m pytest -q tests/test_export.py      # about a minute on 2 CPU cores

The end-to-end test trains timm's `test_resnet` from a local weights file (its timm
pretrained_cfg says mean and std 0.5, crop_pct 0.95: not ImageNet's), at stride 16,
sweeps it with --write-best, then evaluates the export as a timm user would: built by
timm.create_model("local-dir:..."), preprocessed by timm's own eval transform from
resolve_data_config(use_test_size=True), and compares with our sweep image by image.
"""
import json
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from fixres import finetune as finetune_lib
from fixres import sweep as sweep_lib
from fixres import layers
from fixres.checkpoint import Checkpoint, RunFolder
from fixres.config import TrainConfig
from fixres.fileio import load_weights, save_weights
from fixres.stats import best_of
from fixres.data import load_split
from fixres.engine import top5_hits
from fixres.export import (EXPORT_DIR, ExportError, check_export, export_data_config, timm_overlay, write_best_size,
                           write_run_export)
from fixres.models import create_model, pretrained_preprocessing
from fixres.report import make_console
from fixres.presets import train_preset
from fixres.trained_model import load_run_model
from fixres.transforms import eval_transform
from tests.conftest import TINY_TRAIN, run_in_process

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def timm_correct(model, samples, use_test_size=True) -> tuple[list[bool], dict]:
    """Which validation images timm gets right: its own eval transform, from the model's config."""
    config = timm.data.resolve_data_config({}, model=model, use_test_size=use_test_size)
    transform = timm.data.create_transform(**config, is_training=False)
    right = []
    with torch.inference_mode():
        for path, label in samples:
            with Image.open(path) as img:
                x = transform(img.convert("RGB"))[None]
            right.append(model.eval()(x).argmax(1).item() == label)
    return right, config


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, tiny_csv):
    """A run of test_resnet at stride 16 started from a plain weights file of that model, and
    one epoch with ImageNet's --mean/--std."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    donor = timm.create_model("test_resnet")  # 1000 classes: the head is replaced
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, root / "test_resnet.safetensors")
    common = ["--data", tiny_csv, *TINY_TRAIN, "--weights", root / "test_resnet.safetensors", "--output-stride", "16",
              "--lr", "3e-3", "--output", root / "runs"]
    own = run_in_process("train.py", *common, "--epochs", "2", "--name", "own")
    imagenet = run_in_process("train.py", *common, "--epochs", "1", "--mean", *IMAGENET[0], "--std", *IMAGENET[1],
                              "--name", "imagenet")
    return ok(own), root, imagenet


@pytest.mark.slow
def test_weights_train_and_evaluate_with_the_models_own_normalisation(pretrained_run, tiny_csv):
    result, root, imagenet = pretrained_run
    run = root / "runs" / "own"
    assert ("normalisation: mean 0.5 0.5 0.5, std 0.5 0.5 0.5, crop_pct 0.95, bilinear: timm's pretrained_cfg "
            "of test_resnet") in result.stdout
    config = json.loads((run / "config.json").read_text())
    assert (config["mean"], config["std"], config["crop_pct"]) == ([0.5] * 3, [0.5] * 3, 0.95)
    _, meta = load_weights(run / "best.safetensors")
    assert (meta["mean"], meta["std"], meta["crop_pct"]) == ([0.5] * 3, [0.5] * 3, 0.95)
    # the sweep preprocesses from the metadata: at the training size it sees what train.py's evaluation saw
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: (r["val_acc"], -r["val_loss"]))  # the highest top-1, then the lowest loss
    swept = sweep_lib.sweep(dict(checkpoint=str(run), sizes=[32], workers=0, cpu=True,
                                                  output=str(root / "sweep32")))["rows"][0]
    assert swept["correct"] == round(best["val_acc"] * 25) and swept["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert best["val_top5"] == 1.0  # three classes: "top-5" is top-3

    # --mean/--std override the model's; training itself then computes something else
    other = ok(imagenet)
    assert "given: --mean --std" in other.stdout
    _, meta = load_weights(root / "runs" / "imagenet" / "best.safetensors")
    assert (meta["mean"], meta["std"], meta["crop_pct"]) == (*IMAGENET, 0.95)
    first = json.loads((root / "runs" / "imagenet" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train_loss"] != records[0]["train_loss"]


@pytest.mark.slow
def test_export_evaluates_in_timm_as_in_our_sweep_to_the_image(pretrained_run):
    result, root, _ = pretrained_run
    run = root / "runs" / "own"
    export = run / EXPORT_DIR
    assert f"timm export: {export} (test size 32 px" in result.stdout
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]

    summary = sweep_lib.sweep(dict(checkpoint=str(run), sizes=[24, 40, 48], crop_pcts=[0.875, 1.0],
                                          write_best=True, workers=0, cpu=True))
    best = best_of(summary["rows"])
    assert (summary["meta"]["measured_best"], summary["meta"]["measured_best_crop_pct"]) == (best["size"],
                                                                                         best["crop_pct"])
    _, meta = load_weights(run / "best.safetensors")
    assert meta["test_res"] == best["size"] and meta["train_res"] == 32
    assert meta["test_crop_pct"] == best["crop_pct"] and meta["crop_pct"] == 0.95  # the run's own stays

    model = timm.create_model(f"local-dir:{export}", pretrained=True)
    assert model.pretrained_cfg["label_names"] == ["blue", "green", "red"]
    split = load_split(json.loads((run / "config.json").read_text())["data"], None, classes=meta["classes"])
    right, config = timm_correct(model, split.val)
    assert config["input_size"] == (3, best["size"], best["size"])  # no flags: timm picks the FixRes size
    assert (tuple(config["mean"]), tuple(config["std"]), config["crop_pct"]) == ((0.5,) * 3, (0.5,) * 3,
                                                                                best["crop_pct"])
    assert right == best["per_image_correct"].tolist()
    # the best pair's pixels (a best pair may get every image right: the pixels say more)
    ours = eval_transform(size=best["size"], crop_pct=best["crop_pct"], interpolation="bilinear", mean=[0.5] * 3,
                          std=[0.5] * 3)
    theirs = timm.data.create_transform(**config, is_training=False)
    with Image.open(split.val[0][0]) as img:  # 48 x 40: not square
        torch.testing.assert_close(theirs(img.convert("RGB")), ours(img.convert("RGB")), rtol=0, atol=1e-6)
    # and at the training size, what timm's default (not use_test_size) gives, as our sweep there
    right32, config = timm_correct(model, split.val, use_test_size=False)
    assert config["input_size"] == (3, 32, 32)
    assert config["crop_pct"] == 0.95
    at32 = next(r for r in summary["rows"] if (r["size"], r["crop_pct"]) == (32, 0.95))
    assert right32 == at32["per_image_correct"].tolist() and 0 < sum(right32) < len(right32)  # some right, some wrong


def test_an_export_that_timm_builds_otherwise_is_refused(tmp_path):
    """The check that stands between save_for_hf and the run folder: a stride-32 export is
    not the stride-16 model it claims to be."""
    torch.manual_seed(0)
    ours = timm.create_model("test_resnet", num_classes=3, output_stride=16).eval()
    plain = timm.create_model("test_resnet", num_classes=3)
    plain.load_state_dict(ours.state_dict())
    meta = {"model": "test_resnet", "classes": ["a", "b", "c"], "train_res": 32, "test_res": 40}
    data_config = export_data_config(meta)
    timm.models.save_for_hf(plain, str(tmp_path / "x"), model_config={"label_names": meta["classes"]},
                            safe_serialization=True, data_config=data_config)
    with pytest.raises(ExportError, match="computes other outputs"):
        check_export(tmp_path / "x", ours, meta, data_config)
    check_export(tmp_path / "x", plain.eval(), meta, data_config)  # the model it is: accepted


# An architecture whose timm default crop_mode is "squash" (and whose default test_input_size,
# 300 px, and test_crop_pct-less config are not ours): timm.models.get_pretrained_cfg says so.
SQUASHING = "tf_efficientnetv2_b3"


def non_square_images() -> list[Image.Image]:
    """Landscape and portrait noise: a squash and a centre crop of them differ."""
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in ((48, 40), (40, 64))]


def timm_pixels(model, images, use_test_size: bool) -> tuple[torch.Tensor, dict]:
    """What timm's own eval transform makes of `images`, from the model's pretrained_cfg."""
    config = timm.data.resolve_data_config({}, model=model, use_test_size=use_test_size)
    transform = timm.data.create_transform(**config, is_training=False)
    return torch.stack([transform(img) for img in images]), config


def test_timm_crops_non_square_images_as_fixres_for_a_squashing_architecture(tmp_path, capsys):
    """timm's default for SQUASHING resizes a whole non-square image to a square; fixres resizes
    the shorter side and crops the centre. The export (as train.py and sweep --write-best write
    it) and timm_overlay must make timm preprocess and predict as fixres does."""
    assert timm.models.get_pretrained_cfg(SQUASHING).crop_mode == "squash"
    torch.manual_seed(0)
    weights = tmp_path / "best.safetensors"
    meta = {"model": SQUASHING, "classes": ["a", "b", "c"], "num_classes": 3, "train_res": 32, "test_res": 32,
            "input_size": [3, 32, 32], "crop_pct": 0.875, "interpolation": "bilinear", "mean": [0.5] * 3,
            "std": [0.25] * 3}
    save_weights(weights, create_model(SQUASHING, 3).state_dict(), meta)
    assert write_run_export(tmp_path, make_console(True)) is not None
    write_best_size(weights, tmp_path, 40, 1.0, make_console(True))  # sweep.py --write-best: test at 40 px, crop 1.0
    assert "timm export: none" not in capsys.readouterr().out
    _, meta = load_weights(weights)
    assert (meta["test_res"], meta["test_crop_pct"], meta["crop_pct"]) == (40, 1.0, 0.875)  # the training size's stays
    ours_model, _ = load_run_model(weights)
    images = non_square_images()
    exported = timm.create_model(f"local-dir:{tmp_path / EXPORT_DIR}", pretrained=True).eval()
    assert exported.pretrained_cfg["test_crop_pct"] == 1.0 and exported.pretrained_cfg["crop_pct"] == 0.875
    overlaid = timm.create_model(SQUASHING, num_classes=3, pretrained=True,
                                 pretrained_cfg_overlay=timm_overlay(weights)).eval()
    for model, use_test_size, size, crop_pct in ((exported, True, 40, 1.0), (exported, False, 32, 0.875),
                                                 (overlaid, True, 40, 1.0), (overlaid, False, 32, 0.875)):
        # fixres's preprocessing at the size (and crop) this model is trained (32) or tested (40) at
        ours = eval_transform(size=size, crop_pct=crop_pct, interpolation="bilinear", mean=[0.5] * 3, std=[0.25] * 3)
        want = torch.stack([ours(img) for img in images])
        got, config = timm_pixels(model, images, use_test_size)
        assert config["input_size"] == (3, size, size), (model is overlaid, use_test_size)
        assert config["crop_pct"] == crop_pct, (model is overlaid, use_test_size)
        resize = [t for t in timm.data.create_transform(**config).transforms if type(t).__name__ == "Resize"]
        assert [t.size for t in resize] == [int(size / crop_pct)]  # the shorter side, as the crop_pct says
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6,
                                   msg=lambda m: f"{config} (overlay: {model is overlaid}): {m}")
        with torch.inference_mode():
            theirs_logits, our_logits = model(got), ours_model.eval()(want)
        torch.testing.assert_close(theirs_logits, our_logits, rtol=1e-4, atol=1e-5)
        assert theirs_logits.argmax(1).tolist() == our_logits.argmax(1).tolist()


def test_an_export_that_timm_crops_otherwise_is_refused(tmp_path):
    """save_for_hf without crop_mode keeps SQUASHING's "squash": the check names the field."""
    model = create_model(SQUASHING, 3).eval()
    meta = {"model": SQUASHING, "classes": ["a", "b", "c"], "train_res": 32, "test_res": 40}
    data_config = export_data_config(meta)
    squashing = {k: v for k, v in data_config.items() if k != "crop_mode"}
    timm.models.save_for_hf(model, str(tmp_path / "x"), model_config={"label_names": meta["classes"]},
                            safe_serialization=True, data_config=squashing)
    with pytest.raises(ExportError, match=r"crop_mode: \{'crop_mode': 'squash'\} instead of \{'crop_mode': 'center'\}"):
        check_export(tmp_path / "x", model, meta, data_config)


@pytest.fixture(scope="module")
def fixres_sizes(tmp_path_factory, trained_run):
    """trained_run (trained at 32 px), copied, told by sweep --write-best to test at 40 px; and
    finetune.py of it at 40 px (one epoch). Each: (run folder, the size the model is, the size
    fixres tests it at)."""
    root = tmp_path_factory.mktemp("sizes")
    trained = root / "trained"
    shutil.copytree(ok(trained_run[0]) and trained_run[1], trained)
    finetune_lib.finetune(dict(checkpoint=str(trained), res=40, epochs=1, batch_size=30, workers=0, cpu=True,
                                         output=str(root), name="ft40"))
    write_best_size(trained / "best.safetensors", trained, 40, 0.875, make_console(True))
    return {"train": (trained, 32, 40), "finetune": (root / "ft40", 40, 40)}


@pytest.mark.parametrize("job", ["train", "finetune"])
def test_transformers_evaluates_the_export_as_fixres_at_the_models_size(fixres_sizes, tiny_csv, job, monkeypatch):
    """Hugging Face transformers (TimmWrapper) loads the export from its folder, and its image
    processor, which reads input_size (never test_input_size), gives fixres's logits at the
    size the model is: train.py's training size (its FixRes size is test_input_size, timm's
    use_test_size), finetune.py's fine-tuned size."""
    transformers = pytest.importorskip("transformers", reason="transformers (optional, .ci/run) is not installed")
    if not hasattr(transformers, "TimmWrapperForImageClassification"):
        pytest.skip(f"transformers {transformers.__version__} has no TimmWrapper (4.47 added it)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, size, test_size = fixres_sizes[job]
    export = str(run / EXPORT_DIR)
    model = transformers.AutoModelForImageClassification.from_pretrained(export, local_files_only=True).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(export, local_files_only=True)
    assert model.config.id2label == {0: "blue", 1: "green", 2: "red"}
    # the validation images (48 x 40) and a portrait one
    split = load_split(tiny_csv, None, classes=["blue", "green", "red"])
    images = [Image.open(path).convert("RGB") for path, _ in split.val] + non_square_images()[1:]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (len(images), 3, size, size)
    ours_model, meta = load_run_model(run)
    ours = eval_transform(size=size, crop_pct=meta["crop_pct"], interpolation=meta["interpolation"], mean=meta["mean"],
                          std=meta["std"])
    with torch.inference_mode():
        theirs = model(pixel_values=pixels).logits
        want = ours_model.eval()(torch.stack([ours(img) for img in images]))
    torch.testing.assert_close(theirs, want, rtol=1e-4, atol=1e-5)
    timm_model = timm.create_model(f"local-dir:{export}", pretrained=True)  # timm's default: the test size
    config = timm.data.resolve_data_config({}, model=timm_model, use_test_size=True)
    assert config["input_size"] == (3, test_size, test_size)
    if job == "finetune":  # finetune.json's top-1 after fine-tuning, image for image
        right = (theirs[:len(split.val)].argmax(1) == torch.tensor([label for _, label in split.val])).sum().item()
        assert right == round(json.loads((run / "finetune.json").read_text())["top1"]["after"] * len(split.val))


def test_no_export_for_a_torchvision_model(tmp_path, capsys):
    save_weights(tmp_path / "best.safetensors", {}, {"model": "tv:resnet18", "classes": ["a"], "train_res": 32})
    assert write_run_export(tmp_path, make_console(True)) is None
    assert "timm export: none (tv:resnet18 is a torchvision model" in capsys.readouterr().out
    assert not (tmp_path / EXPORT_DIR).exists()


def test_pretrained_preprocessing_of_both_libraries():
    assert pretrained_preprocessing("test_resnet") == {"mean": [0.5] * 3, "std": [0.5] * 3,
                                                       "interpolation": "bilinear", "crop_pct": 0.95}
    timm_r50 = pretrained_preprocessing("resnet50.a1_in1k")
    assert (timm_r50["interpolation"], timm_r50["crop_pct"]) == ("bicubic", 0.95)
    tv = pretrained_preprocessing("tv:resnet50")  # the V2 weights: resize 232, crop 224
    assert (tv["mean"], tv["std"], tv["interpolation"]) == (*IMAGENET, "bilinear")
    assert int(224 / tv["crop_pct"]) == 232


def test_preprocessing_layers(tmp_path, monkeypatch):
    """The command line over the weights' own preprocessing over the defaults (fixres.layers)."""
    console = make_console(False)

    def train_config(given):  # as train.py's prepare_run calls it
        return layers.train_config(given, train_preset(given), console)
    scratch, _, _ = train_config({"model": "test_resnet", "data": "x.csv"})
    assert (scratch.mean, scratch.std, scratch.crop_pct) == (*IMAGENET, 0.875)
    given, _, why = train_config({"model": "test_resnet", "data": "x.csv", "pretrained": True, "crop_pct": 0.9,
                                  "mean": [0.1, 0.2, 0.3]})
    assert (given.mean, given.std, given.crop_pct) == ([0.1, 0.2, 0.3], [0.5] * 3, 0.9)
    assert why.endswith("given: --mean --crop-pct")
    # a fixres weights file: its metadata says how it was made
    save_weights(tmp_path / "w.safetensors", {}, {"model": "test_resnet", "mean": [0.2] * 3, "std": [0.3] * 3,
                                                  "crop_pct": 0.8, "interpolation": "bicubic"})
    from_file, _, why = train_config({"model": "test_resnet", "data": "x.csv",
                                      "weights": str(tmp_path / "w.safetensors")})
    assert (from_file.mean, from_file.std, from_file.crop_pct, from_file.interpolation) == (
        [0.2] * 3, [0.3] * 3, 0.8, "bicubic")
    assert f"the metadata of {tmp_path / 'w.safetensors'}" in why
    # a resumed run keeps its config: one saved before mean/std were options used ImageNet's
    old = RunFolder(tmp_path / "old")
    old.path.mkdir()
    old.write_config({**TrainConfig(model="test_resnet", data="x.csv", pretrained=True).to_dict(), "mean": None,
                      "std": None, "crop_pct": 0.95})
    checkpoint = Checkpoint(old.path / "checkpoints" / "epoch-1", weights={}, meta={}, training_state={})
    monkeypatch.setattr(layers.ckpt.RunFolder, "resolve_resume", lambda *args, **kwargs: checkpoint)
    resumed, resume, why = train_config({"resume": str(old.path), "data": "x.csv"})
    assert resume is not None and (resumed.mean, resumed.crop_pct) == (IMAGENET[0], 0.95)
    assert why.endswith("the run's config")


def test_top5_is_top_k_over_at_most_five_classes():
    logits = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1]] * 3)
    assert top5_hits(logits, torch.tensor([0, 4, 5])).tolist() == [True, True, False]
    assert top5_hits(logits[:, :3], torch.tensor([0, 1, 2])).tolist() == [True, True, True]  # k = 3


@pytest.mark.slow
def test_finetune_run_exports_at_its_new_size_with_the_sources_normalisation(pretrained_run):
    """finetune.py keeps the source's normalisation (its weights' metadata: 0.5) and its
    export makes timm test at the new size with no flags, with finetune.json's top-1."""
    _, root, _ = pretrained_run
    result = ok(run_in_process("finetune.py", "--no-plots", "--checkpoint", root / "runs" / "own", "--res", "44", "--epochs", "1",
                               "--batch-size", "16", "--workers", "0", "--name", "ft44"))
    run = root / "runs" / "ft44"
    assert "normalisation: mean 0.5 0.5 0.5, std 0.5 0.5 0.5, crop_pct 0.95" in result.stdout
    summary = json.loads((run / "finetune.json").read_text())
    assert set(summary["top5"]) == {"train_res", "before", "after"} and summary["top5_k"] == 3
    model = timm.create_model(f"local-dir:{run / EXPORT_DIR}", pretrained=True)
    split = load_split(json.loads((run / "config.json").read_text())["data"], None,
                       classes=model.pretrained_cfg["label_names"])
    right, config = timm_correct(model, split.val)
    assert config["input_size"] == (3, 44, 44) and tuple(config["mean"]) == (0.5,) * 3 and config["crop_pct"] == 0.95
    assert sum(right) == round(summary["top1"]["after"] * len(split.val))


def test_sweep_of_plain_weights_preprocesses_as_the_library_made_them(tmp_path, tiny_csv):
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), tmp_path / "plain.safetensors")
    summary = sweep_lib.sweep(dict(model="test_resnet", weights=str(tmp_path / "plain.safetensors"),
                                                    data=str(tiny_csv), train_res=32, sizes=[32], workers=0, cpu=True,
                                                    speed_repeats=1, output=str(tmp_path)))
    assert summary["meta"]["crop_pct"] == 0.95 and summary["rows"][0]["resize"] == 33  # int(32 / 0.95)
