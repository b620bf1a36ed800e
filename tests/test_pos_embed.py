"""finetune.py --train-pos-embed: a ViT's absolute position embedding trains with the last norm
and the classifiers (as DeiT's fine-tuning at a new size trains it), without weight decay (timm's
no_weight_decay lists it). With it exactly those change; without it the position embedding is
only resampled to the new size, as timm resamples it. finetune.json's "adapted", the weights'
metadata and the `adapts:` line name it, the timm export of such a run loads in timm and gives
finetune.json's "after", a resumed run continues it, and the option is refused in one line where it
does not apply.

    python -m pytest -q tests/test_pos_embed.py     # about 12 s on 2 loaded CPU cores
"""
import json

import pytest
import timm
import torch

from fixres import finetune as finetune_lib
from fixres import run as run_lib
from fixres.adapt import find_position_embedding, prepare_for_finetuning
from fixres.data import load_split
from fixres.fileio import load_weights
from fixres.model_sizes import resize_model
from fixres.models import create_model
from tests.conftest import error_line, run_in_process
from tests.test_families import CLASSES, DEIT, DEIT_KWARGS, timm_losses, write_source_run
from tests.test_swin_sizes import SMALL as SWIN_SMALL
from tests.test_swin_sizes import SWIN
from tests.test_vit_sizes import TV_SMALL

# a hybrid ViT: timm's ResNet stem, then one block on 2x2 patches of its maps (8 px patches in pixels)
HYBRID = "vit_tiny_r_s16_p8_224"
HYBRID_KWARGS = dict(patch_size=2, embed_dim=32, depth=1, num_heads=2, global_pool="avg", class_token=False)
# (model, its --model-kwargs at 32 px, its last norm, its classifiers)
VITS = [(DEIT, {"img_size": 32, **DEIT_KWARGS}, "norm", ["head", "head_dist"]),
        (HYBRID, {"img_size": 32, **HYBRID_KWARGS}, "fc_norm", ["head"])]


def test_the_position_embedding_is_the_parameter_with_a_vector_per_patch():
    """timm's ViTs (class, distillation or register tokens embedded or not): the name timm's own
    no_weight_decay gives; torchvision's ViT: encoder.pos_embedding; none in a Swin (relative
    tables), a BEiT, a ViT built without one, a CNN."""
    with torch.device("meta"):  # shapes only
        timm_vits = [timm.create_model(DEIT, **DEIT_KWARGS), timm.create_model(HYBRID, **HYBRID_KWARGS),
                     timm.create_model("test_vit4"),  # a register token, not embedded
                     timm.create_model("vit_tiny_patch16_224", depth=1, reg_tokens=4),
                     # as many register tokens as patches (2x2), embedded or not: not the tokens
                     timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32, reg_tokens=4),
                     timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32, reg_tokens=4, no_embed_class=True),
                     timm.create_model("vit_tiny_patch16_224", depth=1, img_size=48, reg_tokens=16)]
        for vit in timm_vits:
            assert find_position_embedding(vit) == "pos_embed"
            assert "pos_embed" in vit.no_weight_decay()
        from torchvision.models import VisionTransformer
        assert find_position_embedding(VisionTransformer(image_size=32, **TV_SMALL)) == "encoder.pos_embedding"
        for other in (timm.create_model(SWIN, **SWIN_SMALL), timm.create_model("beit_base_patch16_224", depth=1),
                      timm.create_model("vit_tiny_patch16_224", depth=1, pos_embed="none"),
                      timm.create_model("test_resnet")):
            assert find_position_embedding(other) is None, type(other).__name__


@pytest.fixture
def optimizer_decay(monkeypatch) -> dict:
    """The weight decay the run's own optimizer gives each parameter it trains, read back from its
    groups (filled in when a run builds it)."""
    decay = {}
    real = run_lib.build_optimizer

    def recording(named_params, cfg, **kwargs):
        named = list(named_params)
        optimizer = real(named, cfg, **kwargs)
        names = {id(p): n for n, p in named}
        decay.update({names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]})
        return optimizer
    monkeypatch.setattr(run_lib, "build_optimizer", recording)
    return decay


def fine_tune(tmp_path, model_name, model_kwargs, tiny_csv, optimizer_decay, **options) -> tuple[dict, dict]:
    """A 1-epoch fine-tune at 48 px of an untrained source run at 32 px; (finetune.json, the weight
    decay the optimizer gave each trained parameter)."""
    source = write_source_run(tmp_path / "source", model_name, tiny_csv, model_kwargs=model_kwargs)
    summary = finetune_lib.finetune(dict(checkpoint=str(source), res=48, epochs=1, batch_size=30,
                                                   output=str(tmp_path / "out"), workers=0, cpu=True, name="ft",
                                                   **options))
    return summary, optimizer_decay


def test_train_py_does_not_decay_what_timm_lists_in_no_weight_decay(tmp_path, tiny_csv, capsys, optimizer_decay):
    """A ViT trained from scratch: its position embedding undecayed, as timm's train.py leaves it
    (its no_weight_decay()); weight matrices decayed, norms and biases not."""
    result = run_in_process("train.py", "--data", tiny_csv, "--model", HYBRID, "--model-kwargs",
                            *[f"{k}={v}" for k, v in HYBRID_KWARGS.items()], "--train-res", "32", "--epochs", "1",
                            "--batch-size", "30", "--workers", "0", "--cpu", "--output", tmp_path, "--name", "vit",
                            capsys=capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    assert optimizer_decay["pos_embed"] == 0.0
    assert optimizer_decay["head.weight"] == optimizer_decay["blocks.0.attn.qkv.weight"] == 0.1  # the default
    assert optimizer_decay["fc_norm.weight"] == optimizer_decay["head.bias"] == 0.0


def timm_at(model_name, model_kwargs, weights, size: int):
    """timm's own model at `size` px from `weights` of another size: its checkpoint filter resamples pos_embed."""
    return timm.create_model(model_name, pretrained=True, num_classes=len(CLASSES), **{**model_kwargs, "img_size": size},
                             pretrained_cfg_overlay={"file": str(weights), "num_classes": len(CLASSES)})


@pytest.mark.parametrize("train_pos_embed", [True, False], ids=["with", "without"])
@pytest.mark.parametrize("model_name, model_kwargs, norm, heads", VITS, ids=["deit", "hybrid"])
def test_the_position_embedding_trains_with_the_option_and_is_only_resampled_without(
        tmp_path, tiny_csv, capsys, optimizer_decay, model_name, model_kwargs, norm, heads, train_pos_embed):
    summary, decay = fine_tune(tmp_path, model_name, model_kwargs, tiny_csv, optimizer_decay,
                               train_pos_embed=train_pos_embed)
    # every tensor against timm's model at 48 px from the source weights: the source's own, pos_embed resampled
    reference = timm_at(model_name, model_kwargs, tmp_path / "source" / "best.safetensors", 48).state_dict()
    tuned, meta = load_weights(tmp_path / "out" / "ft" / "last.safetensors")
    assert set(tuned) == set(reference)
    changed = {k for k in reference if not torch.equal(reference[k], tuned[k])}
    trained = {f"{m}.{p}" for m in (norm, *heads) for p in ("weight", "bias")}
    assert changed == trained | ({"pos_embed"} if train_pos_embed else set())
    assert set(decay) == changed  # what trains is what the optimizer holds: no decay on norms, biases, pos_embed
    assert {n for n, wd in decay.items() if wd} == {f"{h}.weight" for h in heads}

    adapted = {"layer": norm, "kind": "LayerNorm", "classifier": heads[0], "classifiers": heads,
               **({"pos_embed": "pos_embed"} if train_pos_embed else {})}
    assert summary["adapted"] == meta["adapted"] == adapted
    assert json.loads((tmp_path / "out" / "ft" / "finetune.json").read_text())["adapted"] == adapted
    classifiers = " and ".join(heads)
    also = ", the position embedding pos_embed and" if train_pos_embed else " and"
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("adapts: ")] == [
        f"adapts: {norm} (LayerNorm, no running statistics: its weight and bias train){also} the "
        f"classifier{'s' if len(heads) > 1 else ''} {classifiers}"]
    if not train_pos_embed:
        return
    # its timm export, built by timm at the fine-tune size with the trained pos_embed, gives finetune.json's "after"
    export = timm.create_model(f"local-dir:{tmp_path / 'out' / 'ft' / 'timm'}", pretrained=True)
    assert export.pretrained_cfg["input_size"] == (3, 48, 48)
    best, _ = load_weights(tmp_path / "out" / "ft" / "best.safetensors")
    torch.testing.assert_close(export.pos_embed.detach(), best["pos_embed"], rtol=0, atol=0)
    split = load_split(tiny_csv, None, classes=CLASSES)
    reported = [s for s in split.val if s[0] not in set(summary["held_out"])]
    losses = timm_losses(export, reported, timm.data.resolve_data_config({}, model=export, use_test_size=True))
    assert summary["loss"]["after"] == pytest.approx(losses.mean().item(), rel=1e-4)
    # sweep.py on the run, and its weights as --weights into a model of another size, as timm loads them there
    swept = run_in_process("sweep.py", "--no-plots", "--checkpoint", tmp_path / "out" / "ft", "--sizes", "48", "64", "--workers", "0",
                           "--cpu", "--speed-repeats", "1", capsys=capsys)
    assert swept.returncode == 0, swept.stderr[-3000:]
    ours = create_model(model_name, len(CLASSES), weights=tmp_path / "out" / "ft" / "best.safetensors",
                        model_kwargs={**model_kwargs, "img_size": 64})
    theirs = timm_at(model_name, model_kwargs, tmp_path / "out" / "ft" / "best.safetensors", 64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(images), theirs.eval()(images), rtol=1e-5, atol=1e-5)


def test_a_torchvision_vit_trains_its_encoder_pos_embedding_at_the_new_size():
    """resize_model gives torchvision's ViT a new encoder.pos_embedding at the fine-tune size: that
    one trains, with the last norm and the classifier, and nothing else."""
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, **TV_SMALL)
    resize_model(model, 48)
    name, _ = prepare_for_finetuning(model, input_size=48, train_pos_embed=True)
    assert name == "encoder.ln"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"encoder.pos_embedding", "encoder.ln.weight", "encoder.ln.bias", "heads.head.weight",
                         "heads.head.bias"}
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts it at 0: no gradient would reach back
    model(torch.randn(2, 3, 48, 48)).sum().backward()
    assert model.encoder.pos_embedding.shape == (1, 37, 32) and model.encoder.pos_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["bn-stats", "parametric"])
def test_other_methods_refuse_it_in_one_line(tmp_path, capsys, method):
    out = tmp_path / "out"
    line = error_line(run_in_process("finetune.py", "--checkpoint", tmp_path / "any", "--method", method,
                                     "--train-pos-embed", "--output", out, "--cpu", capsys=capsys))
    assert line.split(": error: ", 1)[1] == (f"--train-pos-embed goes with --method finetune (--method {method} "
                                             f"trains no parameters)")
    assert not out.exists()


@pytest.mark.parametrize("model_name, model_kwargs", [(SWIN, {"img_size": 32, **SWIN_SMALL}), ("test_resnet", None)],
                         ids=["swin", "cnn"])
def test_a_model_without_an_absolute_position_embedding_is_refused_in_one_line(tmp_path, tiny_csv, capsys, model_name,
                                                                                model_kwargs):
    source = write_source_run(tmp_path / "source", model_name, tiny_csv, model_kwargs=model_kwargs)
    out = tmp_path / "out"
    line = error_line(run_in_process("finetune.py", "--checkpoint", source, "--train-pos-embed", "--res", "48",
                                     "--output", out, "--workers", "0", "--cpu", capsys=capsys))
    assert line == f"error: --train-pos-embed: {model_name} has no absolute position embedding"
    assert not out.exists()  # refused before any work


def test_a_resumed_fine_tune_trains_its_position_embedding_as_an_uninterrupted_one(tmp_path, tiny_csv):
    """Stopped after an epoch and resumed: the config brings the option back, and the optimizer's
    state (the position embedding in its no-decay group) loads into the same groups."""
    source = write_source_run(tmp_path / "source", DEIT, tiny_csv, model_kwargs={"img_size": 32, **DEIT_KWARGS})
    common = dict(checkpoint=str(source), res=48, epochs=2, batch_size=30, workers=0, cpu=True, output=str(tmp_path),
                  train_pos_embed=True)
    whole = finetune_lib.finetune(dict(**common, name="whole"))
    assert finetune_lib.finetune(dict(**common, name="parts", stop_after=1))["unfinished"]
    parts = finetune_lib.finetune(dict(resume=str(tmp_path / "parts")))
    assert parts["adapted"]["pos_embed"] == "pos_embed" and parts["loss"] == whole["loss"]
    whole_weights, _ = load_weights(tmp_path / "whole" / "last.safetensors")
    parts_weights, _ = load_weights(tmp_path / "parts" / "last.safetensors")
    assert all(torch.equal(whole_weights[k], parts_weights[k]) for k in whole_weights)


def test_train_py_leaves_undecayed_the_patterns_timms_no_weight_decay_gives(tmp_path, tiny_csv, capsys,
                                                                            optimizer_decay):
    """XCiT lists "pos_embed.*" (its position encoder's parameters): every one of them undecayed, as
    timm's param_groups_weight_decay leaves them; its other weight matrices decayed."""
    assert "pos_embed.*" in timm.create_model("xcit_nano_12_p16_224", depth=1).no_weight_decay()
    result = run_in_process("train.py", "--data", tiny_csv, "--model", "xcit_nano_12_p16_224", "--model-kwargs",
                            "depth=1", "--train-res", "32", "--epochs", "1", "--batch-size", "30", "--workers", "0",
                            "--cpu", "--output", tmp_path, "--name", "xcit", capsys=capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    encoder = {n: wd for n, wd in optimizer_decay.items() if n.startswith("pos_embed.")}
    assert encoder and set(encoder.values()) == {0.0}
    assert optimizer_decay["head.weight"] == 0.1
