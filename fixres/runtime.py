"""Runtime defaults decided once: the Accelerator, channels_last.

    accelerator = make_accelerator(cfg)
"""
from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


def make_accelerator(cfg, **kwargs) -> Accelerator:
    # Denormal floats (weights and gradients decaying towards zero) make x86 CPUs many
    # times slower; epochs of the built-in demo went from 40 s to over 200 s without this.
    torch.set_flush_denormal(True)
    # cuDNN tries its convolution algorithms once per input shape and keeps the fastest;
    # fixres's shapes are fixed within a run (drop_last in training)
    torch.backends.cudnn.benchmark = True
    # a rank that died or hangs ends the others' wait at the next collective after this long.
    # Accelerate forwards only the values that differ from the class's defaults (600 s, NCCL's),
    # which would leave gloo at torch's 30 minutes when 600 s is asked for: forward it always.
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))
    group.to_kwargs = lambda: {"timeout": group.timeout}
    return Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, kwargs_handlers=[group],
                       gradient_accumulation_steps=cfg.grad_accum, log_with=cfg.log_with, **kwargs)


def use_channels_last(setting: bool | None, device: torch.device) -> bool:
    """--channels-last: on for GPUs, off on CPUs (where it measured slower), unless given."""
    return setting if setting is not None else device.type == "cuda"
