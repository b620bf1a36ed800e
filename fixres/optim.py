"""The optimizer and the batch size a run trains with.

    optimizer = build_optimizer(model.named_parameters(), cfg, head=["fc"])   # SGD or AdamW, as --optimizer says
    python train.py --data train.csv --batch-size auto                      # the largest that fits the GPU
"""
from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable

import torch

from fixres.config import ConfigError, TrainConfig


def build_optimizer(named_params, cfg: TrainConfig, head: list[str] | None = None,
                    no_decay: tuple[str, ...] = ()) -> torch.optim.Optimizer:
    """With `head` (the classifiers' names), their parameters get groups of their own, marked
    "head", so that --freeze-epochs can give the others a learning-rate scale of 0. The
    parameters named in `no_decay` (what a timm model's no_weight_decay() lists: a ViT's position
    embedding and tokens) get no weight decay."""
    # no weight decay on norms and biases, as timm and torchvision's references do
    params = [(n, p) for n, p in named_params if p.requires_grad]
    # names or patterns, as timm's lists hold them (XCiT's "pos_embed.*")
    decays = lambda n, p: p.ndim > 1 and not any(fnmatch.fnmatchcase(n, pattern) for pattern in no_decay)  # noqa: E731
    groups = [{"params": [p for n, p in params if decays(n, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}]
    if head is not None:
        in_head = lambda n: n.startswith(tuple(h + "." for h in head))  # noqa: E731
        groups = [{"params": [p for n, p in params if in_head(n) == is_head and decays(n, p) == decay],
                   "weight_decay": cfg.weight_decay if decay else 0.0, "head": is_head}
                  for is_head in (False, True) for decay in (True, False)]
        groups = [g for g in groups if g["params"]]
    # one fused kernel per step instead of a few per tensor, where the parameters are on a GPU
    fused = {"fused": True} if params and all(p.is_cuda for _, p in params) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, **fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, **fused)


AUTO_BATCH_START = 1024   # --batch-size auto halves from here
AUTO_BATCH_CPU = 64


def largest_batch(try_batch: Callable[[int], float], start: int = AUTO_BATCH_START,
                  limit: float = 0.9) -> tuple[int, list[tuple[int, str]]]:
    """Halve the batch size from `start` until `try_batch(b)` runs and returns a peak
    memory fraction <= `limit`; the trials as (size, outcome) for the log."""
    trials, b = [], start
    while b >= 1:
        try:
            peak = try_batch(b)
        except torch.OutOfMemoryError:
            trials.append((b, "out of memory"))
        else:
            trials.append((b, f"peak {100 * peak:.0f}% of memory"))
            if peak <= limit:
                return b, trials
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        b //= 2
    raise ConfigError(f"--batch-size auto: no batch size fits ({trials[-1][1]} at batch 1)")


def auto_batch_size(model, cfg: TrainConfig, accelerator, console) -> int:
    """The largest power of two (<= 1024) whose training step at --train-res fits in 90% of
    the GPU's memory, tried on a copy of the model so that its BatchNorm statistics stay
    untouched. Activations dominate; the optimizer's state (2x the weights for AdamW)
    is inside the 10% kept free. On a CPU: 64."""
    device = accelerator.device
    if device.type != "cuda":
        console.print(f"--batch-size auto: {AUTO_BATCH_CPU} on {device.type} (memory is not what limits it there)")
        return AUTO_BATCH_CPU
    trial_model = copy.deepcopy(model).to(device).train()
    total = torch.cuda.get_device_properties(device).total_memory

    def try_batch(b: int) -> float:
        torch.cuda.reset_peak_memory_stats(device)
        x = torch.randn(b, 3, cfg.train_res, cfg.train_res, device=device)
        try:
            with accelerator.autocast():
                trial_model(x).float().mean().backward()
        finally:
            del x
            trial_model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated(device) / total

    batch, trials = largest_batch(try_batch)
    trial_model = None  # freed before the cache is emptied
    torch.cuda.empty_cache()
    console.print(f"--batch-size auto: {batch} per process ("
                  + "; ".join(f"{b}: {outcome}" for b, outcome in trials) + ")")
    return batch
