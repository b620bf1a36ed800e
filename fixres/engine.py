"""One training epoch and one evaluation, as plain functions over Accelerate objects.

    setup = TrainStep(model, optimizer, accelerator, lr_at=schedule, clip_grad_norm=1.0)   # once per run
    result, next_step = train_one_epoch(setup, loader, first_step=step, epoch=epoch)
    metrics = evaluate(model, val_loader, accelerator, mean=cfg.mean, std=cfg.std)

Both are shared by train.py and finetune.py (fixres.training.fit builds the TrainStep from
its Run). `evaluate` counts every validation
sample exactly once whatever the number of processes: Accelerate pads the last
batches so that every rank has the same number, and `gather_for_metrics` drops
the padding again.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fixres.device_decode import decode_on_device
from fixres.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


# what usually makes a loss diverge, in the order worth trying
NONFINITE_HINT = "lower --lr, lengthen --warmup-epochs, or train in bf16 rather than fp16"


class ProcessGroupError(RuntimeError):
    """A collective failed: another process died, or hung past --collective-timeout."""


def cosine_lr(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up from 0 to peak_lr, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class EpochResult:
    loss: float
    accuracy: float | None   # None with Mixup/CutMix: mixed images have no single right answer
    images: int          # over all processes
    skipped: int         # undecodable images skipped (--skip-bad-images)
    seconds: float
    lr: float
    completed: bool = True   # False when a stop was requested mid-epoch
    batches: int = 0         # batches taken from the loader (per process): where a stopped epoch resumes
    data_wait_seconds: float = 0.0   # waiting for the loader's next batch (mean over processes)

    @property
    def data_wait_frac(self) -> float:
        """The share of the epoch spent waiting for data: near 0 when the model is the bottleneck,
        near 1 when the loader workers cannot keep up (more workers, or --decode gpu)."""
        return min(1.0, self.data_wait_seconds / max(self.seconds, 1e-9))

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def to_device_batch(images, channels_last: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The model's input: uint8 batches (DecodeRandomResizedCrop) are normalised here, on
    the device, once per batch instead of once per image in the loader workers."""
    images = normalize_batch(images, mean, std)
    if channels_last and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def stop_if_not_finite(loss: torch.Tensor, accelerator, *, step: int, lr: float) -> None:
    """Raise NonFiniteLossError on every process when the loss is NaN or infinite on any one,
    with the same message everywhere; before backward, so that no process is left waiting for
    the others at the gradient all-reduce until --collective-timeout."""
    if accelerator.num_processes == 1:
        if torch.isfinite(loss):
            return
        where = f"loss is {loss.item()}"
    else:
        # the price: one all-gather of one float per micro-batch, only with several processes
        losses = accelerator.gather(loss.detach().float().reshape(1)).tolist()
        if all(math.isfinite(value) for value in losses):
            return
        where = "loss is " + ", ".join(f"{value} on process {rank}" for rank, value in enumerate(losses)
                                       if not math.isfinite(value)) + f" of {len(losses)}"
    raise NonFiniteLossError(f"{where} at optimizer step {step} (learning rate {lr:.3g}); {NONFINITE_HINT}")


def tallies(device: torch.device, *dtypes: torch.dtype) -> list[torch.Tensor]:
    """Zeroed scalars on the device, one per dtype: sums kept there until the epoch's end."""
    return [torch.zeros((), device=device, dtype=dtype) for dtype in dtypes]


@dataclass(frozen=True)
class TrainStep:
    """What a training step needs, fixed for a run (fixres.training builds it once from the
    Run): the prepared model, optimizer and accelerator; `lr_at(optimizer_step)`, the learning
    rate set before each optimizer step; `set_modes(model)`, which modules train (fine-tuning
    keeps most of the network in eval mode; --freeze-epochs swaps in the head's). Options of the
    recipes: `mix(images, labels, epoch=, batch=)` -> (images, soft targets) for Mixup/CutMix
    (fixres.transforms.BatchMix); `clip_grad_norm` clips the gradients' global norm before each
    optimizer step; `ema.update(model, step)` after it (fixres.ema.ModelEma); `mean` and `std`
    normalise the uint8 batches of the fast decoder and of decoding on the device."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: object
    lr_at: Callable[[int], float]
    label_smoothing: float = 0.0
    channels_last: bool = False
    set_modes: Callable = torch.nn.Module.train
    mix: Callable | None = None
    clip_grad_norm: float | None = None
    ema: object | None = None   # fixres.ema.ModelEma
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def train_one_epoch(setup: TrainStep, loader, *, first_step: int, epoch: int = 0, first_batch: int = 0,
                    progress=None, should_stop=lambda: False) -> tuple[EpochResult, int]:
    """Train `setup.model` over `loader`, from optimizer step `first_step`, for epoch `epoch`
    (which Mixup/CutMix draws from), `first_batch` being the index of the loader's first batch
    in the epoch (a resumed epoch skips the ones done); `progress(images, loss)` after each
    batch; `should_stop()` asked at each optimizer step. Returns the epoch's result and the
    next step index."""
    model, optimizer, accelerator, mix = setup.model, setup.optimizer, setup.accelerator, setup.mix
    mean, std = setup.mean, setup.std
    setup.set_modes(model)
    device = accelerator.device
    loss_sum, correct, seen, skipped = tallies(device, torch.float64, torch.long, torch.long, torch.long)
    step, lr = first_step, setup.lr_at(first_step)
    start = asked = time.perf_counter()
    data_wait = 0.0
    completed, batches = True, 0
    for batch, (images, labels, n_skipped) in enumerate(loader, start=first_batch):
        batches += 1  # counted, not inferred from the images: --skip-bad-images leaves batches short
        data_wait += time.perf_counter() - asked
        images, labels, n_skipped = decode_on_device(images, labels, n_skipped, device)
        skipped += n_skipped
        with accelerator.accumulate(model):
            targets = labels
            if mix is not None:  # on the normalised floats, before channels_last
                images, targets = mix(normalize_batch(images, mean, std), labels, epoch=epoch, batch=batch)
            images = to_device_batch(images, setup.channels_last, mean, std)
            with accelerator.autocast():
                logits = model(images)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=setup.label_smoothing)
            stop_if_not_finite(loss, accelerator, step=step, lr=lr)
            if accelerator.sync_gradients:
                lr = setup.lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
            accelerator.backward(loss)
            if setup.clip_grad_norm is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), setup.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                step += 1
                if setup.ema is not None:
                    setup.ema.update(accelerator.unwrap_model(model), step)
        n = labels.numel()
        loss_sum += loss.detach().double() * n
        if mix is None:
            correct += (logits.detach().argmax(1) == labels).sum()
        seen += n
        if progress is not None:
            progress(n * accelerator.num_processes, loss.item())
        if accelerator.sync_gradients and should_stop():
            completed = False
            break
        asked = time.perf_counter()
    waited = torch.tensor(data_wait, device=device, dtype=torch.float64)
    totals = accelerator.reduce(torch.stack([loss_sum, correct.double(), seen.double(), skipped.double(), waited]),
                                "sum")
    loss_total, correct_total, seen_total, skipped_total, waited_total = totals.tolist()
    accuracy = correct_total / max(seen_total, 1) if mix is None else None
    return EpochResult(loss=loss_total / max(seen_total, 1), accuracy=accuracy,
                       images=int(seen_total), skipped=int(skipped_total),
                       seconds=time.perf_counter() - start, lr=lr, completed=completed, batches=batches,
                       data_wait_seconds=waited_total / accelerator.num_processes), step


def top5_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether each label is among its row's k = min(5, classes) highest logits (with fewer
    than 5 classes, "top-5" is top-k over all of them; top5_k says which k)."""
    k = top5_k(logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(1)


def top5_k(classes: int) -> int:
    return min(5, classes)


@torch.inference_mode()
def evaluate(model, loader, accelerator, *, channels_last: bool = False, progress=None, mean=IMAGENET_MEAN,
             std=IMAGENET_STD) -> dict:
    """Top-1 and top-5 accuracy and mean cross-entropy over the whole validation split."""
    model.eval()
    device = accelerator.device
    loss_sum, correct, correct5, count = tallies(device, torch.float64, torch.long, torch.long, torch.long)
    start = time.perf_counter()
    for images, labels, _ in loader:
        images, labels, _ = decode_on_device(images, labels, 0, device)
        images = to_device_batch(images, channels_last, mean, std)
        with accelerator.autocast():
            logits = model(images)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        hits, hits5 = logits.argmax(1) == labels, top5_hits(logits, labels)
        losses, hits, hits5 = accelerator.gather_for_metrics((losses, hits, hits5))
        loss_sum += losses.double().sum()
        correct += hits.sum()
        correct5 += hits5.sum()
        count += hits.numel()
        if progress is not None:
            progress(hits.numel(), None)
    n = int(count.item())
    return {"accuracy": correct.item() / max(n, 1), "top5": correct5.item() / max(n, 1), "loss": loss_sum.item() / max(n, 1),
            "count": n, "seconds": time.perf_counter() - start}
