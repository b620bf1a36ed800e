"""A strict-size timm ViT (vit_tiny_patch16_224, built for one image size) at any size:
train.py builds it at --train-res, sweep.py and finetune.py run it at other sizes with the
position embedding resampled as timm resamples it, and the export loads in timm at the
fine-tuned size. Sizes that are not a multiple of the 16 px patch are dropped or refused.

    python -m pytest -q tests/test_vit_sizes.py      # about 8 s on 2 CPU cores (the slow one 5 s)
"""
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from fixres.config import TrainConfig
from fixres.fileio import load_weights, save_weights
from fixres.models import create_model
from fixres.preprocessing import weights_meta
from fixres.trained_model import load_run_model
from tests.conftest import COLOURS, error_line, run_in_process

VIT = "vit_tiny_patch16_224"
CLASSES = sorted(COLOURS)


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_weights_trained_at_32_px_run_at_48_as_timms_own_resampling_gives(tmp_path):
    """A run trained at 32 px evaluated at 48 px gives what timm gives when it loads the same
    weights into a ViT built at 48 px (its checkpoint filter resamples pos_embed)."""
    torch.manual_seed(0)
    trained = create_model(VIT, len(CLASSES), model_kwargs={"img_size": 32})
    cfg = TrainConfig(data="x.csv", model=VIT, train_res=32, model_kwargs={"img_size": 32})
    save_weights(tmp_path / "best.safetensors", trained.state_dict(), weights_meta(cfg, CLASSES))
    save_file(trained.state_dict(), str(tmp_path / "plain.safetensors"))
    theirs = timm.create_model(VIT, img_size=48, pretrained=True, num_classes=len(CLASSES),
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "plain.safetensors"),
                                                                   num_classes=len(CLASSES))).eval()
    ours, _ = load_run_model(tmp_path)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = theirs(images)
        torch.testing.assert_close(ours.eval()(images), expected, rtol=1e-5, atol=1e-5)
        # at its own size the run is unchanged
        small = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ours(small), trained.eval()(small), rtol=1e-5, atol=1e-5)


def test_plain_weights_from_another_size_load_as_timm_loads_them(tmp_path):
    """--weights FILE of a ViT trained at 32 px, for a run built at 48 px: pos_embed resampled
    as timm's checkpoint filter resamples it."""
    torch.manual_seed(0)
    save_file(create_model(VIT, 3, model_kwargs={"img_size": 32}).state_dict(), str(tmp_path / "w.safetensors"))
    ours = create_model(VIT, 3, weights=tmp_path / "w.safetensors", model_kwargs={"img_size": 48}).eval()
    theirs = timm.create_model(VIT, img_size=48, pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "w.safetensors"), num_classes=3)).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # trains, sweeps and fine-tunes end to end
def test_a_strict_vit_trains_sweeps_finetunes_and_exports_at_other_sizes(tmp_path, tiny_csv, capsys):
    runs = tmp_path / "runs"
    refused = run_in_process("train.py", "--data", tiny_csv, "--model", VIT, "--train-res", "40", "--output", runs,
                             capsys=capsys)
    assert error_line(refused) == "error: --train-res 40: vit_tiny_patch16_224 takes multiples of its 16 px patch (nearest: 32, 48)"
    assert not runs.exists()
    # validated at another size than it trains at (--test-res)
    ok(run_in_process("train.py", "--data", tiny_csv, "--model", VIT, "--train-res", "32", "--test-res", "48",
                      "--batch-size", "16", "--workers", "0", "--epochs", "1", "--output", runs, "--name", "vit",
                      capsys=capsys))
    run = runs / "vit"
    # built at its training size, and recorded so that every rebuild is the same network
    assert json.loads((run / "config.json").read_text())["model_kwargs"] == {"img_size": 32}
    assert load_weights(run / "best.safetensors")[1]["model_kwargs"] == {"img_size": 32}

    swept = ok(run_in_process("sweep.py", "--no-plots", "--checkpoint", run, "--sizes", "32", "40", "48", "--workers", "0",
                              capsys=capsys))
    assert "dropped 40 px: vit_tiny_patch16_224 takes multiples of its 16 px patch" in swept.stdout
    rows = json.loads((run / "sweep.json").read_text())["rows"]
    assert [row["size"] for row in rows] == [32, 48]

    refused = run_in_process("finetune.py", "--checkpoint", run, "--res", "40", "--method", "finetune",
                             "--output", tmp_path / "out", capsys=capsys)
    assert error_line(refused) == ("error: --res 40: vit_tiny_patch16_224 takes multiples of its 16 px patch "
                                   "(nearest: 32, 48)")
    assert not (tmp_path / "out").exists()

    ok(run_in_process("finetune.py", "--no-plots", "--checkpoint", run, "--res", "48", "--method", "finetune", "--epochs", "1",
                      "--batch-size", "16", "--workers", "0", "--output", tmp_path / "out", "--name", "ft",
                      capsys=capsys))
    tuned = tmp_path / "out" / "ft"
    auto = ok(run_in_process("finetune.py", "--no-plots", "--checkpoint", run, "--res", "auto", "--sizes", "40", "48",
                             "--method", "finetune", "--epochs", "1", "--batch-size", "16", "--workers", "0",
                             "--output", tmp_path / "out", "--name", "auto", capsys=capsys))
    assert "dropped 40 px: vit_tiny_patch16_224 takes multiples of its 16 px patch" in auto.stdout
    assert json.loads((tmp_path / "out" / "auto" / "finetune.json").read_text())["finetune_res"] in (32, 48)
    assert load_weights(tuned / "best.safetensors")[1]["model_kwargs"] == {"img_size": 48}
    ours, _ = load_run_model(tuned)
    theirs = timm.create_model(f"local-dir:{tuned / 'timm'}", pretrained=True).eval()
    assert theirs.pretrained_cfg["input_size"] == (3, 48, 48)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(theirs(images), ours.eval()(images), rtol=1e-5, atol=1e-5)


# torchvision's ViT (tv:vit_*): built for one image_size (its forward asserts it); its builders pass
# the widths themselves, so the fast tests build the VisionTransformer class small; the scripts
# run a small member of vit_b_16's class with its 16 px patch (tests/small_torchvision.py) in
# tests/test_family_matrix.py (slow).
TV_SMALL = dict(patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=len(CLASSES))


def tv_vit(image_size: int):
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=image_size, **TV_SMALL).eval()


def tv_vit_at(size: int, state: dict, patch: int = 8, build=tv_vit):
    """torchvision's own way to another size: a model built there, the state dict through
    its interpolate_embeddings."""
    from torchvision.models.vision_transformer import interpolate_embeddings
    model = build(size)
    model.load_state_dict(interpolate_embeddings(size, patch, dict(state)))
    return model.eval()


def real_images(csv, size: int, count: int = 6) -> torch.Tensor:
    """The dataset's validation images, preprocessed by torchvision (not fixres)."""
    from PIL import Image
    from torchvision import transforms
    pipeline = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                                   transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    names = [line.split(",")[0] for line in csv.read_text().splitlines()[1:] if line.endswith("True")][:count]
    return torch.stack([pipeline(Image.open(csv.parent / "images" / n).convert("RGB")) for n in names])


def test_a_torchvision_vit_runs_at_other_sizes_as_torchvision_builds_it_there(tiny_csv):
    """One model at 32 px serves 48 and 64 px: each forward runs what torchvision builds at that
    size from the trained weights, and leaves the weights, its size and its training as they were."""
    from fixres.model_sizes import serve_any_size
    torch.manual_seed(0)
    model = serve_any_size(tv_vit(32))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():  # as sweeps run it
        for size in (48, 64, 48):
            torch.testing.assert_close(model(real_images(tiny_csv, size)),
                                       tv_vit_at(size, trained)(real_images(tiny_csv, size)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.state_dict(), trained, rtol=0, atol=0)
    assert model.image_size == 32
    model.train()  # still trainable at its size after inference-mode forwards at others
    model(real_images(tiny_csv, 32)).sum().backward()
    assert model.encoder.pos_embedding.grad.shape == trained["encoder.pos_embedding"].shape


def test_torchvision_vit_weights_of_another_size_load_as_torchvision_resamples_them(tiny_csv):
    from fixres.models import load_weights_into
    torch.manual_seed(0)
    state = tv_vit(32).state_dict()
    ours = tv_vit(48)
    load_weights_into(ours, state, source="w.pth")
    images = real_images(tiny_csv, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), tv_vit_at(48, state)(images), rtol=1e-5, atol=1e-5)


def test_a_hybrid_vits_sizes_are_multiples_of_its_stem_stride_times_its_patch():
    """A hybrid ViT (a CNN stem, then 2x2 patches of its stride-4 maps) takes the sizes where
    timm's HybridEmbed uses every pixel: 8 px multiples, not the 2 of its `patch_size`."""
    from fixres.model_sizes import size_refusal, sizes_it_takes
    model = create_model("vit_tiny_r_s16_p8_224", 3, model_kwargs=dict(
        patch_size=2, embed_dim=32, depth=1, num_heads=2, img_size=32, dynamic_img_size=True))
    embed = model.patch_embed
    whole = [s for s in range(32, 65, 2) if embed.dynamic_feat_size((s, s))[0] * 8 == s]  # timm's token grid
    kept, line = sizes_it_takes(model, "hybrid", list(range(32, 65, 2)))
    assert kept == whole == [32, 40, 48, 56, 64]
    assert "multiples of its 8 px patch" in line
    assert "nearest: 32, 40" in size_refusal(model, "hybrid", 36)
