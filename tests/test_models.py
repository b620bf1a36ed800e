"""The model factory: timm and torchvision names, local weights into another class count."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from fixres.classifiers import ModelError, classifier_name
from fixres.fileio import save_weights
from fixres.models import check_model_name, create_model, load_weights_into
from tests.conftest import ROOT, environ, niced


@pytest.mark.parametrize("name", ["resnet50", "tv:resnet50"])
def test_resnet50_from_both_libraries(name):
    model = create_model(name, num_classes=7)
    assert classifier_name(model) == "fc" and model.fc.out_features == 7


@pytest.mark.parametrize("name, message", [("resnet5O", "unknown timm model"), ("tv:nope", "unknown torchvision")])
def test_unknown_model_names(name, message):
    with pytest.raises(ModelError, match=message):
        check_model_name(name)


@pytest.mark.parametrize("source, target", [("tv:resnet18", "resnet18"), ("resnet18", "tv:resnet18")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_into_another_class_count(tmp_path, source, target, suffix):
    donor = create_model(source, num_classes=1000)
    path = tmp_path / f"donor{suffix}"
    state = {k: v.contiguous() for k, v in donor.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    model = create_model(target, num_classes=5, weights=path)
    assert torch.equal(model.conv1.weight, donor.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, donor.layer4[1].bn2.running_var)
    assert model.fc.out_features == 5  # replaced, not loaded


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("resnet18", 3).state_dict().items()}, path)
    with pytest.raises(ModelError, match=f"{path}: .* has shape"):
        create_model("resnet50", num_classes=3, weights=path)
    model = create_model("resnet18", num_classes=4)
    with pytest.raises(ModelError, match="has shape"):
        load_weights_into(model, {"fc.weight": torch.zeros(3, 512)}, source="x", replace_classifier=False)


def test_weights_with_keys_the_model_lacks_are_refused(tmp_path):
    state = {k: v.contiguous() for k, v in create_model("resnet18", 3).state_dict().items()}
    path = tmp_path / "extra.safetensors"
    save_file({**state, "ema.fc.weight": torch.zeros(3, 512)}, path)
    with pytest.raises(ModelError, match=f"^{path}: holds 1 key\\(s\\) the model lacks, e.g. ema.fc.weight$"):
        create_model("resnet18", num_classes=3, weights=path)
    # a parametric run's adapter, loaded as plain weights: named, with where it is restored
    with pytest.raises(ModelError, match="e.g. fixres_adapter.xi .*load the run with --checkpoint"):
        load_weights_into(create_model("resnet18", 3), {**state, "fixres_adapter.xi": torch.tensor(0.3)},
                          source="p.safetensors", replace_classifier=False)


def test_pickled_code_is_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('ran')" % str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(ModelError, match="cannot read weights"):
        create_model("resnet18", num_classes=2, weights=path)
    assert not (tmp_path / "pwned").exists()


def pretrained_offline() -> subprocess.CompletedProcess:
    """In a fresh process: the hub reads HF_HUB_OFFLINE when it is imported."""
    code = ("from fixres.models import create_model\n"
            "create_model('resnet18', num_classes=2, pretrained=True)")
    return subprocess.run(niced([sys.executable, "-c", code]), capture_output=True, text=True, cwd=ROOT,
                          env={**environ(), "HF_HUB_OFFLINE": "1"}, timeout=300)


def start_early(started, fixtures: set[str], tmp_path_factory, tiny_csv) -> None:
    """conftest's early_runs calls this as the session starts: pretrained_offline's new interpreter,
    in a thread, on a core this process leaves idle."""
    if "offline_run" in fixtures:
        started.call("offline_run", pretrained_offline, real_runs=True)


@pytest.fixture
def offline_run(early_runs) -> subprocess.CompletedProcess:
    return early_runs["offline_run"]


@pytest.mark.slow  # a new interpreter (the offline variable is read at import): 6 s
@pytest.mark.late
def test_pretrained_offline_fails_in_one_line(offline_run):
    result = offline_run
    last = result.stderr.strip().splitlines()[-1]
    assert "--pretrained: cannot get pretrained weights for resnet18" in last and "--weights FILE" in last


def test_output_stride_gives_a_larger_last_feature_map():
    x = torch.zeros(1, 3, 64, 64)
    assert create_model("test_resnet", num_classes=3).forward_features(x).shape[-2:] == (2, 2)
    assert create_model("test_resnet", num_classes=3, output_stride=16).forward_features(x).shape[-2:] == (4, 4)


@pytest.mark.parametrize("name, message", [("tv:resnet18", "for timm models"), ("test_vit", "does not take it")])
def test_output_stride_refused_where_it_does_not_exist(name, message):
    with pytest.raises(ModelError, match=f"--output-stride.*{message}|{message}"):
        create_model(name, num_classes=3, output_stride=16)


def test_a_run_with_output_stride_is_rebuilt_with_it(tmp_path):
    """sweep.py and finetune.py rebuild a run's network from its weights' metadata alone."""
    from fixres.config import TrainConfig
    from fixres.preprocessing import weights_meta
    from fixres.trained_model import load_run_model

    cfg = TrainConfig(model="test_resnet", output_stride=16, train_res=64)
    trained = create_model(cfg.model, num_classes=3, output_stride=cfg.output_stride)
    save_weights(tmp_path / "best.safetensors", trained.state_dict(), weights_meta(cfg, ["a", "b", "c"]))
    model, meta = load_run_model(tmp_path)
    assert meta["output_stride"] == 16
    x = torch.rand(2, 3, 64, 64)
    model.eval(), trained.eval()  # a forward pass in train mode would move the BatchNorm statistics
    assert model.forward_features(x).shape[-2:] == (4, 4)
    assert torch.equal(model(x), trained(x))


def test_output_stride_option_is_checked():
    from fixres.config import ConfigError, TrainConfig
    with pytest.raises(ConfigError, match="--output-stride"):
        TrainConfig(output_stride=12)


def test_the_built_in_preset_ends_on_a_feature_map_of_at_least_4x4():
    """Issue 12: a 1x1 or 2x2 last map turns the sweep into a saw-tooth of padding effects."""
    from fixres.config import TrainConfig
    from fixres.presets import SHAPES_PRESET
    cfg = TrainConfig(**SHAPES_PRESET)
    model = create_model(cfg.model, num_classes=6, output_stride=cfg.output_stride)
    x = torch.zeros(1, 3, cfg.train_res, cfg.train_res)
    assert min(model.forward_features(x).shape[-2:]) >= 4
