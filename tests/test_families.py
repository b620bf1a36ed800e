"""finetune.py on the families without BatchNorm before the head: what --method finetune trains
(the last LayerNorm/GroupNorm's weight and bias and the classifier; for a norm-free net the
classifier alone), what it says it adapted, and the methods refused in one line where they do
not apply (bn-stats without running statistics, parametric on features that go negative).
A distilled DeiT (two classifiers, head and head_dist, whose logits timm averages): both
heads adapt, and every evaluation is timm's own forward, end to end to its timm export.

    python -m pytest -q tests/test_families.py -k deit     # the DeiT end to end included: about 5 s
"""
import copy
import json
import re

import pytest
import timm
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from fixres import finetune as finetune_lib
from fixres import sweep as sweep_lib
from fixres.adapt import adapted_layers, find_last_norm, prepare_for_finetuning
from fixres.adapter import FrechetAdapter, attach_adapter
from fixres.classifiers import ModelError
from fixres.config import TrainConfig
from fixres.data import load_split
from fixres.fileio import load_weights, save_weights, write_json_atomic
from fixres.models import create_model
from fixres.preprocessing import weights_meta
from fixres.trained_model import load_run_model
from tests import small_torchvision
from tests.conftest import COLOURS, error_line, make_csv_dataset, run_in_process

small_torchvision.register()  # tv:small_convnext: convnext_tiny's class and layers, small (28M -> 62k parameters)

CLASSES = sorted(COLOURS)


def write_source_run(folder, model_name, data, train_res=32, model_kwargs=None):
    """A run folder as train.py writes it, untrained weights (as tests/test_finetune.py's, for tv: models too)."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=len(CLASSES), model_kwargs=model_kwargs)
    cfg = TrainConfig(data=str(data), model=model_name, train_res=train_res, model_kwargs=model_kwargs)
    folder.mkdir(parents=True)
    write_json_atomic(folder / "config.json", cfg.to_dict())
    save_weights(folder / "best.safetensors", model.state_dict(), weights_meta(cfg, CLASSES))
    return folder


# (model, fine-tuning size, the norm adapted, its class, the classifier); test_vit takes multiples of its 16 px patch
FAMILIES = [("test_convnext", 40, "head.norm", "LayerNorm2d", "head.fc"),
            ("test_vit", 48, "norm", "LayerNorm", "head"),
            ("test_nfnet", 40, None, None, "head.fc"),
            ("tv:small_convnext", 40, "classifier.0", "LayerNorm2d", "classifier.2")]


@pytest.mark.parametrize("model_name, res, norm, kind, classifier", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_finetune_trains_the_last_norm_and_the_classifier_only(tmp_path, tiny_csv, capsys, model_name, res, norm,
                                                               kind, classifier):
    source = write_source_run(tmp_path / "source", model_name, tiny_csv)
    summary = finetune_lib.finetune(dict(checkpoint=str(source), res=res, epochs=1, batch_size=30,
                                                   output=str(tmp_path / "out"), workers=0, cpu=True, name="ft"))
    before, _ = load_weights(source / "best.safetensors")
    after, meta = load_weights(tmp_path / "out" / "ft" / "last.safetensors")
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trained = {f"{classifier}.weight", f"{classifier}.bias"} | ({f"{norm}.weight", f"{norm}.bias"} if norm else set())
    assert changed == trained  # and every other tensor bit for bit the source's
    adapted = {"layer": norm, "kind": kind, "classifier": classifier, "classifiers": [classifier]}
    assert summary["adapted"] == adapted and meta["adapted"] == adapted
    assert json.loads((tmp_path / "out" / "ft" / "finetune.json").read_text())["adapted"] == adapted
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("adapts: ")]
    if norm:
        assert lines == [f"adapts: {norm} ({kind}, no running statistics: its weight and bias train) "
                         f"and the classifier {classifier}"]
    else:
        assert lines == [f"adapts: the classifier {classifier} alone (NormFreeNet has no normalisation layer "
                         f"before it)"]


def test_res_auto_without_running_statistics_scores_the_model_as_it_stands(tmp_path, tiny_csv):
    """No BN to re-estimate at each candidate size: the choice sweep is the source model's own."""
    source = write_source_run(tmp_path / "source", "test_convnext", tiny_csv)
    summary = finetune_lib.finetune(dict(checkpoint=str(source), sizes=[32, 40], epochs=1, batch_size=30,
                                                   output=str(tmp_path / "out"), workers=0, cpu=True, name="auto"))
    assert "held-out validation images, the model as it stands (no running statistics to re-estimate)" in \
        summary["res_choice"]
    model, meta = load_run_model(source / "best.safetensors")
    held_out = [s for s in load_split(tiny_csv, classes=CLASSES).val if s[0] in summary["held_out"]]
    untouched = sweep_lib.run_sweep(model, meta, None, [32, 40], 0.875, Accelerator(cpu=True), samples=held_out)
    chosen = summary["choice_sweep"]
    assert [r["size"] for r in chosen] == [32, 40] and [r["top1"] for r in chosen] == [r["top1"] for r in untouched]
    assert [r["loss"] for r in chosen] == pytest.approx([r["loss"] for r in untouched], rel=1e-6)


def test_parametric_takes_pooled_silu_features(tmp_path, tiny_csv, capsys):
    """NFNet pools SiLU outputs: a little below 0 (SiLU's floor is -0.28), a Frechet-like shape all the same."""
    source = write_source_run(tmp_path / "source", "test_nfnet", tiny_csv)
    summary = finetune_lib.finetune(dict(checkpoint=str(source), res=40, method="parametric", fit_images=20,
                                                   output=str(tmp_path / "out"), workers=0, cpu=True, name="p"))
    assert summary["adaptation"]["kind"] == "frechet" and summary["adapted"]["layer"] is None
    assert "adapts: the input of the classifier head.fc (a Frechet map fitted at 32 and 40 px)\n" in capsys.readouterr().out


@pytest.mark.parametrize("name, kwargs, message", [
    ("test_efficientnet_evos", {}, "last normalisation layer bn2 is a EvoNorm2dS0, a kind fixres does not adapt yet"),
    ("test_vit4", {}, "last normalisation layer fc_norm is a RmsNorm, a kind fixres does not adapt yet")])
def test_norms_it_does_not_adapt_are_refused(name, kwargs, message):
    """Not taken for norm-free (the classifier alone) nor for an earlier norm: refused in one line."""
    with pytest.raises(ModelError, match=re.escape(message)):
        find_last_norm(timm.create_model(name, num_classes=3, **kwargs), input_size=32)


def test_the_last_norm_of_each_kind():
    torch.manual_seed(0)
    assert find_last_norm(timm.create_model("test_resnet", num_classes=3), input_size=32) == "layer4.0.downsample.2"
    assert find_last_norm(timm.create_model("test_efficientnet_gn", num_classes=3), input_size=32) == "bn2"
    vit_avg = timm.create_model("test_vit", num_classes=3, global_pool="avg")  # fc_norm after the pooling
    assert find_last_norm(vit_avg, input_size=32) == "fc_norm"
    assert find_last_norm(timm.create_model("test_nfnet", num_classes=3), input_size=32) is None
    # a BatchNorm after the pooling cannot be synced or re-estimated as a map's: still refused
    after_pool = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(ModelError, match="no BatchNorm on feature maps before its global pooling"):
        find_last_norm(after_pool, input_size=16)


@pytest.fixture(scope="module")
def refused_sources(tmp_path_factory, tiny_csv):
    root = tmp_path_factory.mktemp("refused")
    return root, {name: write_source_run(root / name, name, tiny_csv) for name in ("test_convnext", "test_vit")}


@pytest.mark.parametrize("model_name, method, message", [
    ("test_convnext", "bn-stats", "--method bn-stats: test_convnext's last normalisation layer head.norm is a "
                                  "LayerNorm2d, which keeps no running statistics to re-estimate; use --method finetune"),
    ("test_vit", "bn-stats", "--method bn-stats: test_vit's last normalisation layer norm is a LayerNorm, which keeps "
                             "no running statistics to re-estimate; use --method finetune"),
    ("test_convnext", "parametric", "--method parametric: test_convnext's pooled features (the input of its "
                                    "classifier head.fc) go negative"),
    ("test_vit", "parametric", "--method parametric: test_vit's pooled features (the input of its classifier head) "
                               "go negative"),
])
def test_methods_that_do_not_apply_are_refused_in_one_line(refused_sources, capsys, model_name, method, message):
    root, sources = refused_sources
    out = root / f"out-{model_name}-{method}"
    line = error_line(run_in_process("finetune.py", "--checkpoint", sources[model_name], "--method", method, "--res",
                                     "48", "--output", out, "--workers", "0", "--cpu", capsys=capsys))
    assert line.startswith(f"error: {message}")
    assert not out.exists()  # refused before any work


# a distilled DeiT small enough for the CPU: one block, 32 channels, 8 px patches (16 patches at 32 px)
DEIT = "deit_tiny_distilled_patch16_224"
DEIT_KWARGS = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
HEADS = ["head", "head_dist"]


def deit(num_classes=3, **kwargs):
    return timm.create_model(DEIT, num_classes=num_classes, img_size=32, **DEIT_KWARGS, **kwargs)


def test_a_distilled_deit_fine_tunes_its_last_norm_and_both_heads():
    torch.manual_seed(0)
    model = deit()
    name, layer = prepare_for_finetuning(model, input_size=32)
    assert name == "norm" and isinstance(layer, nn.LayerNorm)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in ("norm", *HEADS) for p in ("weight", "bias")}
    assert adapted_layers(model, name) == {"layer": "norm", "kind": "LayerNorm", "classifier": "head",
                                           "classifiers": HEADS}


def test_weights_of_another_class_count_replace_both_heads(tmp_path):
    """train.py --weights FILE of a 5-class DeiT for 3 classes: both heads new, at 3 classes; the rest loaded."""
    torch.manual_seed(0)
    donor = deit(num_classes=5).state_dict()
    save_file(donor, str(tmp_path / "donor.safetensors"))
    model = create_model(DEIT, 3, weights=tmp_path / "donor.safetensors", model_kwargs={"img_size": 32, **DEIT_KWARGS})
    own = model.state_dict()
    assert [tuple(own[f"{h}.weight"].shape) for h in HEADS] == [(3, 32), (3, 32)]
    assert all(torch.equal(own[k], v) for k, v in donor.items() if not k.startswith(("head.", "head_dist.")))


def test_a_parametric_adapter_maps_the_input_of_both_heads():
    """timm averages the two heads' logits: the Frechet map applies to the class token that head
    reads and to the distillation token that head_dist reads."""
    torch.manual_seed(0)
    model = deit().eval()
    plain = copy.deepcopy(model)
    adapter = FrechetAdapter(torch.rand(32) - 1, torch.rand(32) + 0.5, torch.rand(32), torch.rand(32) + 0.5)
    attach_adapter(model, adapter)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = plain.forward_features(x)  # timm's: after its final norm
        expected = (plain.head(adapter(tokens[:, 0])) + plain.head_dist(adapter(tokens[:, 1]))) / 2
        torch.testing.assert_close(model(x), expected)


def test_parametric_on_a_distilled_deit_is_refused_in_one_line(tmp_path, tiny_csv, capsys):
    source = write_source_run(tmp_path / "source", DEIT, tiny_csv, model_kwargs={"img_size": 32, **DEIT_KWARGS})
    out = tmp_path / "out"
    line = error_line(run_in_process("finetune.py", "--checkpoint", source, "--method", "parametric", "--res", "48",
                                     "--output", out, "--workers", "0", "--cpu", capsys=capsys))
    assert line.startswith(f"error: --method parametric: {DEIT}'s pooled features (the input of its classifiers "
                           f"head and head_dist) go negative")
    assert not out.exists()


def library_logits(model, samples, transform) -> torch.Tensor:
    """Each image's logits from the model's own forward, the image opened with PIL and
    preprocessed by `transform` (a library's own eval transform), one image at a time."""
    with torch.inference_mode():
        rows = []
        for path, _ in samples:
            with Image.open(path) as img:
                rows.append(model.eval()(transform(img.convert("RGB"))[None])[0])
    return torch.stack(rows)


def timm_losses(model, samples, config) -> torch.Tensor:
    """Each image's cross-entropy with timm's own eval transform for `config` and the model's own forward."""
    logits = library_logits(model, samples, timm.data.create_transform(**config, is_training=False))
    return nn.functional.cross_entropy(logits, torch.tensor([label for _, label in samples]), reduction="none")


def test_a_distilled_deit_trains_sweeps_finetunes_and_exports_as_timm_evaluates_it(tmp_path, capsys):
    data = make_csv_dataset(tmp_path / "data", n_train=12, n_val=12)
    runs, kwargs = tmp_path / "runs", [f"{k}={v}" for k, v in DEIT_KWARGS.items()]

    def ok(*args):
        result = run_in_process(*map(str, args), capsys=capsys)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result
    # from scratch: both heads at 3 classes, both trained on the model's own (averaged) logits
    ok("train.py", "--data", data, "--model", DEIT, "--model-kwargs", *kwargs, "--train-res", "32", "--epochs", "1",
       "--batch-size", "6", "--workers", "0", "--cpu", "--output", runs, "--name", "src")
    source, meta = load_weights(runs / "src" / "best.safetensors")
    torch.manual_seed(0)  # train.py's seed: the weights it started from
    init = create_model(DEIT, 3, model_kwargs=meta["model_kwargs"]).state_dict()
    for head in HEADS:
        assert source[f"{head}.weight"].shape == (3, 32) and not torch.equal(source[f"{head}.weight"],
                                                                             init[f"{head}.weight"])

    # the sweep's numbers are timm's: its model built at each size from the weights, its transform
    ok("sweep.py", "--no-plots", "--checkpoint", runs / "src", "--sizes", "32", "48", "--workers", "0", "--cpu",
       "--speed-repeats", "1")
    rows = json.loads((runs / "src" / "sweep.json").read_text())["rows"]
    split = load_split(data, None, classes=meta["classes"])
    preprocessing = {k: meta[k] for k in ("crop_pct", "interpolation", "mean", "std")}
    for row in rows:
        size = row["size"]
        theirs = timm.create_model(DEIT, pretrained=True, num_classes=3, **{**meta["model_kwargs"], "img_size": size},
                                   pretrained_cfg_overlay={"file": str(runs / "src" / "best.safetensors"),
                                                           "num_classes": 3})
        losses = timm_losses(theirs, split.val, {"input_size": (3, size, size), **preprocessing})
        assert row["loss"] == pytest.approx(losses.mean().item(), rel=1e-4)

    # fine-tuned at 48 px: the last norm and both heads change, nothing else (pos_embed: resampled for 48 px)
    tuning = ok("finetune.py", "--no-plots", "--checkpoint", runs / "src", "--res", "48", "--epochs", "1", "--batch-size", "6",
                "--workers", "0", "--cpu", "--output", runs, "--name", "ft")
    tuned, tuned_meta = load_weights(runs / "ft" / "best.safetensors")
    changed = {k for k in source if k != "pos_embed" and not torch.equal(source[k], tuned[k])}
    assert changed == {f"{m}.{p}" for m in ("norm", *HEADS) for p in ("weight", "bias")}
    summary = json.loads((runs / "ft" / "finetune.json").read_text())
    assert summary["adapted"] == tuned_meta["adapted"] == {"layer": "norm", "kind": "LayerNorm", "classifier": "head",
                                                           "classifiers": HEADS}
    assert ("adapts: norm (LayerNorm, no running statistics: its weight and bias train) and the classifiers head "
            "and head_dist") in tuning.stdout

    # its timm export: timm builds it, and its forward on its own preprocessing gives finetune.json's "after"
    export = timm.create_model(f"local-dir:{runs / 'ft' / 'timm'}", pretrained=True)
    assert export.pretrained_cfg["input_size"] == (3, 48, 48)
    reported = [s for s in split.val if s[0] not in set(summary["held_out"])]
    losses = timm_losses(export, reported, timm.data.resolve_data_config({}, model=export, use_test_size=True))
    assert summary["loss"]["after"] == pytest.approx(losses.mean().item(), rel=1e-4)
    ours, _ = load_run_model(runs / "ft")
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(export.eval()(images), ours.eval()(images), rtol=1e-5, atol=1e-5)


def test_freeze_epochs_train_both_heads_of_a_distilled_deit(tmp_path, capsys):
    """train.py --weights FILE (5 classes) for 3 classes with --freeze-epochs 1: both new heads
    train in the heads-only epoch, and nothing else moves from the file's weights."""
    data = make_csv_dataset(tmp_path / "data", n_train=12, n_val=6)
    torch.manual_seed(1)
    donor = deit(num_classes=5).state_dict()
    save_file(donor, str(tmp_path / "donor.safetensors"))
    result = run_in_process("train.py", "--data", data, "--model", DEIT, "--model-kwargs",
                            *[f"{k}={v}" for k, v in DEIT_KWARGS.items()], "--train-res", "32", "--epochs", "1",
                            "--freeze-epochs", "1", "--weights", tmp_path / "donor.safetensors", "--batch-size", "6",
                            "--workers", "0", "--cpu", "--output", tmp_path / "runs", "--name", "f", capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    trained, meta = load_weights(tmp_path / "runs" / "f" / "best.safetensors")
    assert all(torch.equal(trained[k], v) for k, v in donor.items() if not k.startswith(("head.", "head_dist.")))
    torch.manual_seed(0)  # train.py's seed: the new heads as it drew them
    init = create_model(DEIT, 3, model_kwargs=meta["model_kwargs"]).state_dict()
    for head in HEADS:
        assert (trained[f"{head}.weight"] - init[f"{head}.weight"]).abs().max() > 1e-3, head
