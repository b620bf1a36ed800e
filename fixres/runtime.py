"""Runtime defaults every job shares, decided in one place.

    accelerator = make_accelerator(cfg)                    # sweep.py; train.py adds its own keywords
    use_channels_last(cfg.channels_last, accelerator.device)
    raise SomeError(f"{path}: cannot read ({error_reason(err)})")
"""
from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

REASON_CHARS = 160  # an error's reason stays one readable line inside a message of ours


def make_accelerator(cfg, **kwargs) -> Accelerator:
    """An Accelerator for a job config with cpu, mixed_precision and collective_timeout;
    `kwargs` go to Accelerator (training: gradient_accumulation_steps, log_with)."""
    # denormal floats (weights and gradients decaying towards zero) make x86 CPUs many times slower
    torch.set_flush_denormal(True)
    # cuDNN tries its convolution algorithms once per input shape and keeps the fastest;
    # fixres's shapes are fixed within a run (drop_last in training)
    torch.backends.cudnn.benchmark = True
    # a rank that died or hangs ends the others' wait at the next collective after this long.
    # Accelerate forwards only the values that differ from the class's defaults (600 s, NCCL's),
    # which would leave gloo at torch's 30 minutes when 600 s is asked for: forward it always.
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))
    group.to_kwargs = lambda: {"timeout": group.timeout}
    return Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, kwargs_handlers=[group], **kwargs)


def use_channels_last(option: bool | None, device: torch.device) -> bool:
    """--channels-last as given, else on for GPUs only (measured slower on CPUs)."""
    return option if option is not None else device.type == "cuda"


def error_reason(err: BaseException) -> str:
    """The first line of an exception's message, cut to REASON_CHARS; its type's name when it has none."""
    text = str(err)
    return text.splitlines()[0][:REASON_CHARS] if text else type(err).__name__
