"""train.py --for-test-res N: a test size fixed by deployment decides the training size, which
sweep.py and finetune.py then know.

    python -m pytest -q tests/test_for_test_res.py
"""
import json

import pytest
import torch
from rich.console import Console

from fixres.export import write_best_size
from fixres.fileio import read_metadata, save_weights
from fixres.models import create_model, nearest_size_it_takes
from fixres.resolution import recommended_test_res
from tests.conftest import error_line, run_in_process

TINY = ["--model", "test_resnet", "--batch-size", "16", "--workers", "0", "--epochs", "1"]


@pytest.mark.parametrize("given", [["--train-res", "32"], ["--test-res", "40"]])
def test_for_test_res_with_a_size_is_refused(tmp_path, tiny_csv, capsys, given):
    result = run_in_process("train.py", "--data", tiny_csv, *TINY, "--for-test-res", "40", *given,
                            "--output", tmp_path, capsys=capsys)
    assert "--for-test-res N chooses the training size and tests at N" in error_line(result)
    assert not any(tmp_path.iterdir())  # refused before a run folder was started


def test_a_size_the_model_cannot_take_is_refused_under_its_own_option(tmp_path, tiny_csv, capsys):
    result = run_in_process("train.py", "--data", tiny_csv, *TINY, "--model", "vit_tiny_patch16_224",
                            "--for-test-res", "50", "--output", tmp_path, capsys=capsys)
    assert error_line(result) == ("error: --for-test-res 50: vit_tiny_patch16_224 takes multiples of its 16 px patch "
                                  "(nearest: 48, 64)")


def test_the_training_size_uses_the_crop_pct_of_the_weights_started_from(tmp_path, tiny_csv, capsys):
    """--weights whose metadata says crop_pct 1.0: Resize(40) + CenterCrop(40) at test, so 28 px
    (0.708 x 40), not the 32 px of the default 0.875 (crop_pct is resolved before the size)."""
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_weights(weights, create_model("test_resnet", 3).state_dict(), {"model": "test_resnet", "crop_pct": 1.0})
    result = run_in_process("train.py", "--data", tiny_csv, *TINY, "--weights", weights, "--for-test-res", "40",
                            "--output", tmp_path / "runs", "--name", "run", capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--for-test-res 40: training at 28 px" in result.stdout and "crop_pct 1," in result.stdout
    config = json.loads((tmp_path / "runs" / "run" / "config.json").read_text())
    assert (config["train_res"], config["test_res"], config["crop_pct"]) == (28, 40, 1.0)


def test_a_vit_trains_at_the_nearest_multiple_of_its_patch():
    # vit_tiny_patch16_224 takes multiples of 16: 52 px (the apparent-size answer for a 64 px test) -> 48
    assert nearest_size_it_takes("vit_tiny_patch16_224", None, 52) == 48
    assert nearest_size_it_takes("vit_tiny_patch16_224", None, 56) == 64  # a tie goes up
    assert nearest_size_it_takes("test_resnet", None, 45) == 45  # a CNN takes any size


@pytest.mark.slow
def test_train_for_a_test_size_then_finetune_there(tmp_path, tiny_csv, capsys):
    trained = run_in_process("train.py", "--data", tiny_csv, *TINY, "--for-test-res", "40", "--output", tmp_path,
                             "--name", "run")
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    # crop_pct 0.875: Resize(45) + CenterCrop(40) shows objects as a 32 px RandomResizedCrop does (E[sigma] 0.708)
    assert (config["train_res"], config["test_res"], config["for_test_res"]) == (32, 40, 40)
    assert abs(recommended_test_res(train_res=32, crop_pct=0.875) - 40) <= 1  # the forward prediction comes back
    assert "--for-test-res 40: training at 32 px" in trained.stdout
    assert "(n=25) " in trained.stdout.split("epoch   1")[1]  # validated (at 40 px: the weights say so)
    assert read_metadata(run / "best.safetensors")["test_res"] == 40

    swept = run_in_process("sweep.py", "--no-plots", "--checkpoint", run, "--sizes", "24", "--no-speed", "--workers", "0")
    assert swept.returncode == 0, swept.stderr[-3000:]
    summary = json.loads((run / "sweep.json").read_text())
    assert [r["size"] for r in summary["rows"]] == [24, 32, 40] and summary["meta"]["target_test_res"] == 40
    assert "target: 40 px (train.py --for-test-res 40), top-1 " in swept.stdout

    # what the sizes were chosen for cannot change on --resume (the run would say 64, trained for 40)
    moved = run_in_process("train.py", "--resume", run, "--for-test-res", "64", capsys=capsys)
    assert "the run was trained with --for-test-res 40, not 64" in error_line(moved)

    # a budget the size trained for cannot meet is refused in one line, before any fine-tuning
    over = run_in_process("finetune.py", "--checkpoint", run, "--max-latency-ms", "1e-6", "--name", "over",
                          capsys=capsys)
    assert error_line(over).startswith("error: --res auto: 40 px, the test size the source run was trained for")
    assert not (tmp_path / "over").exists()

    # a test crop recorded by sweep.py --write-best is not what finetune.py uses: it says so
    write_best_size(run / "best.safetensors", run, 40, 1.0, Console(quiet=True))
    tuned = run_in_process("finetune.py", "--no-plots", "--checkpoint", run, "--epochs", "1", "--batch-size", "16", "--workers", "0",
                           "--choice-images", "10", "--name", "ft")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "--res auto: 40 px, the test size the source run was trained for" in tuned.stdout
    assert "crop_pct 0.875, the source's: every size is evaluated and fine-tuned at it, not at the test_crop_pct 1 " \
        in " ".join(tuned.stdout.split())
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["res"] == 40
