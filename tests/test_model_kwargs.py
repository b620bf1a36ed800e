"""--model-kwargs KEY=VALUE ...: the model's constructor arguments, as timm's train.py takes them.

    python -m pytest -q tests/test_model_kwargs.py      # about 15 s on 2 CPU cores

A run trained with them is rebuilt with them by load_run_model (sweep.py, finetune.py) and
by timm from the export; a keyword the constructor does not take is refused in one line.
"""
import argparse
import json

import pytest
import timm
import torch
from torch import nn

from fixres.config import ConfigError, TrainConfig
from fixres.fileio import load_weights
from fixres.models import create_model
from fixres.trained_model import load_run_model
from tests.conftest import TINY_TRAIN, error_line, parsed, run_in_process

PAIRS = ["patch_size=8", "drop_path_rate=0.1", "class_token=False", "norm=None", "img_size=(32, 32)",
         "stem_type=deep", "act=gelu tanh", "expr=1=2", "layers=[1, 2]"]


def test_model_kwargs_are_parsed_as_timms_train_py_parses_them():
    """Literals where they parse (ints, floats, bools, None, tuples, lists), else the text."""
    timms = argparse.ArgumentParser()
    timms.add_argument("--model-kwargs", nargs="*", default={}, action=timm.utils.ParseKwargs)
    expected = timms.parse_args(["--model-kwargs", *PAIRS]).model_kwargs
    cfg, given = parsed(TrainConfig, ["--data", "x.csv", "--model-kwargs", *PAIRS])
    assert cfg.model_kwargs == expected and "model_kwargs" in given
    assert cfg.model_kwargs["stem_type"] == "deep" and cfg.model_kwargs["img_size"] == (32, 32)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 5}, "--model-kwargs num_classes: fixres sets it"),
    ({"output_stride": 16}, "--model-kwargs output_stride: fixres sets it \\(use --output-stride\\)"),
    ({"ids": {1, 2}}, "--model-kwargs ids={1, 2}: not a value a config file can hold"),  # a set: no JSON
])
def test_keywords_fixres_sets_or_cannot_record_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        TrainConfig(model_kwargs=kwargs)


def test_a_torchvision_model_takes_them_at_construction():
    model = create_model("tv:resnet50", num_classes=3, model_kwargs={"width_per_group": 32})
    assert model.layer1[0].conv1.out_channels == 32  # 64 without: the bottleneck's width


@pytest.mark.parametrize("model, known, line", [
    ("test_resnet", "drop_rate=0.1", "--model-kwargs no_such: test_resnet (timm's ResNet) takes no keyword no_such"),
    ("tv:resnet18", "zero_init_residual=True",
     "--model-kwargs no_such: tv:resnet18 (torchvision's ResNet) takes no keyword no_such"),
])
def test_an_unknown_keyword_is_refused_in_one_line_before_any_work(tmp_path, tiny_csv, capsys, model, known, line):
    result = run_in_process("train.py", "--data", tiny_csv, *TINY_TRAIN, "--model", model, "--output", tmp_path / "runs",
                            "--model-kwargs", known, "no_such=1", capsys=capsys)
    assert error_line(result) == f"error: {line}"
    assert not (tmp_path / "runs").exists()  # no run folder started


def test_a_run_with_model_kwargs_is_rebuilt_by_sweep_finetune_and_timm(tmp_path, tiny_csv, capsys):
    """test_resnet with a deep stem: conv1 becomes three convolutions (other state dict keys and
    shapes), so any rebuild without the keywords fails to load the weights strictly."""
    runs = tmp_path / "runs"
    kwargs = {"stem_type": "deep", "stem_width": 8}
    result = run_in_process("train.py", "--data", tiny_csv, *TINY_TRAIN, "--epochs", "1", "--output", runs,
                            "--name", "deep", "--model-kwargs", "stem_type=deep", "stem_width=8", capsys=capsys)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run = runs / "deep"
    assert json.loads((run / "config.json").read_text())["model_kwargs"] == kwargs
    state, meta = load_weights(run / "best.safetensors")
    assert meta["model_kwargs"] == kwargs
    model, _ = load_run_model(run)
    assert isinstance(model.conv1, nn.Sequential) and model.conv1[0].out_channels == 8
    assert model.state_dict().keys() == state.keys()

    export = json.loads((run / "timm" / "config.json").read_text())
    assert export["model_args"].items() >= kwargs.items()  # timm adds its own (global_pool, in_chans)
    theirs = timm.create_model(f"local-dir:{run / 'timm'}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(model.eval()(x), theirs(x), rtol=1e-5, atol=1e-6)

    swept = run_in_process("sweep.py", "--no-plots", "--checkpoint", run, "--sizes", "32", "40", "--workers", "0", "--cpu",
                           "--speed-repeats", "1", capsys=capsys)
    assert swept.returncode == 0, swept.stdout[-2000:] + swept.stderr[-2000:]
    tuned = run_in_process("finetune.py", "--no-plots", "--checkpoint", run, "--res", "40", "--method", "bn-stats", "--workers", "0",
                           "--choice-images", "10", "--name", "ft", "--cpu", capsys=capsys)
    assert tuned.returncode == 0, tuned.stdout[-2000:] + tuned.stderr[-2000:]
    assert json.loads((runs / "ft" / "config.json").read_text())["model_kwargs"] == kwargs
    assert load_weights(runs / "ft" / "best.safetensors")[1]["model_kwargs"] == kwargs
    # a resume keeps them: another value is refused in one line, not trained with a word
    resumed = run_in_process("train.py", "--resume", run, "--epochs", "2", "--model-kwargs", "stem_type=deep",
                             "stem_width=16", capsys=capsys)
    assert resumed.returncode != 0 and "the run was trained with --model-kwargs" in resumed.stderr
    assert json.loads((runs / "ft" / "timm" / "config.json").read_text())["model_args"].items() >= kwargs.items()


def test_a_vit_made_for_another_size_and_patch_is_exported_as_timm_builds_it(tmp_path):
    """timm's test_vit is built for 224 px in patches of 16 (strict: other sizes stop it): with
    img_size and patch_size it runs at 32 px on 4x4 patches of 8, and timm rebuilds that from the
    export (the tuple comes back from JSON as a list, which timm takes alike)."""
    from fixres.export import export_timm
    from fixres.fileio import save_weights
    from fixres.preprocessing import weights_meta

    cfg = TrainConfig(model="test_vit", train_res=32, model_kwargs={"patch_size": 8, "img_size": (32, 32)})
    torch.manual_seed(0)
    trained = create_model(cfg.model, num_classes=3, model_kwargs=cfg.model_kwargs).eval()
    assert trained.pos_embed.shape[1] == trained.num_prefix_tokens + 16
    save_weights(tmp_path / "best.safetensors", trained.state_dict(), weights_meta(cfg, ["a", "b", "c"]))
    export = export_timm(tmp_path / "best.safetensors", tmp_path / "timm")
    assert json.loads((export / "config.json").read_text())["model_args"].items() >= {"patch_size": 8,
                                                                                      "img_size": [32, 32]}.items()
    theirs = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(trained(x), theirs(x), rtol=1e-5, atol=1e-6)
