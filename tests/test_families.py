"""finetune.py on the families without BatchNorm before the head: what --method finetune trains
(the last LayerNorm/GroupNorm's weight and bias and the classifier; for a norm-free net the
classifier alone), what it says it adapted, and the methods refused in one line where they do
not apply (bn-stats without running statistics, parametric on features that go negative)."""
import json
import re

import pytest
import timm
import torch
from accelerate import Accelerator
from torch import nn

from fixres import finetune as finetune_lib
from fixres import sweep as sweep_lib
from fixres.adapt import find_last_norm
from fixres.checkpoint import load_weights, save_weights, write_json_atomic
from fixres.config import FinetuneConfig, TrainConfig
from fixres.data import load_split
from fixres.models import ModelError, create_model, load_run_model
from fixres.preprocessing import weights_meta
from tests.conftest import COLOURS, error_line, run_in_process

CLASSES = sorted(COLOURS)


def write_source_run(folder, model_name, data, train_res=32):
    """A run folder as train.py writes it, untrained weights (as tests/test_finetune.py's, for tv: models too)."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=len(CLASSES))
    cfg = TrainConfig(data=str(data), model=model_name, train_res=train_res)
    folder.mkdir(parents=True)
    write_json_atomic(folder / "config.json", cfg.to_dict())
    save_weights(folder / "best.safetensors", model.state_dict(), weights_meta(cfg, CLASSES))
    return folder


# (model, fine-tuning size, the norm adapted, its class, the classifier); test_vit takes multiples of its 16 px patch
FAMILIES = [("test_convnext", 40, "head.norm", "LayerNorm2d", "head.fc"),
            ("test_vit", 48, "norm", "LayerNorm", "head"),
            ("test_nfnet", 40, None, None, "head.fc"),
            ("tv:convnext_tiny", 40, "classifier.0", "LayerNorm2d", "classifier.2")]


@pytest.mark.parametrize("model_name, res, norm, kind, classifier", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_finetune_trains_the_last_norm_and_the_classifier_only(tmp_path, tiny_csv, capsys, model_name, res, norm,
                                                               kind, classifier):
    source = write_source_run(tmp_path / "source", model_name, tiny_csv)
    summary = finetune_lib.finetune(FinetuneConfig(checkpoint=str(source), res=res, epochs=1, batch_size=30,
                                                   output=str(tmp_path / "out"), workers=0, cpu=True, name="ft"))
    before, _ = load_weights(source / "best.safetensors")
    after, meta = load_weights(tmp_path / "out" / "ft" / "last.safetensors")
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trained = {f"{classifier}.weight", f"{classifier}.bias"} | ({f"{norm}.weight", f"{norm}.bias"} if norm else set())
    assert changed == trained  # and every other tensor bit for bit the source's
    adapted = {"layer": norm, "kind": kind, "classifier": classifier}
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
    summary = finetune_lib.finetune(FinetuneConfig(checkpoint=str(source), sizes=[32, 40], epochs=1, batch_size=30,
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
    summary = finetune_lib.finetune(FinetuneConfig(checkpoint=str(source), res=40, method="parametric", fit_images=20,
                                                   output=str(tmp_path / "out"), workers=0, cpu=True, name="p"))
    assert summary["adaptation"]["kind"] == "frechet" and summary["adapted"]["layer"] is None
    assert "adapts: the input of the classifier head.fc (a Frechet map fitted at 32 and 40 px)\n" in capsys.readouterr().out


@pytest.mark.parametrize("name, kwargs, message", [
    ("test_efficientnet_evos", {}, "last normalisation layer bn2 is a EvoNorm2dS0, a kind fixres does not adapt yet"),
    ("test_vit4", {}, "last normalisation layer fc_norm is a RmsNorm, a kind fixres does not adapt yet"),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=1), "has 2 classifiers (head, head_dist)")])
def test_norms_and_heads_it_does_not_adapt_are_refused(name, kwargs, message):
    """Not taken for norm-free (the classifier alone) nor for one head of two: refused in one line."""
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
