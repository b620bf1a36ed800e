"""finetune.py: what trains and in which mode, the synced last BN, bn-stats, the parametric
map, the exported weights, and the script end to end (1 and 2 processes, bad input)."""
import contextlib
import copy
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from accelerate import Accelerator
import timm
import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from torch import nn

from fixres import finetune as finetune_lib
from fixres import methods as methods_lib
from fixres import transforms as transforms_lib
from fixres import sweep as sweep_lib
from fixres.adapt import pooled_features, reestimate_bn_stats
from fixres.adapter import ADAPTER, FrechetAdapter, attach_adapter, attach_saved_adapter, fit_gev, gev_cdf, gev_icdf
from fixres.checkpoint import CheckpointError
from fixres.classifiers import ModelError
from fixres.cli import run_main
from fixres.config import ConfigError, FinetuneConfig, TrainConfig
from fixres.data import DataError, load_split
from fixres.export import EXPORT_DIR
from fixres.adapt import SyncedBatchNorm2d, prepare_for_finetuning, train_only
from fixres.export import timm_overlay
from fixres.fileio import load_weights, save_weights, write_json_atomic
from fixres.images import open_image
from fixres.methods import seeded_subset
from fixres.preprocessing import weights_meta
from fixres.trained_model import load_run_model
from fixres.training import train
from fixres.transforms import eval_transform, finetune_transform
from tests.conftest import COLOURS, Started, error_line, run_in_process, script_main

CLASSES = sorted(COLOURS)


# ----------------------------------------------------------------------------- freezing and modes

@pytest.mark.parametrize("build", [lambda: timm.create_model("resnet50", num_classes=5),
                                   lambda: torchvision.models.resnet50(num_classes=5)], ids=["timm", "torchvision"])
def test_resnet50_freezing_and_modes(build):
    torch.manual_seed(0)
    model = build()
    keys = set(model.state_dict())
    name, bn = prepare_for_finetuning(model, input_size=64)
    assert name == "layer4.2.bn3"
    assert isinstance(bn, SyncedBatchNorm2d) and model.get_submodule(name) is bn
    assert set(model.state_dict()) == keys  # the swap keeps the state dict (timm loads it)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    model.train()
    train_only(bn)(model)  # what the training loop calls before each epoch
    assert [n for n, m in model.named_modules() if m.training] == ["layer4.2.bn3"]

    model = build()
    prepare_for_finetuning(model, input_size=64, train_bn_affine=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "fc.weight", "fc.bias", "layer4.2.bn3.weight", "layer4.2.bn3.bias"}


def test_the_frozen_part_builds_no_graph():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3)
    name, bn = prepare_for_finetuning(model, input_size=32, train_bn_affine=True)
    seen = {}
    bn.register_forward_hook(lambda m, args, out: seen.update(bn_in=args[0], bn_out=out))
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    assert seen["bn_in"].grad_fn is None and not seen["bn_in"].requires_grad  # nothing recorded before it
    assert seen["bn_out"].grad_fn is not None                                 # its affine trains
    assert all(p.grad is None for p in model.layer1.parameters())
    assert model.fc.weight.grad is not None and bn.weight.grad is not None


# ----------------------------------------------------------------------------- synced BN, one process

@contextlib.contextmanager
def process_group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_synced_bn_computes_what_batchnorm_computes(tmp_path, momentum):
    """The all-reduce path (taken in any process group) against nn.BatchNorm2d."""
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(6, momentum=momentum)
    nn.init.normal_(plain.weight)
    nn.init.normal_(plain.bias)
    synced = SyncedBatchNorm2d.from_bn(plain)
    with process_group_of_one(tmp_path):
        for _ in range(3):
            x = torch.randn(5, 6, 7, 7) * 3 + 2
            expected, got = plain(x), synced(x)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        (expected.square().sum() + got.square().sum()).backward()
    torch.testing.assert_close(synced.weight.grad, plain.weight.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(synced.bias.grad, plain.bias.grad, atol=1e-3, rtol=1e-4)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[key], value, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bn-stats

class OneProcess:
    """The little of an Accelerator that fixres.adapt uses, for one process."""
    num_processes = 1
    autocast = staticmethod(contextlib.nullcontext)
    gather_for_metrics = staticmethod(lambda x: x)
    unwrap_model = staticmethod(lambda m: m)


def test_bn_stats_changes_only_the_last_bn_running_statistics():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    model.train()
    model(torch.randn(8, 3, 32, 32) + 1)  # running statistics that differ from the defaults
    name, bn = prepare_for_finetuning(model, input_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(4, 3, 48, 48) * (1 + i), torch.zeros(4, dtype=torch.long), 0) for i in range(3)]
    inputs = []
    bn.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    assert reestimate_bn_stats(model, bn, batches, OneProcess(), channels_last=False) == 12

    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{name}.running_mean", f"{name}.running_var", f"{name}.num_batches_tracked"}
    # a plain average of the three batches' statistics (momentum None), and the momentum is back
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var((0, 2, 3)) for x in inputs]).mean(0))
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3
    assert not any(m.training for m in model.modules())


def test_bn_stats_of_two_parallel_branches_in_one_pass_are_torchs_batchnorm_averages():
    """test_resnet's last block sums a main branch ending in bn2 and a shortcut ending in
    downsample.2: one pass re-estimates both, as torch's BatchNorm in train mode with momentum
    None (a plain average of equal batches) estimates each, and nothing else changes."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    model.train()
    model(torch.randn(8, 3, 32, 32) + 1)  # running statistics that differ from the defaults
    names = ["layer4.0.bn2", "layer4.0.downsample.2"]
    batches = [(torch.randn(4, 3, 48, 48) * (1 + i), torch.zeros(4, dtype=torch.long), 0) for i in range(3)]
    reference = copy.deepcopy(model).eval()
    for name in names:  # torch's own estimate: only these two in train mode, their averages restarted
        bn = reference.get_submodule(name)
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for images, _, _ in batches:
            reference(images)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reestimate_bn_stats(model, [model.get_submodule(n) for n in names], batches, OneProcess(),
                               channels_last=False) == 12
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{n}.{stat}" for n in names for stat in ("running_mean", "running_var", "num_batches_tracked")}
    for name in names:
        ours, torchs = model.get_submodule(name), reference.get_submodule(name)
        torch.testing.assert_close(ours.running_mean, torchs.running_mean)
        torch.testing.assert_close(ours.running_var, torchs.running_var)
        assert int(ours.num_batches_tracked) == int(torchs.num_batches_tracked) == 3


def test_bn_stats_weighs_each_batch_by_its_images_and_refuses_none():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    name, bn = prepare_for_finetuning(model, input_size=32)
    inputs = []
    bn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    # a partial last batch, as a training split that the batch size does not divide leaves
    batches = [(torch.randn(n, 3, 64, 64) * (1 + i), torch.zeros(n, dtype=torch.long), 0)
               for i, n in enumerate((4, 4, 1))]
    assert reestimate_bn_stats(model, bn, batches, OneProcess(), channels_last=False) == 9
    sizes = torch.tensor([len(x) for x in inputs], dtype=torch.float32)
    torch.testing.assert_close(bn.running_mean, torch.cat(inputs).mean((0, 2, 3)))  # every image once
    torch.testing.assert_close(bn.running_var, (torch.stack([x.var((0, 2, 3)) for x in inputs])
                                                * sizes[:, None]).sum(0) / sizes.sum())

    before = {k: v.clone() for k, v in bn.state_dict().items()}
    empty = [(torch.empty(0), torch.empty(0, dtype=torch.long), 4)]  # every image of the batch undecodable
    for nothing in ([], empty):
        with pytest.raises(DataError, match="no training image"):
            reestimate_bn_stats(model, bn, nothing, OneProcess(), channels_last=False)
        for key, value in bn.state_dict().items():  # the statistics it had, not reset ones
            assert torch.equal(value, before[key]), key


# ----------------------------------------------------------------------------- parametric

def gev_sample(n, loc, scale, generator):
    return gev_icdf(torch.rand(n, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12), loc, scale)


def test_gev_cdf_and_inverse_are_the_frechet_closed_forms():
    x = torch.tensor([-10.0, -3.0, 0.0, 1.0, 5.0, 100.0], dtype=torch.float64)
    loc, scale, xi = 1.0, 2.0, 0.3
    # another implementation's values: scipy.stats.genextreme.cdf(x, c=-0.3, loc=1, scale=2)
    # (scipy's shape c is -xi)
    expected = torch.tensor([0.0, 6.168546903992675e-10, 0.179249297344709, 0.36787944117144233, 0.8116084186504836,
                             0.9999000274579751], dtype=torch.float64)
    torch.testing.assert_close(gev_cdf(x, loc, scale), expected, rtol=1e-9, atol=1e-12)
    assert gev_cdf(x, loc, scale)[0] == 0  # below the support's lower end, loc - scale / xi
    assert gev_cdf(torch.tensor(loc - scale / xi - 1e-9, dtype=torch.float64), loc, scale) == 0
    at_loc = gev_cdf(torch.tensor(loc, dtype=torch.float64), loc, scale).item()
    assert math.isclose(at_loc, math.exp(-1), rel_tol=1e-12)  # t = 1 at the location, for any xi
    dense = gev_cdf(torch.linspace(-20, 1e4, 10_001, dtype=torch.float64), loc, scale)
    assert (dense.diff() >= 0).all() and 0.999 < dense[-1] <= 1  # a distribution function
    p = torch.tensor([1e-6, 0.1, 0.5, 0.9, 0.999999], dtype=torch.float64)
    torch.testing.assert_close(gev_cdf(gev_icdf(p, loc, scale), loc, scale), p)
    # median: loc + scale / xi * (log(2)^-xi - 1)
    assert math.isclose(gev_icdf(torch.tensor(0.5), loc, scale).item(), loc + scale / xi * (math.log(2) ** -xi - 1),
                        rel_tol=1e-6)


def test_fit_recovers_known_parameters_and_the_map_equalises():
    g = torch.Generator().manual_seed(0)
    train = gev_sample(200_000, 0.5, 0.2, g)  # "pooled features at the training resolution"
    test = gev_sample(200_000, 0.8, 0.35, g)  # shifted and wider at the new resolution
    loc, scale = fit_gev(test[:, None])
    assert abs(loc.item() - 0.8) < 0.01 and abs(scale.item() - 0.35) < 0.01
    adapter = FrechetAdapter(*fit_gev(test[:, None]), *fit_gev(train[:, None]))
    mapped = adapter(test.float()[:, None]).double().flatten()
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    torch.testing.assert_close(mapped.quantile(qs), train.quantile(qs), atol=0.01, rtol=0.02)
    # the module is F_train^-1(F_test(x)), written in closed form
    x = torch.linspace(0.0, 3.0, 50, dtype=torch.float64)
    expected = gev_icdf(gev_cdf(x, adapter.test_loc.double(), adapter.test_scale.double()),
                        adapter.train_loc.double(), adapter.train_scale.double())
    torch.testing.assert_close(adapter(x.float()).double(), expected, atol=1e-4, rtol=1e-4)


def test_per_feature_fit_and_the_adapter_saved_with_the_model():
    g = torch.Generator().manual_seed(1)
    locs, scales = torch.tensor([0.1, 1.0, 3.0]), torch.tensor([0.05, 0.5, 1.0])
    samples = torch.stack([gev_sample(50_000, lo, s, g) for lo, s in zip(locs, scales)], dim=1)
    loc, scale = fit_gev(samples, per_feature=True)
    torch.testing.assert_close(loc, locs, atol=0.03, rtol=0.02)
    torch.testing.assert_close(scale, scales, atol=0.02, rtol=0.03)

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3).eval()
    plain_keys = set(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    features = pooled_features(model, [(x, torch.zeros(2), 0)], OneProcess(), channels_last=False)
    width = features.shape[1]
    adapter = FrechetAdapter(torch.full((width,), 0.2), torch.full((width,), 0.5), torch.zeros(width), torch.ones(width))
    attach_adapter(model, adapter)
    with torch.no_grad():
        expected = nn.functional.linear(adapter(features), model.fc.weight, model.fc.bias)  # fc's hook adapts
        torch.testing.assert_close(model(x), expected)
    state = model.state_dict()
    assert set(state) - plain_keys == {f"{ADAPTER}.{k}" for k in ("test_loc", "test_scale", "train_loc", "train_scale", "xi")}
    restored = timm.create_model("test_resnet", num_classes=3).eval()
    restored.load_state_dict({k: v for k, v in state.items() if k in plain_keys})
    attach_saved_adapter(restored, state)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected)


# ----------------------------------------------------------------------------- preprocessing and config

def test_finetune_transforms():
    img = Image.new("RGB", (96, 64), (120, 30, 200))
    torch.testing.assert_close(finetune_transform(aug="test", size=48)(img), eval_transform(size=48)(img))
    for aug in ("test+", "rrc"):
        assert finetune_transform(aug=aug, size=48)(img).shape == (3, 48, 48)
    with pytest.raises(ConfigError, match="--aug"):
        finetune_transform(aug="mixup", size=48)


def test_finetune_config_refuses_bad_values():
    for kwargs, message in ((dict(res=0), "--res must be > 0"), (dict(res="-3"), "--res must be > 0"),
                            (dict(res="big"), "--res must be a size"), (dict(method="lora"), "--method must be one of"),
                            (dict(aug="cutmix"), "--aug must be one of"), (dict(choice_images=0), "--choice-images must be > 0"),
                            (dict(resume="auto", name="x", checkpoint=None), "--resume auto needs --checkpoint")):
        with pytest.raises(ConfigError, match=message):
            FinetuneConfig(**{"checkpoint": "runs/x", **kwargs})
    assert FinetuneConfig(checkpoint="runs/x", res="80").res == 80


def test_the_choice_images_are_a_seeded_slice_of_the_training_split():
    train = [(f"{i:04d}.jpg", i % 3) for i in range(60)]
    chosen = seeded_subset(train, 20, seed=0)
    assert len(set(chosen)) == 20 and set(chosen) <= set(train)
    assert chosen == seeded_subset(train, 20, seed=0) and chosen != seeded_subset(train, 20, seed=1)
    assert sorted(seeded_subset(train, 1000, seed=0)) == train  # fewer than asked for: all of them


def test_res_auto_chooses_on_validation_images_that_never_report(tmp_path, tiny_csv, monkeypatch):
    """Which images each step reads, recorded where finetune.py hands them over: the size is
    scored on held-out validation images, its BN statistics come from training images, and
    before/after report on the other validation images only."""
    source = write_source_run(tmp_path / "source", "test_resnet", tiny_csv)
    seen = {"scored": [], "bn": [], "reported": []}

    def spy(kind, real):
        def wrapper(*args, **kwargs):
            # run_sweep(model, meta, split, ..., samples=None: split.val); reestimate_last_bn(model, samples, ...)
            seen[kind].append(list(args[1] if kind == "bn" else kwargs.get("samples") or args[2].val))
            return real(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(methods_lib, "run_sweep", spy("scored", methods_lib.run_sweep))
    monkeypatch.setattr(methods_lib, "reestimate_last_bn", spy("bn", methods_lib.reestimate_last_bn))
    monkeypatch.setattr(finetune_lib, "run_sweep", spy("reported", finetune_lib.run_sweep))
    summary = finetune_lib.finetune(dict(checkpoint=str(source), data=str(tiny_csv), res="auto",
                                                   sizes=[24, 40], choice_images=20, method="bn-stats", workers=0,
                                                   cpu=True, output=str(tmp_path), name="auto"))
    split = load_split(tiny_csv)
    scored = seen["scored"]
    assert len(scored) == 3 and scored[0] == scored[1] == scored[2]  # 24, 32 (the training size) and 40 px
    assert len(scored[0]) == 12 and set(scored[0]) <= set(split.val)  # at most half of the 25
    assert [p for p, _ in scored[0]] == summary["held_out"]
    assert [len(b) for b in seen["bn"]] == [20, 20, 20, 60] and all(set(b) <= set(split.train) for b in seen["bn"])
    assert len(seen["reported"]) == 2 and seen["reported"][0] == seen["reported"][1]  # before, after
    assert sorted(seen["reported"][0] + scored[0]) == sorted(split.val)  # disjoint, and together the split
    assert summary["val_images"] == 13


def test_a_resumed_finetune_keeps_its_held_out_images_and_its_choice(tmp_path, tiny_csv, monkeypatch):
    """Stopped after an epoch and resumed, a fine-tune reports what an uninterrupted one does: the
    same held-out images, the size chosen the same way; a resume cannot redraw them."""
    source = write_source_run(tmp_path / "source", "test_resnet", tiny_csv)
    common = dict(checkpoint=str(source), data=str(tiny_csv), res="auto", sizes=[24, 40], choice_images=20, epochs=2,
                  aug="test", batch_size=10, workers=0, cpu=True, output=str(tmp_path))
    whole = finetune_lib.finetune(dict(**common, name="whole"))
    assert finetune_lib.finetune(dict(**common, name="parts", stop_after=1))["unfinished"]
    assert not (tmp_path / "parts" / "finetune.json").exists()  # no "after" for a fine-tune half done
    with pytest.raises(CheckpointError, match="the run was trained with --choice-images 20, not 6"):
        finetune_lib.finetune(dict(resume=str(tmp_path / "parts"), choice_images=6))
    def no_second_choice(*args, **kwargs):
        raise AssertionError("a resumed fine-tune chose its size again")
    monkeypatch.setattr(finetune_lib, "choose_res", no_second_choice)
    # a requeued job repeats its command line: --res auto with --resume
    parts = finetune_lib.finetune(dict(resume=str(tmp_path / "parts"), res="auto"))
    for key in ("held_out", "res", "res_choice", "chosen_on", "choice_sweep", "top1", "loss", "after_epoch"):
        assert parts[key] == whole[key], key
    assert parts["res_choice"].startswith("--res auto: ") and len(parts["choice_sweep"]) == 3


def test_a_resumed_finetune_keeps_the_preprocessing_its_first_run_was_given(tmp_path, tiny_csv):
    """The resumed run's config is a layer over the source's (fixres.layers): --crop-pct,
    --interpolation and --min-scale given to the first run hold after a resume, whose weights
    are then those of an uninterrupted run. An empty --output counts as not given."""
    source = write_source_run(tmp_path / "source", "test_resnet", tiny_csv)
    common = dict(checkpoint=str(source), res=40, epochs=2, aug="rrc", crop_pct=0.9, interpolation="bicubic",
                  min_scale=0.5, batch_size=10, workers=0, cpu=True, output="")
    whole = finetune_lib.finetune(dict(**common, name="whole"))
    assert finetune_lib.finetune(dict(**common, name="parts", stop_after=1))["unfinished"]
    parts = finetune_lib.finetune(dict(resume=str(tmp_path / "parts")))  # beside the source: --output ''
    resumed = json.loads((tmp_path / "parts" / "config.json").read_text())
    assert (resumed["crop_pct"], resumed["interpolation"], resumed["min_scale"]) == (0.9, "bicubic", 0.5)
    assert resumed["output"] == str(tmp_path)
    for name in ("best", "last"):
        ours, theirs = (load_weights(tmp_path / run / f"{name}.safetensors")[0] for run in ("parts", "whole"))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert parts["top1"] == whole["top1"]


# ----------------------------------------------------------------------------- the script end to end

def write_source_run(folder, model_name, data, train_res=32, seed=0, **options):
    """A run folder as train.py writes it (its weights untrained: nothing here needs accuracy)."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=len(CLASSES))
    cfg = TrainConfig(data=str(data), model=model_name, train_res=train_res, **options)
    folder.mkdir(parents=True)
    write_json_atomic(folder / "config.json", cfg.to_dict())
    save_weights(folder / "best.safetensors", model.state_dict(), weights_meta(cfg, CLASSES))
    return folder


def test_a_finetuned_run_keeps_the_source_min_scale(tmp_path, tiny_csv, monkeypatch):
    """A source trained with --min-scale 0.25: its fine-tuned run crops (--aug rrc), records and
    predicts with 0.25, also from its weights alone; --min-scale given to finetune.py wins."""
    source = write_source_run(tmp_path / "source", "test_resnet", tiny_csv, min_scale=0.25)
    crops = []
    real = transforms_lib.train_transform
    monkeypatch.setattr(transforms_lib, "train_transform", lambda **kw: crops.append(kw["min_scale"]) or real(**kw))
    common = dict(checkpoint=str(source), res=40, output=str(tmp_path / "out"), workers=0, cpu=True, batch_size=30)
    finetune_lib.finetune(dict(**common, aug="rrc", epochs=1, name="rrc"))
    run = tmp_path / "out" / "rrc"
    assert crops == [0.25]
    assert json.loads((run / "config.json").read_text())["min_scale"] == 0.25
    assert [load_weights(run / f"{which}.safetensors")[1].get("min_scale") for which in ("best", "last")] == [0.25] * 2
    alone = tmp_path / "alone"  # no config.json beside them
    alone.mkdir()
    shutil.copy(run / "best.safetensors", alone / "weights.safetensors")
    swept = sweep_lib.sweep(dict(checkpoint=str(alone / "weights.safetensors"), data=str(tiny_csv),
                                        sizes=[32], cpu=True, workers=0, speed_repeats=1))
    assert swept["meta"]["min_scale"] == 0.25

    finetune_lib.finetune(dict(**common, method="bn-stats", min_scale=0.5, name="given"))
    assert json.loads((tmp_path / "out" / "given" / "config.json").read_text())["min_scale"] == 0.5


@pytest.fixture(scope="module")
def unlearning(tmp_path_factory, tiny_csv):
    """A source that has learned the colours (train.py, 2 epochs: 100% on validation) and its
    data with the training labels rotated: fine-tuning on them unlearns, so the last epoch
    scores below an earlier one."""
    root = tmp_path_factory.mktemp("unlearning")
    train(dict(data=str(tiny_csv), model="test_resnet", train_res=32, batch_size=16, epochs=2, lr=2e-3,
                      workers=0, cpu=True, output=str(root), name="source"))
    rotate = dict(zip(CLASSES, CLASSES[1:] + CLASSES[:1]))
    header, *rows = tiny_csv.read_text().splitlines()
    rows = [(image, rotate[label] if is_val == "False" else label, is_val) for image, label, is_val in
            (row.split(",") for row in rows)]
    rotated = tiny_csv.parent / "rotated.csv"
    rotated.write_text("\n".join([header] + [",".join(row) for row in rows]) + "\n")
    return root / "source", rotated


@pytest.mark.slow
def test_finetune_json_describes_the_weights_it_ships(unlearning, tmp_path):
    source, rotated = unlearning
    finetune_lib.finetune(dict(checkpoint=str(source), data=str(rotated), res=40, epochs=3, lr=3e-3,
                                         aug="test", batch_size=10, workers=0, cpu=True, output=str(tmp_path),
                                         name="ft"))
    run = tmp_path / "ft"
    summary = json.loads((run / "finetune.json").read_text())
    # every choice on held-out validation images, every number reported on the others
    val = [path for path, _ in load_split(rotated).val]
    held_out = summary["held_out"]
    reported = [i for i, path in enumerate(val) if path not in held_out]
    assert len(held_out) == 12 and set(held_out) <= set(val) and len(reported) == 13 == summary["val_images"]
    assert summary["chosen_on"] == "the epoch that ships: 12 held-out validation images"
    accuracies = [record["val_acc"] for record in summary["epochs"]]
    assert all(round(a * 12) == a * 12 for a in accuracies)  # the epochs were scored on the 12 held-out images
    assert max(accuracies) > accuracies[-1], accuracies  # the case at issue: the last epoch is not the best
    # the epoch that ships: the highest held-out top-1, then the lowest loss
    best = max(summary["epochs"], key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert summary["after_epoch"] == load_weights(run / "best.safetensors")[1]["epoch"] == best["epoch"]
    # "after" and "last epoch" are those weights on the 13 reported images: sweep.py on all 25, cut to them
    for which, top1 in (("best", summary["top1"]["after"]), ("last", summary["last_epoch"]["top1"])):
        rows = sweep_lib.sweep(dict(checkpoint=str(run), which=which, sizes=[40], cpu=True, workers=0,
                                           output=str(tmp_path / which)))["rows"]
        correct = next(row for row in rows if row["size"] == 40)["per_image_correct"]
        assert top1 == pytest.approx(sum(bool(correct[i]) for i in reported) / 13), which
    assert summary["last_epoch"]["epoch"] == 3


TWO = "test_finetune.py: finetune.py with 2 processes x 5"
BN_STATS_TWO = "test_finetune.py: bn-stats with 2 processes x 8"


def finetune_args(source: Path, root: Path) -> list:
    """runs': 60 training images, so that 2 x 5 and 1 x 10 make the same 6 global batches."""
    return ["--checkpoint", source, "--res", "48", "--epochs", "2", "--aug", "test", "--lr", "0.05",
            "--train-bn-affine", "--output", root / "out", "--workers", "0", "--cpu"]


def bn_stats_args(source: Path, root: Path) -> list:
    return ["--checkpoint", source, "--res", "40", "--method", "bn-stats", "--output", root / "out", "--workers", "0",
            "--cpu", "--no-plots"]


def start_early(started, fixtures: set[str], tmp_path_factory, tiny_csv) -> None:
    """conftest's early_runs calls this as the session starts: the 2-process runs of runs and bn_runs
    (under torchrun, in the session's one launch of such runs: start_together) fine-tune in the background, beside the test files
    before this one. (runs needs bn_runs: a test of either has bn_runs among its fixtures.)"""
    if "bn_runs" not in fixtures:
        return
    root = tmp_path_factory.mktemp("bn_stats")
    source = write_source_run(root / "source", "test_resnet", tiny_csv)
    started.start_together(BN_STATS_TWO, "finetune.py", *bn_stats_args(source, root), "--batch-size", "8", "--name",
                           "two", folder=root)
    if "runs" in fixtures:
        root = tmp_path_factory.mktemp("finetune")
        source = write_source_run(root / "source", "test_resnet", tiny_csv)
        started.start_together(TWO, "finetune.py", "--no-plots", *finetune_args(source, root), "--batch-size", "5", "--name", "two",
                               folder=root)


@pytest.fixture(scope="module")
def runs(early_runs, tiny_csv, bn_runs):
    """The script runs of this file that need no other run: the 2-process one started with the
    session (start_early), the others done in this process when a test first asks."""
    root = early_runs.folders[TWO]
    source = root / "source"
    out = ["--output", root / "out", "--workers", "0", "--cpu"]
    started = Started()
    started.call("two", early_runs.__getitem__, TWO)  # waited for in a thread: needed from here on
    started.start("one", "finetune.py", *finetune_args(source, root), "--batch-size", "10", "--name", "one",
                  in_process=True)
    started.start("auto", "finetune.py", "--no-plots", "--checkpoint", source, "--res", "auto", "--sizes", "24", "40",
                  "--choice-images", "20", "--method", "parametric", "--parametric-scope", "feature", "--name", "auto",
                  *out, in_process=True)
    started.start("bn_stats", "finetune.py", "--no-plots", "--checkpoint", source, "--res", "40", "--method", "bn-stats",
                  "--batch-size", "8", "--name", "bn_stats", *out, in_process=True)
    # train.py --freeze-epochs (transfer learning): the first epoch trains only the classifier
    started.start("freeze", "train.py", "--data", tiny_csv, "--model", "test_resnet", "--train-res", "32", "--workers",
                  "0", "--batch-size", "16", "--weights", source / "best.safetensors", "--freeze-epochs", "1",
                  "--epochs", "2", "--stop-after", "1", "--output", root / "out", "--name", "freeze", in_process=True)
    yield started, root / "out", source
    started.collect_all()


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_equal_one_with_the_global_batch(runs):
    results, out, _ = runs
    ok(results["two"])
    ok(results["one"])
    assert re.search(r"^processes\s+2\s*$", results["two"].stdout, re.M)
    one, meta = load_weights(out / "one" / "last.safetensors")
    two, _ = load_weights(out / "two" / "last.safetensors")
    source, _ = load_weights(runs[2] / "best.safetensors")
    bn = meta["last_bn"]
    for key in (f"{bn}.running_mean", f"{bn}.running_var", f"{bn}.weight", f"{bn}.bias", "fc.weight", "fc.bias"):
        assert not torch.equal(one[key], source[key]), key  # it did train
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-5)
    for key in source:  # and nothing else moved
        if not key.startswith((bn + ".", "fc.")):
            assert torch.equal(one[key], source[key]) and torch.equal(two[key], source[key]), key


@pytest.mark.slow
def test_finetune_run_folder_and_timm_loads_its_weights(runs, tiny_csv):
    results, out, _ = runs
    stdout = ok(results["one"]).stdout
    assert sum(line.startswith("epoch ") for line in stdout.splitlines()) == 2
    assert "trained resolution 32 px, as trained" in stdout and "48 px, after finetune" in stdout
    summary = json.loads((out / "one" / "finetune.json").read_text())
    assert summary["train_res"] == 32 and summary["res"] == 48 and summary["method"] == "finetune"
    assert set(summary["top1"]) == {"train_res", "before", "after"} and summary["val_images"] == 13
    # paired differences on the same 13 reported images (25 less 12 held out): the top-1 gap, in images gained and lost
    top1, differences = summary["top1"], summary["differences"]
    for a, b in (("after", "before"), ("after", "train_res"), ("before", "train_res")):
        d = differences[f"{a}_vs_{b}"]
        assert d["n"] == 13 and d["diff"] == pytest.approx(top1[a] - top1[b]) == (d["gained"] - d["lost"]) / 13
        assert d["low"] <= d["diff"] <= d["high"]
    assert differences["interval"].startswith("95% interval: paired bootstrap over the images")
    assert re.search(r"48 px, after finetune\b.*│ +[\d.]+% │ +[+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\] │ "
                     r"+[+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\] │", stdout)
    assert "vs training size (95% CI)" in stdout and "vs before (95% CI)" in stdout
    assert (out / "one" / "activations.png").stat().st_size > 10_000
    path = out / "one" / "best.safetensors"
    state, meta = load_weights(path)
    assert (meta["train_res"], meta["test_res"], meta["finetune_res"], meta["input_size"]) == (32, 48, 48, [3, 48, 48])
    assert meta["crop_pct"] == 0.875 and meta["classes"] == CLASSES

    ours, _ = load_run_model(path)
    loaded = timm.create_model("test_resnet", num_classes=3, pretrained=True, pretrained_cfg_overlay=timm_overlay(path))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), ours.eval()(x))
    config = timm.data.resolve_data_config(model=loaded)
    assert config["input_size"] == (3, 48, 48) and config["crop_pct"] == 0.875

    # the run's timm export: timm picks the new size with no flags, and gets finetune.json's "after" to the image
    assert summary["top5"]["after"] == 1.0 and summary["top5_k"] == 3  # three classes: "top-5" is top-3
    assert re.search(r"48 px, after finetune.*│ +100\.00% │ +[\d.]+ │", stdout)  # the top-3 column, then the loss
    export = out / "one" / EXPORT_DIR
    assert f"timm export: {export} (test size 48 px" in stdout
    exported = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    config = timm.data.resolve_data_config({}, model=exported, use_test_size=True)
    assert config["input_size"] == (3, 48, 48)
    transform = timm.data.create_transform(**config)
    split = load_split(tiny_csv, None, classes=exported.pretrained_cfg["label_names"])
    right = 0
    with torch.no_grad():
        for path, label in split.val:
            if path not in summary["held_out"]:  # the images "after" reports on
                with Image.open(path) as img:
                    right += exported(transform(img.convert("RGB"))[None]).argmax(1).item() == label
    assert right == round(summary["top1"]["after"] * 13)


@pytest.mark.slow
def test_res_auto_with_the_parametric_method(runs, tiny_csv):
    results, out, source = runs
    stdout = ok(results["auto"]).stdout
    assert re.search(r"--res auto: (24|32|40) px, the best of the sweep \(24, 32, 40 px\) on the 12 held-out "
                     r"validation images, the last BN's statistics re-estimated at each size on 20 training images",
                     stdout)
    reported_on = "13 validation images (the split's 25 less the held-out 12)"
    assert f"chosen on: the size: 12 held-out validation images; reported on: {reported_on}" in stdout
    summary = json.loads((out / "auto" / "finetune.json").read_text())
    assert summary["chosen_on"] == "the size: 12 held-out validation images"
    assert summary["reported_on"] == reported_on and summary["val_images"] == 13
    choice = summary["choice_sweep"]
    assert [r["size"] for r in choice] == [24, 32, 40] and {r["count"] for r in choice} == {12}
    # the highest top-1, then the lowest loss
    assert summary["res"] == max(choice, key=lambda r: (r["top1"], -r["loss"]))["size"]
    # each size scored with the last BN re-estimated there, not as the source model stands
    model, meta = load_run_model(source / "best.safetensors")
    held_out = [s for s in load_split(tiny_csv).val if s[0] in summary["held_out"]]
    untouched = sweep_lib.run_sweep(model, meta, None, [24, 32, 40], 0.875, Accelerator(cpu=True), samples=held_out)
    assert all(abs(a["loss"] - b["loss"]) > 1e-3 for a, b in zip(untouched, choice))
    assert [r["size"] for r in summary["sweep"]] == sorted({32, summary["res"]})  # the validation split: reports only
    assert summary["adaptation"]["scope"] == "feature" and summary["adaptation"]["fit_images"] == 60
    state, meta = load_weights(out / "auto" / "best.safetensors")
    assert meta["adaptation"]["kind"] == "frechet" and state[f"{ADAPTER}.test_loc"].numel() > 1
    assert "timm export: none (" in stdout and "carries a parametric adapter" in stdout  # timm would drop it
    assert not (out / "auto" / EXPORT_DIR).exists()
    model, _ = load_run_model(out / "auto" / "best.safetensors")  # what every fixres evaluation loads
    assert isinstance(model.get_submodule(ADAPTER), FrechetAdapter)
    torch.testing.assert_close(model.get_submodule(ADAPTER).test_loc, state[f"{ADAPTER}.test_loc"])


@pytest.mark.slow
def test_bn_stats_run(runs):
    results, out, source = runs
    ok(results["bn_stats"])
    summary = json.loads((out / "bn_stats" / "finetune.json").read_text())
    assert summary["method"] == "bn-stats" and summary["bn_stats_images"] == 60  # 7 batches of 8 and one of 4
    state, meta = load_weights(out / "bn_stats" / "best.safetensors")
    original, _ = load_weights(source / "best.safetensors")
    changed = {k for k in state if not torch.equal(state[k], original[k])}
    assert changed == {f"{meta['last_bn']}.{k}" for k in ("running_mean", "running_var", "num_batches_tracked")}
    assert (out / "bn_stats" / EXPORT_DIR / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def bn_runs(early_runs):
    """bn-stats where the batches do not divide the 60 training images: one batch larger than
    all of them; 2 processes x 8 (a last round of 8 + 4; started with the session by start_early)
    and 1 process x 16 (a last batch of 12), in this process."""
    root = early_runs.folders[BN_STATS_TWO]
    source = root / "source"
    started = Started()
    started.call("two", early_runs.__getitem__, BN_STATS_TWO)  # waited for in a thread: needed from here on
    started.start("whole", "finetune.py", *bn_stats_args(source, root), "--batch-size", "100", "--name", "whole",
                  in_process=True)
    started.start("one", "finetune.py", *bn_stats_args(source, root), "--batch-size", "16", "--name", "one",
                  in_process=True)
    yield started, root / "out", source
    started.collect_all()


@pytest.mark.slow
def test_bn_stats_counts_every_training_image_once(bn_runs, tiny_csv):
    results, out, source = bn_runs
    images = {name: json.loads((ok(results[name]) and out / name / "finetune.json").read_text())["bn_stats_images"]
              for name in ("whole", "two", "one")}
    assert images == {"whole": 60, "two": 60, "one": 60}
    # one batch of all 60: the statistics of the last BN's input over the training split, computed here
    state, meta = load_weights(out / "whole" / "best.safetensors")
    bn = meta["last_bn"]
    model, _ = load_run_model(source / "best.safetensors")
    inputs = []
    model.get_submodule(bn).register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    tf = eval_transform(size=40)
    batch = torch.stack([tf(open_image(path)) for path, _ in load_split(tiny_csv, classes=CLASSES).train])
    with torch.no_grad():
        model.eval()(batch)
    torch.testing.assert_close(state[f"{bn}.running_mean"], inputs[0].mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state[f"{bn}.running_var"], inputs[0].var((0, 2, 3)), atol=1e-5, rtol=1e-4)
    # 2 x 8 per round is 1 x 16, the partial last round included
    one, _ = load_weights(out / "one" / "best.safetensors")
    two, _ = load_weights(out / "two" / "best.safetensors")
    for key in (f"{bn}.running_mean", f"{bn}.running_var"):
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_train_freeze_epochs_trains_only_the_classifier_first(runs):
    results, out, source = runs
    ok(results["freeze"])
    after, meta = load_weights(out / "freeze" / "last.safetensors")
    original, _ = load_weights(source / "best.safetensors")
    assert meta["epoch"] == 1
    changed = {k for k in original if not torch.equal(after[k], original[k])}
    assert changed == {"fc.weight", "fc.bias"}  # BatchNorm statistics included: the backbone was in eval mode


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_csv):
    """finetune.py's arguments for each input it must refuse (in this process: refused before any training)."""
    root = tmp_path_factory.mktemp("bad_input")
    source = write_source_run(root / "source", "test_resnet", tiny_csv)
    no_val = root / "no_val.csv"
    no_val.write_text("".join(line.rsplit(",", 1)[0] + (",False\n" if i else ",is_val\n")
                              for i, line in enumerate(tiny_csv.read_text().splitlines())))
    junk = root / "junk.safetensors"
    save_weights(junk, {"w": torch.zeros(3)}, {})
    out = ["--output", root / "out", "--workers", "0", "--cpu"]
    save_weights(root / "out" / "taken" / "best.safetensors", {"w": torch.zeros(1)}, {})
    return {
        "res_zero": ["--checkpoint", source, "--res", "0"],
        "method": ["--checkpoint", source, "--method", "distill"],
        "aug": ["--checkpoint", source, "--aug", "autoaugment"],
        "junk": ["--checkpoint", junk, "--res", "40", *out],
        "taken": ["--checkpoint", source, "--res", "40", "--method", "bn-stats", "--name", "taken", *out],
        "no_val": ["--checkpoint", source, "--data", no_val, "--images", tiny_csv.parent / "images", *out],
    }


@pytest.mark.parametrize("case, message", [
    ("res_zero", "--res must be > 0, got 0"),
    ("method", "argument --method: invalid choice: 'distill'"),
    ("aug", "argument --aug: invalid choice: 'autoaugment'"),
    ("junk", "not a classifier trained by fixres"),
    ("no_val", "finetune.py measures before and after on the validation split, and there is none"),
    ("taken", "taken already holds a run; choose another --name"),
])
def test_bad_input_is_one_line(bad_inputs, capsys, case, message):
    assert message in error_line(run_in_process("finetune.py", *bad_inputs[case], capsys=capsys))


# ----------------------------------------------------------------------------- a parametric run reloaded

@pytest.fixture(scope="module")
def parametric_of_trained(tmp_path_factory, trained_run):
    """A parametric run of a tiny model trained by train.py (--epochs 2), then sweep.py of that run at its size."""
    root = tmp_path_factory.mktemp("parametric")
    shutil.copytree(ok(trained_run[0]) and trained_run[1], root / "trained")
    ok(run_in_process("finetune.py", "--no-plots", "--checkpoint", root / "trained", "--res", "40", "--method", "parametric",
                      "--workers", "0", "--output", root, "--name", "parametric"))
    ok(run_in_process("sweep.py", "--no-plots", "--checkpoint", root / "parametric", "--sizes", "40", "--workers", "0"))
    return root / "parametric"


@pytest.mark.slow
def test_sweep_of_a_parametric_run_evaluates_the_adapted_model(parametric_of_trained):
    summary = json.loads((parametric_of_trained / "finetune.json").read_text())
    swept = {r["size"]: r for r in json.loads((parametric_of_trained / "sweep.json").read_text())["rows"]}
    assert summary["loss"]["after"] != pytest.approx(summary["loss"]["before"], rel=1e-3)  # the adapter changes outputs
    # the run's weights as every fixres evaluation loads them: sweep.py's numbers on all 25 images, and
    # finetune.py's "after" on the 13 it reports on (the 12 held out chose nothing here, but are held out)
    model, meta = load_run_model(parametric_of_trained / "best.safetensors")
    split = load_split(json.loads((parametric_of_trained / "config.json").read_text())["data"], classes=meta["classes"])
    reported = [s for s in split.val if s[0] not in summary["held_out"]]
    on_all, on_reported = (sweep_lib.run_sweep(model, meta, split, [40], summary["crop_pct"], Accelerator(cpu=True),
                                               samples=samples)[0] for samples in (split.val, reported))
    assert swept[40]["top1"] == on_all["top1"] and swept[40]["loss"] == pytest.approx(on_all["loss"], rel=1e-6)
    assert len(reported) == 13 == summary["val_images"]
    assert on_reported["top1"] == summary["top1"]["after"]
    assert on_reported["loss"] == pytest.approx(summary["loss"]["after"], rel=1e-6)


@pytest.mark.slow
def test_a_parametric_run_is_not_adapted_twice(parametric_of_trained, tmp_path, capsys):
    argv = ["--checkpoint", str(parametric_of_trained), "--res", "40", "--method", "parametric", "--cpu",
            "--output", str(tmp_path)]
    assert run_main(script_main("finetune.py"), argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --method parametric: {parametric_of_trained / 'best.safetensors'} carries a parametric adapter "
        f"already; adapt the run it came from ({parametric_of_trained.parent / 'trained' / 'best.safetensors'})"]
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.slow
def test_without_checkpoint_the_newest_train_run(parametric_of_trained, tmp_path, monkeypatch, capsys):
    """Beside the train.py run, the folder holds a newer fine-tuning run: not what to fine-tune."""
    runs = parametric_of_trained.parent
    argv = ["--res", "40", "--method", "bn-stats", "--cpu", "--workers", "0", "--output", str(runs), "--name", "newest"]
    assert run_main(script_main("finetune.py"), argv) == 0
    assert f"--checkpoint not given: using the newest train.py run {runs / 'trained'}\n" in capsys.readouterr().out
    assert json.loads((runs / "newest" / "finetune.json").read_text())["source"] == str(runs / "trained" / "best.safetensors")

    monkeypatch.chdir(tmp_path)  # no --output: the source is looked for under runs/, and there is none
    assert run_main(script_main("finetune.py"), ["--res", "40", "--cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --checkpoint not given, and runs/ holds no train.py run (a folder with config.json and "
        "best.safetensors or last.safetensors): give --checkpoint"]


def test_a_run_of_the_built_in_data_gets_the_built_in_fine_tuning_preset(tmp_path, tiny_csv, monkeypatch):
    """The built-in data has 125 steps an epoch, not ImageNet's thousands: finetune.py of such a
    run uses FINETUNE_SHAPES_PRESET for what the command line does not give; other runs keep
    the reference defaults."""
    from fixres import shapes
    from fixres.presets import FINETUNE_SHAPES_PRESET
    monkeypatch.setattr(shapes, "ensure_shapes", lambda **kw: tiny_csv)  # stands in for the generated images
    built_in = write_source_run(tmp_path / "built_in", "test_resnet", tiny_csv)
    config = json.loads((built_in / "config.json").read_text())
    write_json_atomic(built_in / "config.json", {**config, "data": None,  # as train.py writes it without --data
                                                 "shapes": {**shapes.builtin_params(0), "csv": str(tiny_csv)}})
    user = write_source_run(tmp_path / "user", "test_resnet", tiny_csv)
    common = dict(res=40, output=str(tmp_path / "out"), workers=0, cpu=True, batch_size=30)

    def used(source, name, **given):
        finetune_lib.finetune(dict(checkpoint=str(source), name=name, **common, **given))
        run = json.loads((tmp_path / "out" / name / "config.json").read_text())
        return {k: run[k] for k in FINETUNE_SHAPES_PRESET}

    assert used(built_in, "preset") == FINETUNE_SHAPES_PRESET
    assert used(built_in, "given", epochs=1) == {**FINETUNE_SHAPES_PRESET, "epochs": 1}
    defaults = FinetuneConfig()
    assert used(user, "user", epochs=1) == {"lr": defaults.lr, "epochs": 1}
