"""How an option is declared and checked: the machinery behind fixres/config.py's option groups.

    option(default, help, choices)      # a field of a group, with its one-line help
    check_finite(cfg), check_choices(cfg)  # every config, after its groups' own checks
    Config.from_dict(values, source)     # a config.json read back, each value's type checked
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import field


class ConfigError(ValueError):
    """A bad option or config file; the message names it."""


RUNS = "runs"  # train.py's folder of run folders, where sweep.py and finetune.py look without --checkpoint
MAX_SIZE = 2048  # a larger test size is almost surely a typo (and a 64-image batch of it is ~3 GB)


def option(default, help: str, choices: tuple | None = None, parse=None):
    """A config field; `parse` replaces the type's own conversion of the command-line text."""
    return field(default=default, metadata={"help": help, "choices": choices, "parse": parse})


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check_positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value != "auto" and value <= 0:
            raise ConfigError(f"{flag(name)} must be > 0, got {value}")


def check_fraction(cfg, name: str) -> None:
    """A value in (0, 1]: crop_pct, min_scale."""
    value = getattr(cfg, name)
    if value is not None and not 0 < value <= 1:
        raise ConfigError(f"{flag(name)} must be in (0, 1], got {value}")


def check_finite(cfg) -> None:
    """float("nan") and float("inf") parse, and pass every comparison: refuse them first."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag(f.name)} must be a finite number, got {value}")


def check_choices(cfg) -> None:
    """A value given in code or a config file, not only on the command line, is one of the field's choices."""
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")


def check_sizes(sizes, crop_pct: float) -> None:
    """Test sizes and crop_pct, as sweep.py and run_sweep take them."""
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    for size in sizes:
        if not 0 < size <= MAX_SIZE:
            raise ConfigError(f"--sizes: each size must be between 1 and {MAX_SIZE} pixels, got {size}")


def batch_size_arg(text: str):
    """--batch-size takes a number or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', got {text!r}") from None


# set by fixres itself from its own options: a keyword of the same name would clash or be ignored
RESERVED_MODEL_KWARGS = {"num_classes": "", "pretrained": " (use --pretrained)", "weights": " (use --pretrained or --weights)",
                         "output_stride": " (use --output-stride)"}


def check_kwargs_recordable(kwargs: dict | None) -> None:
    for key, value in (kwargs or {}).items():
        if key in RESERVED_MODEL_KWARGS:
            raise ConfigError(f"--model-kwargs {key}: fixres sets it{RESERVED_MODEL_KWARGS[key]}")
        try:  # recorded in config.json, the weights' metadata and the timm export
            json.dumps(value)
        except TypeError:
            raise ConfigError(f"--model-kwargs {key}={value!r}: not a value a config file can hold "
                              f"(numbers, text, True/False/None, lists, tuples)") from None


def composed(groups: tuple):
    """The groups as base classes in the order that lists their fields in `groups`' order
    (a dataclass takes its bases' fields last base first)."""
    return tuple(reversed(groups))


class Config:
    """What every job's config does: check each of its groups, then what spans groups."""
    COMMAND_LINE: typing.ClassVar[tuple] = ()  # the groups the job's parser offers

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_finite(self)
        for group in reversed(type(self).__mro__):  # the groups in their fields' order
            if "check" in vars(group) and group is not Config:
                group.check(self)
        self.check_across()
        check_choices(self)

    def check_across(self) -> None:
        """Checks that span groups."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config"):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if not _has_type(value, hints[key]):
                hint = hints[key]
                raise ConfigError(f"{source}: {key} must be {getattr(hint, '__name__', hint)}, got {value!r}")
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


def _has_type(value, hint) -> bool:
    """Whether a JSON value fits a field's type hint (an int is a float; a bool is not an int)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_has_type(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
