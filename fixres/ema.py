"""Model EMA: an exponential moving average of the weights, evaluated beside them.

    python train.py --data train.csv --model-ema                          # decay 0.999 every 32 steps
    python train.py --data train.csv --model-ema --model-ema-decay 0.99 --model-ema-steps 4

    ema = ModelEma(model, decay=0.999, every=32, warmup_steps=500)
    ema.update(model, step)     # after each optimizer step; `step` = optimizer steps done so far
    evaluate(ema.module, ...)   # a copy of the model, always in eval mode

Every `every` optimizer steps, each floating-point parameter and buffer moves towards the
model's: ema = decay * ema + (1 - decay) * weight. The buffers too (BatchNorm's running
statistics), as torchvision's reference does: statistics that belong to the averaged
weights rather than to the last ones. Integer buffers (num_batches_tracked) are copied.
The average spans about every / (1 - decay) optimizer steps (`horizon_steps`).

During the learning-rate warm-up the average copies the weights instead of averaging them
(torchvision's reference resets it over its warm-up epochs): the random initial weights
would otherwise weigh on it for a long time.

The EMA follows the unwrapped model (train_one_epoch passes accelerator.unwrap_model(model)),
so DDP changes nothing in it; every process keeps its own copy. The parameters are equal on
every process after each step, the BatchNorm statistics are not (each process's forward
updates them with its own batch), so `sync` gives every process the main process's before
the EMA is evaluated or saved: the saved EMA is the one that was evaluated.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fixres.stats import best_of


class ModelEma:
    def __init__(self, model: nn.Module, *, decay: float, every: int = 1, warmup_steps: int = 0):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.every, self.warmup_steps = decay, every, warmup_steps

    @property
    def horizon_steps(self) -> float:
        """Optimizer steps that the average spans (its weights' 1/e time)."""
        return self.every / (1 - self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """After optimizer step number `step` (1-based): average or, in the warm-up, copy."""
        if step % self.every:
            return
        ours, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in ours.items() if v.is_floating_point()]
        if step <= self.warmup_steps:
            for key, value in ours.items():
                value.copy_(theirs[key])
            return
        torch._foreach_lerp_([ours[k] for k in floats], [theirs[k].detach() for k in floats], 1 - self.decay)
        for key, value in ours.items():
            if not value.is_floating_point():
                value.copy_(theirs[key])

    def sync(self, accelerator) -> None:
        """The main process's buffers on every process (see the module docstring)."""
        if accelerator.num_processes > 1:
            for buffer in self.module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def epoch_score(record: dict) -> dict:
    """An epoch's validation top-1 and loss, and which weights reached them: the EMA's ("ema")
    when they beat the raw weights ("raw") under fixres.stats.best_of's rule."""
    raw = {"epoch": record["epoch"], "which": "raw", "top1": record["val_acc"], "loss": record["val_loss"]}
    if record.get("ema_val_acc") is None:
        return raw
    return best_of([raw, {**raw, "which": "ema", "top1": record["ema_val_acc"], "loss": record["ema_val_loss"]}])


def best_epoch(records: list[dict]) -> dict:
    """The epoch a run ships as best.safetensors (epoch_score's dict), by fixres.stats.best_of."""
    return best_of([epoch_score(r) for r in records])
