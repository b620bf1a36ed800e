"""What FixRes changes in a trained model, as functions on the model.

The last normalisation layer before the classifier: `find_last_norm` finds it (a BatchNorm
before the global pooling; ConvNeXt's and ViT's last LayerNorm; None in a norm-free net).
"The classifier" is every one the model has (classifiers.classifier_names): a distilled DeiT's
head and head_dist both train, and timm's forward averages their logits in every evaluation.
A BatchNorm is replaced by `SyncedBatchNorm2d` so that its statistics are the global batch's
on any backend (gloo included, where torch.nn.SyncBatchNorm refuses to run);
`finetune_layers` leaves it and the classifier as the only things that change during
fine-tuning (a LayerNorm or GroupNorm: its weight and bias). With --train-pos-embed a ViT's
absolute position embedding trains too (`find_position_embedding`: timm's pos_embed, DeiT's and
hybrid ViTs' included, torchvision's encoder.pos_embedding), as DeiT's fine-tuning at a new size
trains it; gradients then run back through every block (a slower step, the blocks still frozen):

    name, bn = prepare_for_finetuning(model, input_size=224)   # "layer4.2.bn3" for ResNet-50
    prepare_for_finetuning(vit, input_size=384, train_pos_embed=True)  # norm, head and pos_embed train

Then the passes over data of the two zero-training alternatives to fine-tuning.

bn-stats: `reestimate_bn_stats` re-estimates the last BatchNorm's running statistics at the
new resolution as an average over every training image, each batch weighted by its images
(no gradients; seconds).

parametric: `pooled_features` reads the classifier's input for every image, at the training
resolution and at the new one; the Frechet adapter fitted to them, and what restores it from a
run's weights, are in fixres/adapter.py.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fixres.classifiers import ModelError, classifier_names
from fixres.data import DataError
from fixres.engine import to_device_batch
from fixres.model_sizes import patch_grid
from fixres.runtime import error_reason


# what counts as a normalisation layer (timm's and torchvision's LayerNorm2d and GroupNorm1 subclass these)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def find_last_norm(model: nn.Module, *, input_size: int = 64) -> str | None:
    """Dotted name of the last normalisation layer that runs before the classifier, whatever
    its kind, or None where none runs there (norm-free nets such as NFNet): a BatchNorm on the
    feature maps before the global pooling (ResNet-50: layer4.2.bn3 in timm and torchvision), a
    LayerNorm or GroupNorm (ConvNeXt's head.norm, after its pooling; a ViT's final norm or fc_norm).

    Found by running one blank image through the model in eval mode and recording the
    order in which they run, so the order of registration does not matter (torchvision's
    Bottleneck registers its downsample BN after bn3). Where the last block has a
    downsample branch (timm's test_resnet), that branch's BN runs last and is the one
    chosen. A BatchNorm that runs after the pooling (on vectors) is passed over: its
    statistics are not a map's."""
    kind = type(model).__name__
    # the kinds fixres adapts, and leaf layers named like a norm that it does not know (RmsNorm, EvoNorm):
    # a model whose last norm is one of those is refused, not taken for norm-free or for an earlier norm
    norms = {m: n for n, m in model.named_modules() if isinstance(m, NORMS)
             or ("Norm" in type(m).__name__ and not list(m.children()) and any(True for _ in m.parameters()))}
    ran: list[tuple[str, bool]] = []   # (name, passed over), in execution order
    reached = []

    def record(module, args, output):
        if not reached:
            ran.append((norms[module], is_batchnorm(module) and output.dim() != 4))

    handles = [m.register_forward_hook(record) for m in norms]
    handles += [model.get_submodule(head).register_forward_pre_hook(lambda module, args: reached.append(True))
                for head in classifier_names(model)]  # the first to run ends the search
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, input_size, input_size, device=param.device, dtype=param.dtype))
    except Exception as err:  # a model that cannot run at this size cannot be traced either
        raise ModelError(f"cannot run {kind} on a {input_size} px image to find its last normalisation layer "
                         f"({error_reason(err)})") from None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    kept = [name for name, passed_over in ran if not passed_over]
    if not kept and ran:
        raise ModelError(f"{kind} has no BatchNorm on feature maps before its global pooling "
                         f"(its BatchNorm layers run after it); FixRes fine-tuning needs one")
    last = kept[-1] if kept else None
    if last is not None and not isinstance(model.get_submodule(last), NORMS):
        raise ModelError(f"{kind}'s last normalisation layer {last} is a {type(model.get_submodule(last)).__name__}, "
                         f"a kind fixres does not adapt yet")
    return last


def classifiers_text(names: list[str]) -> str:
    """'classifier head.fc', or 'classifiers head and head_dist': for the lines that name them."""
    return f"classifier {names[0]}" if len(names) == 1 else f"classifiers {', '.join(names[:-1])} and {names[-1]}"


def is_batchnorm(module: nn.Module | None) -> bool:
    """Running statistics to sync and re-estimate (the others normalise each image by itself)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def find_position_embedding(model: nn.Module) -> str | None:
    """Dotted name of the model's absolute position embedding, else None: the parameter that holds
    one vector per patch of the grid the model is built for (model_sizes.patch_grid), shape (1, tokens,
    width), plus one per prefix token the model embeds with them: timm's ViTs say how many
    (num_prefix_tokens: class, distillation and register tokens; none with no_embed_class),
    torchvision's ViT embeds its class token. timm's ViTs (pos_embed: DeiT, hybrid ViTs, EVA),
    torchvision's ViT (encoder.pos_embedding). A Swin's relative-position tables hold one bias per
    offset inside a window, BEiT's too: None, as for a CNN."""
    grid = patch_grid(model)
    if grid is None:
        return None
    patches = grid[0] * grid[1]
    if hasattr(model, "num_prefix_tokens"):  # timm: register tokens can outnumber a small grid's patches
        embedded = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
    else:  # torchvision's ViT: its class token
        embedded = int(getattr(model, "class_token", None) is not None)
    # not timm's prefix tokens themselves (as many register tokens as patches have the same shape)
    tokens = {id(getattr(model, t)) for t in ("cls_token", "reg_token", "dist_token")
              if getattr(model, t, None) is not None}
    found = [name for name, p in model.named_parameters()
             if p.dim() == 3 and p.shape[0] == 1 and p.shape[1] == patches + embedded and id(p) not in tokens]
    if len(found) > 1:
        raise ModelError(f"{type(model).__name__} has {len(found)} parameters shaped as a position embedding "
                         f"({', '.join(found)}); fixres trains one")
    return found[0] if found else None


def adapted_layers(model: nn.Module, norm: str | None, *, pos_embed: str | None = None) -> dict:
    """What --method finetune adapts (finetune.json's "adapted"): the norm, its class, the classifier
    (the first) and every classifier (a distilled DeiT: head and head_dist); with --train-pos-embed,
    the position embedding's name ("pos_embed")."""
    heads = classifier_names(model)
    return {"layer": norm, "kind": type(model.get_submodule(norm)).__name__ if norm else None,
            "classifier": heads[0], "classifiers": heads, **({"pos_embed": pos_embed} if pos_embed else {})}


def channel_moments(x: torch.Tensor) -> torch.Tensor:
    """Per channel of an NCHW batch: (sums, sums of squares, count of values per channel) in
    one float64 vector, to be summed across batches or processes; `mean_var` reads it."""
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    count = x.numel() // x.shape[1]
    # local moments in float32 (two-pass, accurate), combined in float64
    mean, var = mean.double(), var.double()
    return torch.cat([mean * count, (var + mean * mean) * count, mean.new_tensor([count])])


def mean_var(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance, count) from summed `channel_moments`."""
    c, total = (len(stats) - 1) // 2, stats[-1]
    mean = stats[:c] / total
    return mean, (stats[c:2 * c] / total - mean * mean).clamp_min(0), total


def _distributed() -> bool:
    # also with one process in a process group (torchrun --nproc_per_node 1): same result, one code path
    return dist.is_available() and dist.is_initialized()


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch.

    Each process all-reduces (sum, sum of squares, count) per channel, so every process
    normalises with the same mean and variance and ends with the same running statistics:
    N processes with batch b behave as one with batch N*b. Works on any backend (gloo,
    NCCL). Single-process or in eval mode it is a plain BatchNorm2d. Its input must not
    require grad (the layers before it are frozen): the statistics are not backpropagated."""

    @classmethod
    def from_bn(cls, bn: nn.modules.batchnorm._BatchNorm) -> SyncedBatchNorm2d:
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats, device=ref.device, dtype=ref.dtype)
        new.load_state_dict(bn.state_dict())
        return new.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        if x.requires_grad:
            raise RuntimeError("SyncedBatchNorm2d: the layers before the synced BatchNorm must be frozen")
        with torch.no_grad():
            stats = channel_moments(x)
            dist.all_reduce(stats)
            mean, var, total = mean_var(stats)
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        # eval-mode batch_norm with the global statistics: gradients reach weight and bias only
        return F.batch_norm(x, mean.float(), var.float(), self.weight, self.bias, False, 0.0, self.eps)


def install_synced_bn(model: nn.Module, name: str) -> SyncedBatchNorm2d:
    """Replace the BatchNorm at `name` by a SyncedBatchNorm2d with its parameters and statistics."""
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    bn = SyncedBatchNorm2d.from_bn(getattr(owner, leaf))
    setattr(owner, leaf, bn)
    return bn


def freeze_for_finetuning(model: nn.Module, *, norm: str | None, train_affine: bool = False,
                          also: tuple[str, ...] = ()) -> list[str]:
    """requires_grad only for the classifiers (and the `norm` layer's weight and bias, and the
    parameters named in `also`); returns those names."""
    prefixes = tuple(head + "." for head in classifier_names(model)) + ((norm + ".",) if norm and train_affine else ())
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes) or name in also)
        if p.requires_grad:
            trainable.append(name)
    return trainable


def train_only(*modules: nn.Module):
    """A set_modes for the training loop: the model in eval mode but `modules` (fine-tuning:
    the last BN; --freeze-epochs: the classifier), so the others' BatchNorm statistics stay."""
    def set_modes(model: nn.Module) -> None:
        model.eval()
        for module in modules:
            module.train()
    return set_modes


def finetune_layers(model: nn.Module, norm: str | None, *, train_bn_affine: bool = False,
                    pos_embed: str | None = None) -> Callable:
    """Set up what --method finetune trains (`norm`: find_last_norm's answer) and return the
    training loop's set_modes. A BatchNorm: replaced by a SyncedBatchNorm2d, alone in train mode
    (batch statistics, running ones re-estimated at the new size), its weight and bias trained
    with --train-bn-affine only. A LayerNorm or GroupNorm has no statistics to re-estimate: its
    weight and bias train, the whole model in eval mode. None (norm-free): the classifier alone.
    `pos_embed` (find_position_embedding's answer, --train-pos-embed): that parameter trains too."""
    also = (pos_embed,) if pos_embed else ()
    if is_batchnorm(model.get_submodule(norm) if norm else None):
        bn = install_synced_bn(model, norm)
        freeze_for_finetuning(model, norm=norm, train_affine=train_bn_affine, also=also)
        return train_only(bn)
    freeze_for_finetuning(model, norm=norm, train_affine=True, also=also)
    return train_only()


def prepare_for_finetuning(model: nn.Module, *, input_size: int, train_bn_affine: bool = False,
                           train_pos_embed: bool = False) -> tuple[str | None, nn.Module | None]:
    """find_last_norm + finetune_layers + the modes; (name, layer), None for both where there is none.
    train_pos_embed: the absolute position embedding trains too (a model without one: ModelError)."""
    name = find_last_norm(model, input_size=input_size)
    pos_embed = required_position_embedding(model, type(model).__name__) if train_pos_embed else None
    finetune_layers(model, name, train_bn_affine=train_bn_affine, pos_embed=pos_embed)(model)
    return name, model.get_submodule(name) if name else None


def required_position_embedding(model: nn.Module, model_name: str) -> str:
    """find_position_embedding's name for --train-pos-embed; a model without one is refused in one line."""
    name = find_position_embedding(model)
    if name is None:
        raise ModelError(f"--train-pos-embed: {model_name} has no absolute position embedding")
    return name


@torch.no_grad()
def pooled_features(model: nn.Module, loader, accelerator, *, channels_last: bool = True) -> torch.Tensor:
    """The classifier's input for every sample of a prepared loader, gathered from all
    processes (each sample once), on the CPU; with several classifiers (a distilled DeiT), each
    one's input in turn, as rows of their own: the adapter maps them all."""
    net = accelerator.unwrap_model(model)
    captured = []
    handles = [net.get_submodule(head).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().float())) for head in classifier_names(net)]
    model.eval()
    out = []
    try:
        for images, _, _ in loader:
            with accelerator.autocast():
                model(to_device_batch(images, channels_last))
            out += [accelerator.gather_for_metrics(features).cpu() for features in captured]
            captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(out)


@torch.no_grad()
def reestimate_bn_stats(model: nn.Module, bn: nn.Module | Sequence[nn.Module], batches, accelerator, *,
                        channels_last: bool = True) -> int:
    """Set the running statistics of `bn` (one BatchNorm, or several in one pass) to the average
    of its batch statistics over `batches`, each batch weighted by its number of images: the
    mean is the plain mean over every image, the variance the images' average of their batch's
    (unbiased) variance. The whole model stays in eval mode; a hook reads each BN's input, so
    nothing else changes. Several BNs see their inputs as the model stood before the call: right
    for parallel branches (a block's main branch and its shortcut), not for a BN that feeds
    another (re-estimate those one call each, in the order they run).

    In a process group, `batches` are this process's part of each round (fixres.loaders.round_batches:
    the same number of rounds everywhere, a part may be empty) and a round's statistics are
    those of all parts together, so N processes give what one gives with the round as its
    batch. Returns the images seen, all processes; with none (every image undecodable), a
    DataError, and the statistics stay as they were."""
    bns = [bn] if isinstance(bn, nn.Module) else list(bn)
    param = bns[0].running_mean
    captured = {layer: [] for layer in bns}
    handles = [layer.register_forward_pre_hook(lambda module, args: captured[module].append(channel_moments(args[0])))
               for layer in bns]
    widths = [2 * layer.num_features + 1 for layer in bns]  # each BN's channel_moments
    model.eval()
    seen, rounds, mean, var = 0, 0, None, None
    try:
        for images, labels, _ in batches:
            stats = torch.zeros(sum(widths), dtype=torch.float64, device=param.device)
            if labels.numel():
                with accelerator.autocast():
                    model(to_device_batch(images.to(param.device), channels_last))
                stats = torch.cat([captured[layer].pop() for layer in bns])
            stats = torch.cat([stats, stats.new_tensor([labels.numel()])])  # + the images
            if _distributed():
                dist.all_reduce(stats)
            n = int(stats[-1])
            if n == 0:
                continue
            moments = [mean_var(part) for part in stats[:-1].split(widths)]
            # unbiased, as BatchNorm keeps it
            batch_mean = [m for m, _, _ in moments]
            batch_var = [v * values / (values - 1).clamp_min(1) for _, v, values in moments]
            seen, rounds = seen + n, rounds + 1
            mean = batch_mean if mean is None else [a + (b - a) * (n / seen) for a, b in zip(mean, batch_mean)]
            var = batch_var if var is None else [a + (b - a) * (n / seen) for a, b in zip(var, batch_var)]
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise DataError("bn-stats: no training image could be read, so the BatchNorm statistics "
                        "were not re-estimated (they stay as they were)")
    for layer, layer_mean, layer_var in zip(bns, mean, var):
        layer.running_mean.copy_(layer_mean)
        layer.running_var.copy_(layer_var)
        layer.num_batches_tracked.fill_(rounds)
    return seen
