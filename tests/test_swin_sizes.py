"""Swin at any size. timm's Swin is built for one img_size (strict): its windows and
relative-position tables depend on it. train.py builds it at --train-res; sweep.py runs it at
other sizes as timm's dynamic_img_size does (the trained windows, padded to: the network timm
builds from the export); finetune.py --res N rebuilds it at N as timm's create_model(img_size=N)
builds it from the same weights (its checkpoint filter resizes the relative-position tables), and
the export loads in timm at N. Sizes off its 4 px patch are dropped or refused. torchvision's Swin pads to its
windows: it takes any size (tests/test_family_matrix.py runs a small member
of swin_t's class, with its patch and windows, end to end at 32, 38, 50 and 56 px).

    python -m pytest -q tests/test_swin_sizes.py      # the quick ones: a few seconds
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
from tests.test_vit_sizes import ok, real_images

SWIN = "swin_tiny_patch4_window7_224"
# two stages, a shifted block in each; its window (7) at 32 px is cut to 7 and 4, at 48 px to 7 and 6
SMALL = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2))
SMALL_ARGS = ["embed_dim=16", "depths=(2,2)", "num_heads=(1,2)"]
RECORDED = dict(embed_dim=16, depths=[2, 2], num_heads=[1, 2])  # as JSON keeps them
CLASSES = sorted(COLOURS)


def timm_swin_at(size: int, weights) -> torch.nn.Module:
    """timm's own: a Swin built at `size` px, the weights through its checkpoint filter."""
    return timm.create_model(SWIN, img_size=size, pretrained=True, num_classes=len(CLASSES), **SMALL,
                             pretrained_cfg_overlay=dict(file=str(weights), num_classes=len(CLASSES))).eval()


def test_a_timm_swin_trained_at_32_px_is_swept_and_rebuilt_as_timm_does(tmp_path, tiny_csv):
    """Swept at other sizes: timm's own Swin built at 32 px with dynamic_img_size (its windows
    kept, padded to; the export's network). Rebuilt at 48 px (finetune.py --res 48): timm's
    create_model(img_size=48) from the same weights, its checkpoint filter resizing the tables."""
    from fixres.model_sizes import resize_model
    torch.manual_seed(0)
    trained = create_model(SWIN, len(CLASSES), model_kwargs={**SMALL, "img_size": 32})
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    cfg = TrainConfig(data="x.csv", model=SWIN, train_res=32, model_kwargs={**SMALL, "img_size": 32})
    save_weights(tmp_path / "best.safetensors", state, weights_meta(cfg, CLASSES))
    save_file(state, str(tmp_path / "plain.safetensors"))
    ours, _ = load_run_model(tmp_path)
    dynamic = timm.create_model(SWIN, img_size=32, dynamic_img_size=True, num_classes=len(CLASSES), **SMALL).eval()
    dynamic.load_state_dict(state)
    with torch.inference_mode():  # as sweeps run it: one model, every size
        for size in (48, 64, 32):
            images = real_images(tiny_csv, size)
            torch.testing.assert_close(ours.eval()(images), dynamic(images), rtol=1e-5, atol=1e-5)
    assert resize_model(ours, 48)
    images = real_images(tiny_csv, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), timm_swin_at(48, tmp_path / "plain.safetensors")(images),
                                   rtol=1e-5, atol=1e-5)


def test_swin_weights_of_another_size_load_as_timms_checkpoint_filter_resizes_them(tmp_path, tiny_csv):
    torch.manual_seed(0)
    save_file(create_model(SWIN, 3, model_kwargs={**SMALL, "img_size": 32}).state_dict(), str(tmp_path / "w.safetensors"))
    ours = create_model(SWIN, 3, weights=tmp_path / "w.safetensors", model_kwargs={**SMALL, "img_size": 48}).eval()
    images = real_images(tiny_csv, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), timm_swin_at(48, tmp_path / "w.safetensors")(images),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # trains, sweeps, fine-tunes and exports end to end
def test_a_timm_swin_trains_sweeps_finetunes_and_exports_at_other_sizes(tmp_path, tiny_csv, capsys):
    runs = tmp_path / "runs"
    base = ["--data", tiny_csv, "--model", SWIN, "--model-kwargs", *SMALL_ARGS, "--batch-size", "16", "--workers", "0"]
    refused = run_in_process("train.py", *base, "--train-res", "34", "--output", runs, capsys=capsys)
    assert error_line(refused) == f"error: --train-res 34: {SWIN} takes multiples of its 4 px patch (nearest: 32, 36)"
    assert not runs.exists()
    # two epochs evaluated at 48 px: the second trains after an evaluation at another size
    ok(run_in_process("train.py", *base, "--train-res", "32", "--test-res", "48", "--epochs", "2", "--output", runs,
                      "--name", "swin", capsys=capsys))
    run = runs / "swin"
    assert load_weights(run / "best.safetensors")[1]["model_kwargs"] == {**RECORDED, "img_size": 32}
    assert (run / "timm" / "model.safetensors").is_file()  # its outputs at the test size, 48 px, are timm's
    swept = ok(run_in_process("sweep.py", "--no-plots", "--checkpoint", run, "--sizes", "34", "48", "64", "--workers", "0",
                              capsys=capsys))
    assert f"dropped 34 px: {SWIN} takes multiples of its 4 px patch" in swept.stdout
    assert [row["size"] for row in json.loads((run / "sweep.json").read_text())["rows"]] == [32, 48, 64]

    refused = run_in_process("finetune.py", "--checkpoint", run, "--res", "50", "--method", "finetune",
                             "--output", tmp_path / "out", capsys=capsys)
    assert error_line(refused) == f"error: --res 50: {SWIN} takes multiples of its 4 px patch (nearest: 48, 52)"
    ok(run_in_process("finetune.py", "--no-plots", "--checkpoint", run, "--res", "48", "--method", "finetune", "--epochs", "1",
                      "--batch-size", "16", "--workers", "0", "--output", tmp_path / "out", "--name", "ft",
                      capsys=capsys))
    tuned = tmp_path / "out" / "ft"
    state, meta = load_weights(tuned / "best.safetensors")
    assert meta["model_kwargs"] == {**RECORDED, "img_size": 48}
    # its weights are those of the network timm builds at 48 px (a stage-1 window of 6: a 11 x 11 table)
    save_file(state, str(tmp_path / "tuned.safetensors"))
    theirs = timm_swin_at(48, tmp_path / "tuned.safetensors")
    assert theirs.layers[1].blocks[0].attn.relative_position_bias_table.shape == (11 * 11, 2)
    assert set(theirs.state_dict()) == set(state) | {k for k in theirs.state_dict() if k.endswith("_index")}
    exported = timm.create_model(f"local-dir:{tuned / 'timm'}", pretrained=True).eval()
    assert exported.pretrained_cfg["input_size"] == (3, 48, 48)
    ours, _ = load_run_model(tuned)
    images = real_images(tiny_csv, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(images), theirs(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exported(images), theirs(images), rtol=1e-5, atol=1e-5)
