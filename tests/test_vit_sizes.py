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

from fixres.checkpoint import load_weights, save_weights
from fixres.config import TrainConfig
from fixres.models import create_model, load_run_model
from fixres.preprocessing import weights_meta
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

    swept = ok(run_in_process("sweep.py", "--checkpoint", run, "--sizes", "32", "40", "48", "--workers", "0",
                              capsys=capsys))
    assert "dropped 40 px: vit_tiny_patch16_224 takes multiples of its 16 px patch" in swept.stdout
    rows = json.loads((run / "sweep.json").read_text())["rows"]
    assert [row["size"] for row in rows] == [32, 48]

    refused = run_in_process("finetune.py", "--checkpoint", run, "--res", "40", "--method", "finetune",
                             "--output", tmp_path / "out", capsys=capsys)
    assert error_line(refused) == ("error: --res 40: vit_tiny_patch16_224 takes multiples of its 16 px patch "
                                   "(nearest: 32, 48)")
    assert not (tmp_path / "out").exists()

    ok(run_in_process("finetune.py", "--checkpoint", run, "--res", "48", "--method", "finetune", "--epochs", "1",
                      "--batch-size", "16", "--workers", "0", "--output", tmp_path / "out", "--name", "ft",
                      capsys=capsys))
    tuned = tmp_path / "out" / "ft"
    auto = ok(run_in_process("finetune.py", "--checkpoint", run, "--res", "auto", "--sizes", "40", "48",
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
