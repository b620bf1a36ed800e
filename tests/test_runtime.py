"""The runtime defaults every job shares (fixres.runtime)."""
from datetime import timedelta

import torch

from fixres.config import SweepConfig
from fixres.runtime import REASON_CHARS, error_reason, make_accelerator, use_channels_last


def test_error_reason_is_the_first_line_cut_short_or_the_type():
    assert error_reason(ValueError("cannot read\n  File ...\nmore")) == "cannot read"
    assert error_reason(RuntimeError("x" * 500)) == "x" * REASON_CHARS
    assert error_reason(OSError()) == "OSError"  # an empty message still names something


def test_channels_last_as_given_else_on_for_gpus_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [use_channels_last(None, cpu), use_channels_last(None, cuda)] == [False, True]
    assert [use_channels_last(True, cpu), use_channels_last(False, cuda)] == [True, False]


def test_a_sweep_accelerator_forwards_the_collective_timeout():
    """sweep.py's config is enough for make_accelerator, and the timeout reaches the process
    group even at Accelerate's own default value, which it would otherwise leave out."""
    for seconds in (42.0, 600.0):
        accelerator = make_accelerator(SweepConfig(checkpoint="runs/x", cpu=True, collective_timeout=seconds))
        assert accelerator.device.type == "cpu"
        assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(seconds=seconds)}
