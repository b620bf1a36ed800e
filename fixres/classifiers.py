"""A model's classifiers, and ModelError: the leaf the model modules build on.

    classifier_name(model)    # "fc" for a ResNet, "head" for a ViT: its final Linear layer
    classifier_names(model)   # every classifier: ["head", "head_dist"] for a distilled DeiT

ModelError is the one error of every module that builds, sizes, adapts or loads a model
(fixres.models, fixres.trained_model, fixres.adapt, fixres.adapter): it lives here, with
nothing of fixres imported, so that each of them can import it without a cycle.
"""
from __future__ import annotations

from torch import nn


class ModelError(ValueError):
    """Unknown model, unreachable pretrained weights, or weights that do not fit."""


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the final Linear layer (timm knows it; for others, the last Linear)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier")
    if isinstance(name, str) and isinstance(_get(model, name), nn.Linear):
        return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no Linear classifier")
    return linears[-1]


def classifier_names(model: nn.Module) -> list[str]:
    """Every classifier's dotted name: a distilled DeiT has two (timm's pretrained_cfg lists head
    and head_dist; its forward averages their logits), other models the one classifier_name gives."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, (tuple, list)) and names and all(isinstance(_get(model, n), nn.Linear) for n in names):
        return list(names)
    return [classifier_name(model)]


def _get(model: nn.Module, dotted: str):
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        return None
