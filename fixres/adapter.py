"""The parametric method's adapter (the paper's parametric adaptation), and what rebuilds it.

The pooled features that feed the classifier follow, roughly, a Frechet distribution (GEV
with shape xi > 0; xi = 0.3 as in the paper). Fit its location and scale at the training
resolution and at the new one, then feed the classifier F_train^-1(F_test(x)) instead of x
(fixres.methods.parametric does, with fixres.adapt.pooled_features' features):

    from fixres.adapter import fit_gev, FrechetAdapter, attach_adapter
    loc_tr, scale_tr = fit_gev(features_at_train_res)           # one distribution for all
    loc_te, scale_te = fit_gev(features_at_new_res)
    attach_adapter(model, FrechetAdapter(loc_te, scale_te, loc_tr, scale_tr))

With one xi for both distributions the map is affine on the new-resolution support,
x -> loc_tr + scale_tr * (x - loc_te) / scale_te, and constant (the training support's
lower end) below it, where F_test is 0: not foldable into the classifier because of
that floor. The adapter is a submodule (`fixres_adapter`, ADAPTER) applied by a forward
pre-hook of each classifier, so the model's other state-dict keys do not change; the
weights file carries `fixres_adapter.*` and `meta["adaptation"]`, and
`attach_saved_adapter` restores it (fixres.trained_model.load_run_model calls it, so every
fixres evaluation of a parametric run uses the adapted model; fixres.models.load_weights_into
names ADAPTER when plain loading meets its keys). Loading those weights anywhere else fails
on the extra keys, in timm's strict loading as in fixres's: a parametric run is for fixres
evaluation only. This module imports only fixres.classifiers, so the model modules import it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fixres.classifiers import ModelError, classifier_names

XI = 0.3          # the paper's fixed Frechet shape
ADAPTER = "fixres_adapter"


def gev_cdf(x: torch.Tensor, loc, scale, xi: float = XI) -> torch.Tensor:
    """GEV CDF, xi > 0 (Frechet type): exp(-t^(-1/xi)) with t = 1 + xi (x - loc) / scale; 0 for t <= 0."""
    t = 1 + xi * (x - loc) / scale
    return torch.where(t > 0, torch.exp(-t.clamp_min(1e-30) ** (-1 / xi)), torch.zeros_like(t))


def gev_icdf(p: torch.Tensor, loc, scale, xi: float = XI) -> torch.Tensor:
    """Inverse of gev_cdf: loc + scale / xi * ((-log p)^(-xi) - 1)."""
    return loc + scale / xi * ((-torch.log(p)) ** (-xi) - 1)


def fit_gev(x: torch.Tensor, *, per_feature: bool = False, xi: float = XI) -> tuple[torch.Tensor, torch.Tensor]:
    """(location, scale) of a GEV with the shape fixed at xi, by matching the first two
    L-moments (unlike the variance, they exist and are stable for xi = 0.3's heavy tail).
    x: (samples, features); one fit over all values, or one per feature (column)."""
    x = x.detach().double()
    x = x if per_feature else x.reshape(-1, 1)
    n = x.shape[0]
    if n < 2:
        raise ValueError("fit_gev needs at least 2 samples")
    ordered = x.sort(dim=0).values
    rank_weight = torch.arange(n, dtype=torch.float64, device=x.device)[:, None] / (n - 1)
    l1 = ordered.mean(0)
    l2 = 2 * (rank_weight * ordered).mean(0) - l1
    g = math.gamma(1 - xi)
    scale = (l2 * xi / ((2 ** xi - 1) * g)).clamp_min(1e-12)
    loc = l1 - scale * (g - 1) / xi
    return loc.float(), scale.float()


class FrechetAdapter(nn.Module):
    """x -> F_train^-1(F_test(x)) per feature (or for all with shape (1,) parameters)."""

    def __init__(self, test_loc, test_scale, train_loc, train_scale, xi: float = XI):
        super().__init__()
        for name, value in (("test_loc", test_loc), ("test_scale", test_scale),
                            ("train_loc", train_loc), ("train_scale", train_scale)):
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32).reshape(-1).clone())
        self.register_buffer("xi", torch.tensor(float(xi)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F_test(x) = exp(-t^(-1/xi)) and F_train^-1(exp(-u)) = loc + scale/xi (u^(-xi) - 1): composed, u^(-xi) = t
        t = (1 + self.xi * (x.float() - self.test_loc) / self.test_scale).clamp_min(0)
        return (self.train_loc + self.train_scale * (t - 1) / self.xi).to(x.dtype)

    def pre_hook(self, module, args):
        return (self(args[0]),) + tuple(args[1:])


def attach_adapter(model: nn.Module, adapter: FrechetAdapter) -> nn.Module:
    """Register the adapter as `model.fixres_adapter` and apply it to every classifier's input
    (a distilled DeiT: the class token head reads and the distillation token head_dist reads)."""
    if hasattr(model, ADAPTER):  # a second pre-hook would apply both maps, one after the other
        raise ModelError(f"{type(model).__name__} carries a parametric adapter already")
    model.add_module(ADAPTER, adapter)
    for head in classifier_names(model):
        model.get_submodule(head).register_forward_pre_hook(adapter.pre_hook)
    return model


def attach_saved_adapter(model: nn.Module, state: dict) -> nn.Module:
    """If a state dict carries a parametric adapter (`fixres_adapter.*`), attach it to `model`.
    The keys decide, not the metadata: a run fine-tuned from a parametric run keeps the adapter."""
    names = ("test_loc", "test_scale", "train_loc", "train_scale", "xi")
    if not any(k.startswith(ADAPTER + ".") for k in state):
        return model
    lacking = [f"{ADAPTER}.{k}" for k in names if f"{ADAPTER}.{k}" not in state]
    if lacking:
        raise ModelError(f"the weights hold a partial parametric adapter (no {lacking[0]})")
    values = {k: state[f"{ADAPTER}.{k}"] for k in names}
    return attach_adapter(model, FrechetAdapter(values["test_loc"], values["test_scale"], values["train_loc"],
                                                values["train_scale"], xi=float(values["xi"])))
