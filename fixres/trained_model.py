"""A trained model to evaluate: a fixres run's, rebuilt from its weights' metadata, or plain weights.

    model, meta = load_run_model("runs/<name>")              # its best.safetensors; "last" for last
    model = load_plain_weights("resnet50", "r50.pth", split.classes, data="data/train.csv")

sweep.py, finetune.py and export read models through these: a run's model is the network it
recorded (name, classes, --output-stride, --model-kwargs), built to run at any size, with the
parametric adapter its weights carry (fixres/adapter.py).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from fixres.adapter import attach_saved_adapter
from fixres.checkpoint import RunFolder
from fixres.fileio import load_weights
from fixres.classifiers import ModelError, classifier_name
from fixres.data import DataError
from fixres.models import any_size_kwargs, create_model, load_weights_into, read_state_dict


def load_run_model(path: str | Path, which: str = "best") -> tuple[nn.Module, dict]:
    """A classifier from a run folder (its `which` weights), a checkpoint folder or a
    .safetensors file written by fixres, with the preprocessing metadata it carries, and
    the parametric adapter when the weights hold one (so it is evaluated as it was made)."""
    weights_path = RunFolder.find_weights(Path(path), which)
    state, meta = load_weights(weights_path)
    if not meta.get("model") or not meta.get("classes"):
        raise ModelError(f"{weights_path}: no fixres metadata (model name, classes); "
                         f"pass plain weights with --weights and --model instead")
    # at any size: the recorded network, its position embedding resampled for the input's size
    model = create_model(meta["model"], len(meta["classes"]), output_stride=meta.get("output_stride"),
                         model_kwargs=any_size_kwargs(meta["model"], meta.get("model_kwargs")))
    attach_saved_adapter(model, state)  # first: its keys are then the model's own
    load_weights_into(model, state, source=str(weights_path), replace_classifier=False)
    return model, {**meta, "weights_path": str(weights_path)}


def load_plain_weights(name: str, path: str | Path, classes: list[str], *, data: str) -> nn.Module:
    """Model `name` with a plain state dict (no fixres metadata) for the `classes` of `data`;
    a classifier of another size is refused, not replaced (these weights are to be evaluated)."""
    state = read_state_dict(path)
    model = create_model(name, len(classes))
    head = state.get(classifier_name(model) + ".weight")
    if head is not None and head.shape[0] != len(classes):
        raise DataError(f"{data}: {len(classes)} classes, but --weights {path} has a {head.shape[0]}-class classifier")
    load_weights_into(model, state, source=str(path), replace_classifier=False)
    return model
