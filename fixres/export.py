"""A run's timm export: its weights in timm's Hugging Face Hub layout, written by timm itself.

    runs/<name>/timm/config.json        architecture, num_classes, label_names, model_args (output_stride,
                                        --model-kwargs) and pretrained_cfg: input_size (the training size; a
                                        finetune.py run's new size), test_input_size (the FixRes
                                        size), crop_pct, test_crop_pct, crop_mode ("center"),
                                        interpolation, mean, std
    runs/<name>/timm/model.safetensors  the weights, timm's own parameter names

    import timm
    model = timm.create_model("local-dir:runs/<name>/timm", pretrained=True)   # the trained weights
    config = timm.data.resolve_data_config({}, model=model, use_test_size=True)   # the FixRes size
    transform = timm.data.create_transform(**config)
    model.pretrained_cfg["label_names"]                                       # the class names

    python validate.py /data/val --model local-dir:runs/<name>/timm --pretrained   # timm's script
    huggingface-cli upload <user>/<repo> runs/<name>/timm                         # publish as is

    from transformers import AutoImageProcessor, AutoModelForImageClassification   # at input_size
    model = AutoModelForImageClassification.from_pretrained("runs/<name>/timm")

train.py and finetune.py write it from best.safetensors when they finish; `sweep.py
--write-best` writes it again with the sweep's best pair as test_input_size and test_crop_pct. timm's
`save_for_hf` writes the folder under a temporary name; it is then loaded back with
`timm.create_model("local-dir:...")` and checked (the class names, every field of the
preprocessing that resolve_data_config gives at both sizes, and the outputs on a random
batch at the test size) before it replaces the previous export. An export that timm would
build or preprocess differently from fixres is not written: ExportError says why. A
torchvision model has no timm export, and neither has a parametric fine-tuning run (timm
cannot load its adapter). config.json's model_args leave out num_classes (at its root):
transformers passes its own.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import torch

from fixres import checkpoint as ckpt
from fixres import fileio
from fixres.classifiers import ModelError
from fixres.models import TV_PREFIX
from fixres.runtime import error_reason
from fixres.trained_model import load_run_model
from fixres.transforms import IMAGENET_MEAN, IMAGENET_STD

EXPORT_DIR = "timm"  # runs/<name>/timm


class ExportError(ValueError):
    """A run that cannot be exported for timm as it evaluates in fixres; the message says why."""


# what timm's eval transform reads (resolve_data_config -> create_transform); the check compares each
TRANSFORM_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def export_data_config(meta: dict) -> dict:
    """timm's preprocessing fields for fixres weights metadata: input_size is the size the model
    was made at (train_res; finetune_res for a finetune.py run: a model fine-tuned at a size is
    a model of that size, as timm's own fine-tuned configs say), test_input_size the size to
    test at (test_res: the FixRes size, sweep.py --write-best's), crop_pct the crop ratio the
    training size was evaluated at and test_crop_pct the one to test at (--write-best's best
    pair's; without one, crop_pct).
    input_size is what a plain resolve_data_config and transformers' image processor (which
    never reads test_input_size) preprocess for. crop_mode is always given: fixres resizes
    the shorter side and crops the centre, and without it timm keeps the architecture's
    default, "squash" or "border" for some (tf_efficientnetv2_*, dm_nfnet_*, ..._384 tags)."""
    made_at = int(meta.get("finetune_res") or meta["train_res"])
    return {"input_size": (3, made_at, made_at),
            "test_input_size": (3, int(meta["test_res"]), int(meta["test_res"])),
            "crop_pct": float(meta.get("crop_pct", 0.875)),
            "test_crop_pct": float(meta.get("test_crop_pct") or meta.get("crop_pct", 0.875)),
            "crop_mode": "center", "interpolation": meta.get("interpolation", "bilinear"),
            "mean": tuple(meta.get("mean", IMAGENET_MEAN)), "std": tuple(meta.get("std", IMAGENET_STD))}


def export_timm(weights: Path, out_dir: Path) -> Path:
    """Write `out_dir` (timm's Hub layout) from a fixres weights file; returns out_dir."""
    import timm
    from timm.models import save_for_hf
    meta = fileio.read_metadata(Path(weights))
    if str(meta.get("model", "")).startswith(TV_PREFIX):
        raise ExportError(f"{meta['model']} is a torchvision model; timm exports are for timm models")
    if meta.get("adaptation"):
        raise ExportError(f"{weights} carries a parametric adapter (a Frechet map before the classifier) that "
                          f"timm cannot load: timm would evaluate the model without it. Export the source run "
                          f"with sweep.py --write-best, or fine-tune with --method finetune or bn-stats")
    if "data_config" not in inspect.signature(save_for_hf).parameters:
        raise ExportError(f"timm {timm.__version__}'s save_for_hf takes no data_config (the preprocessing to "
                          f"export): upgrade timm")
    model, meta = load_run_model(weights)
    model.eval()
    data_config = export_data_config(meta)
    # what timm's create_model needs besides the name to build the same network
    model_args = {**({"output_stride": meta["output_stride"]} if meta.get("output_stride") else {}),
                  **(meta.get("model_kwargs") or {})} or None
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = fileio.temporary_folder(out_dir.parent, out_dir.name)
    try:
        # tag and license describe the library's pretrained weights, not these
        save_for_hf(model, str(tmp), model_config={"label_names": list(meta["classes"]),
                                                   "pretrained_cfg": {"tag": None, "license": None}},
                    model_args=model_args, safe_serialization=True, data_config=data_config)
        _drop_num_classes_arg(tmp / "config.json")
        check_export(tmp, model, meta, data_config)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_export(folder: Path, model: torch.nn.Module, meta: dict, data_config: dict) -> None:
    """Load `folder` as a timm user will and compare: class names, the preprocessing at the
    test and the training size, and the outputs on a random batch at the test size."""
    import timm
    try:
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except Exception as err:
        raise ExportError(f"timm cannot load the export ({error_reason(err)})") from None
    if list(loaded.pretrained_cfg.get("label_names") or []) != list(meta["classes"]):
        raise ExportError("timm's loaded model does not carry the class names")
    for use_test_size, prefix in ((True, "test_"), (False, "")):
        got = timm.data.resolve_data_config({}, model=loaded, use_test_size=use_test_size)
        # at the test size timm reads test_input_size and test_crop_pct
        want = {key: data_config[prefix + key if key in ("input_size", "crop_pct") else key] for key in TRANSFORM_KEYS}
        differs = [k for k, v in want.items() if (tuple(got[k]) if isinstance(v, tuple) else got[k]) != v]
        if differs:
            raise ExportError(f"timm resolves another preprocessing from the export ({', '.join(differs)}: "
                              f"{ {k: got[k] for k in differs} } instead of { {k: want[k] for k in differs} })")
    size = data_config["test_input_size"][1]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = model(x), loaded(x)
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
        raise ExportError(f"the model timm builds from the export computes other outputs (largest difference "
                          f"{(ours - theirs).abs().max().item() if ours.shape == theirs.shape else 'in shape'}): "
                          f"it is built with other arguments than {meta['model']} was "
                          f"(model_args {getattr(model, '_model_args', {})})")


def _drop_num_classes_arg(config_path: Path) -> None:
    """timm writes num_classes both at the config's root and in model_args; transformers'
    TimmWrapper passes its own num_classes beside model_args and stops on the repeat ("got
    multiple values for keyword argument"). timm reads the root's."""
    config = json.loads(config_path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    config_path.write_text(json.dumps(config, indent=2))


def _replace_dir(new: Path, final: Path) -> None:
    """Put `new` at `final`; the previous folder is moved aside first and deleted after, so a
    crash leaves either export whole (or a hidden .tmp that RunFolder.remove_temporaries clears)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old.tmp")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_run_export(run_dir: Path, console, weights: Path | None = None) -> Path | None:
    """The run's export from `weights` (default: its best.safetensors), with one line saying
    where it is, or why there is none. Main process only."""
    run_dir = Path(run_dir)
    weights = Path(weights) if weights else run_dir / "best.safetensors"
    try:
        out = export_timm(weights, run_dir / EXPORT_DIR)
    except (ExportError, ckpt.CheckpointError, ModelError) as err:
        console.print(f"timm export: none ({err})")
        return None
    sizes = export_data_config(fileio.read_metadata(weights))
    console.print(f"timm export: {out} (test size {sizes['test_input_size'][1]} px; "
                  f"timm.create_model('local-dir:{out}', pretrained=True))")
    return out


def timm_overlay(weights: str | Path) -> dict:
    """`pretrained_cfg_overlay` for timm.create_model(name, num_classes=n, pretrained=True, ...):
    the file, plus the class count (without it timm drops a classifier whose size differs
    from the architecture's default 1000) and the preprocessing the weights expect, every
    field of the export's (an overlay only replaces what it names: the architecture's
    test_input_size and crop_mode would stay)."""
    path = ckpt.RunFolder.find_weights(Path(weights))
    meta = ckpt.RunFolder.classifier_metadata(path)
    return {"file": str(path), "num_classes": len(meta["classes"]), **export_data_config(meta)}


def write_best_size(weights: Path, run_dir: Path | None, size: int, crop_pct: float, console) -> None:
    """--write-best: the swept weights' metadata says test_res = `size` and test_crop_pct =
    `crop_pct` (the best pair's), and the run's timm export is written again from them. Its
    crop_pct stays the one the training size was evaluated at: the next sweep's reference."""
    fileio.update_metadata(weights, test_res=size, input_size=[3, size, size], test_crop_pct=crop_pct)
    console.print(f"--write-best: {weights} now says test_res {size} px, test_crop_pct {crop_pct}")
    write_run_export(run_dir or weights.parent, console, weights=weights)
