"""Typed configuration for the fixres jobs and the one command-line builder they share.

Every option of train.py is a field of `TrainConfig` with its default and a
one-line help; the parser is generated from the fields, so a flag cannot exist
without a field that something reads. Both spellings work: `--batch-size` and
`--batch_size` (the latter is what `accelerate launch` users type).

    python train.py --help                  # every option with its default
    python train.py --epochs 2 --lr 1e-3    # overrides on top of the preset

With no `--data`, the built-in dataset's preset (`SHAPES_PRESET`) replaces the
real-data defaults for the options the user did not give; `--recipe NAME` puts a
published recipe's settings (`RECIPES`) on top, and the options given still win:

    python train.py --data /imagenet --recipe tv-resnet50-v2              # torchvision's ResNet-50 V2
    python train.py --data /imagenet --recipe tv-resnet50-v2 --epochs 90  # the same, shorter
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad option or config file; the message names it."""


RUNS = "runs"  # train.py's folder of run folders, where sweep.py and finetune.py look without --checkpoint
MAX_SIZE = 2048  # a larger test size is almost surely a typo (and a 64-image batch of it is ~3 GB)


# --recipe: published recipes as presets; an option given on the command line wins over them.
# torchvision's ResNet-50 IMAGENET1K_V2 weights (80.858% top-1): its blog post "How to Train
# State-of-the-Art Models Using TorchVision's Latest Primitives" and references/classification.
# FixRes's "train low, test high" as practised today: crops of 176 in training, 224 at test.
TV_RESNET50_V2 = dict(
    model="tv:resnet50",
    train_res=176,             # train_crop_size
    test_res=224,              # val_crop_size
    crop_pct=224 / 232,        # val_resize_size 232: Resize(232) + CenterCrop(224)
    interpolation="bilinear",
    epochs=600,
    batch_size=128,            # per process, on 8 GPUs: 1024 images per optimizer step
    optimizer="sgd",           # momentum 0.9 (theirs plain, ours Nesterov: README)
    momentum=0.9,
    lr=0.5,                    # for 1024 images per step
    warmup_epochs=5,           # linear, then cosine to 0
    weight_decay=2e-5,         # none on norm layers (ours: none on biases either)
    label_smoothing=0.1,
    auto_augment="ta_wide",
    random_erase=0.1,
    mixup_alpha=0.2,
    cutmix_alpha=1.0,
    model_ema=True,
    model_ema_steps=32,
    # torchvision's train.py turns its --model-ema-decay 0.99998 into a decay per update,
    # 1 - (1 - 0.99998) * images per update / epochs (the average then spans the same share
    # of runs of any length): 0.99891 for 8 x 128 images per step, 32 steps, 600 epochs
    model_ema_decay=1 - (1 - 0.99998) * 8 * 128 * 32 / 600,
)

# The built-in data's recipes for the model families without BatchNorm by default (README,
# "Model families"; docs/shapes-lab.md: what was tried). Stock LayerNorm test_convnext and
# test_vit stay near chance here in 15-26 CPU epochs at any learning rate; these variants learn.
# A ConvNeXt with BatchNorm, ReLU and an overlapping conv stem (timm's own options): its head is
# still timm's NormMlpClassifierHead, a norm then the classifier, which finetune.py adapts.
SHAPES_CONVNEXT = dict(
    model="test_convnext",
    model_kwargs=dict(stem_type="overlap_act", norm_layer="batchnorm2d", conv_mlp=True, act_layer="relu",
                      ls_init_value=None),
    lr=2e-3,
    warmup_epochs=1,
    min_scale=0.35,  # 0.08's crops of a 128 px image leave too little for a stride-32 net at 64 px
    epochs=26,
)
# A hybrid ViT (timm's ResNet stem, then transformer blocks on 2x2 patches of its stride-4 map):
# 8 px per token, 8x8 = 64 tokens at 64 px. Its last norm is a LayerNorm (fc_norm, before the average pool),
# so fine-tuning adapts a LayerNorm and the head. Patch-embedding ViTs (test_vit, patch 4-8) were
# too slow or stayed near chance on this CPU.
SHAPES_VIT = dict(
    model="vit_tiny_r_s16_p8_224",
    model_kwargs=dict(patch_size=2, embed_dim=64, depth=6, num_heads=2, global_pool="avg", class_token=False),
    lr=5e-4,
    warmup_epochs=2,
    min_scale=0.35,
    clip_grad_norm=1.0,
    epochs=30,
)
RECIPES = {"tv-resnet50-v2": TV_RESNET50_V2, "shapes-convnext": SHAPES_CONVNEXT, "shapes-vit": SHAPES_VIT}


def _opt(default, help: str, choices: tuple | None = None, parse=None):
    """A config field; `parse` replaces the type's own conversion of the command-line text."""
    return field(default=default, metadata={"help": help, "choices": choices, "parse": parse})


# The options of every job's runtime: (default, help, choices), one definition for all configs.
RUNTIME_OPTIONS = {
    "mixed_precision": (None, "autocast dtype (default: Accelerate's config / launch flag, else none)",
                        ("no", "bf16", "fp16")),
    "cpu": (False, "run on the CPU even when a GPU is present"),
    "collective_timeout": (600.0, "seconds a process waits for the others at a collective before it stops with an "
                                  "error (a rank died or hangs); torch's own default is 30 min"),
    "workers": (None, "data loader worker processes per rank (default: from the CPU count)"),
}


def _runtime_opt(name: str):
    return _opt(*RUNTIME_OPTIONS[name])


# A speed budget (fixres/throughput.py), one definition for sweep.py and finetune.py --res auto
BUDGET_OPTIONS = {
    "max_latency_ms": (None, "choose the best size among those whose forward pass of one image (batch 1) takes at "
                             "most this many milliseconds on this device (the median of timings after a warm-up)"),
    "min_images_per_s": (None, "choose the best size among those that forward at least this many images a second "
                               "at --batch-size on this device (with --max-latency-ms: a size must meet both)"),
}


def _budget_opt(name: str):
    return _opt(*BUDGET_OPTIONS[name])


def check_budget(cfg) -> None:
    for name in BUDGET_OPTIONS:
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")


def check_finite(cfg) -> None:
    """float("nan") and float("inf") parse, and pass every comparison: refuse them first."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")


def check_choices(cfg) -> None:
    """A value given in code or a config file, not only on the command line, is one of the field's choices."""
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")


def check_collective_timeout(seconds: float) -> None:
    if seconds <= 0:
        raise ConfigError(f"--collective-timeout must be > 0 seconds, got {seconds}")


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


def model_kwarg(text: str) -> tuple[str, object]:
    """`KEY=VALUE` as timm's train.py reads --model-kwargs (its ParseKwargs): the value as a
    Python literal where it parses (8, 0.1, False, None, (32, 32)), else the text itself."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # no quoting needed on the command line for a text value


class ModelKwargsAction(argparse.Action):
    """`--model-kwargs k=v k=v` -> {"k": v, ...}."""
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, dict(values))


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


@dataclass
class TrainConfig:
    CLI_HIDDEN: typing.ClassVar[tuple] = ("shapes",)

    # data
    data: str | None = _opt(None, "CSV split (image_id,label,is_val) or ImageFolder root with train/ and val/; none = built-in shapes dataset")
    images: str | None = _opt(None, "image folder for a CSV split (default: the CSV's folder, or its images/ subfolder)")
    skip_bad_images: bool = _opt(False, "skip images that fail to decode (counted per epoch) instead of stopping")
    shapes: dict | None = _opt(None, "set by train.py, not an option: the built-in dataset a run used (no --data), "
                                     "its version, what its images depend on and the CSV read")
    # model
    model: str = _opt("resnet50", "timm model name, or tv:<name> for torchvision")
    pretrained: bool = _opt(False, "start from the library's pretrained weights (needs network access)")
    weights: str | None = _opt(None, "local state dict (.safetensors or .pth) to start from; the classifier is replaced if the class count differs")
    output_stride: int | None = _opt(None, "timm models that support it: total stride of the network (16 or 8 dilate the last "
                                           "stages: a larger last feature map at the same resolution, same weights)")
    model_kwargs: dict | None = _opt(None, "KEY=VALUE ... for the model's constructor, as timm's train.py takes them "
                                           "(patch_size=8 img_size=64 drop_path_rate=0.1 stem_type=deep): values are "
                                           "Python literals where they parse, else text; kept with the weights")
    channels_last: bool | None = _opt(None, "channels_last memory format (default: on for GPUs; off on CPUs, where it measured slower)")
    compile: bool = _opt(False, "torch.compile the model (minutes of compiling first; pays on GPUs for long runs)")
    fast_decode: bool | None = _opt(True, "training crops drawn before decoding, JPEGs decoded at reduced scale, "
                                          "resized as uint8 and normalised on the device; --no-fast-decode: "
                                          "torchvision's transforms on each decoded image (null: on for GPUs only)")
    decode: str = _opt("auto", "where JPEGs are decoded: cpu = in the loader workers; gpu = a batch at a time on the "
                               "model's device (pip install torchcodec); auto = gpu on CUDA when torchcodec is installed",
                       ("auto", "cpu", "gpu"))
    # resolution and preprocessing
    train_res: int = _opt(224, "RandomResizedCrop size for training")
    test_res: int | None = _opt(None, "centre-crop size for validation (default: --train-res)")
    for_test_res: int | None = _opt(None, "the test size a deployment fixes: train at the size whose objects look as "
                                          "large as a test at it shows them (python -m fixres.resolution --test-res N, "
                                          "from --crop-pct and --min-scale), validate at it; instead of --train-res "
                                          "and --test-res")
    min_scale: float = _opt(0.08, "smallest RandomResizedCrop area fraction (torchvision's default 0.08)")
    crop_pct: float = _opt(0.875, "test crop ratio: Resize(int(res / crop_pct)) then CenterCrop(res); not given, "
                                  "with --pretrained or --weights: the model's pretrained weights' own")
    interpolation: str = _opt("bilinear", "resize interpolation; not given, with --pretrained or --weights: the "
                                          "model's pretrained weights' own, as crop_pct", ("bilinear", "bicubic", "nearest"))
    mean: list[float] | None = _opt(None, "per-channel normalisation mean (R G B); not given, with --pretrained or "
                                          "--weights: the pretrained weights' own; else ImageNet's")
    std: list[float] | None = _opt(None, "per-channel normalisation std (R G B); chosen as --mean")
    # optimisation
    epochs: int = _opt(10, "training epochs")
    batch_size: int | str = _opt(64, "images per process per step, or 'auto': the largest power of two whose "
                                     "training step fits in 90%% of the GPU's memory (64 on a CPU)", parse=batch_size_arg)
    lr: float = _opt(1e-3, "peak learning rate (reached after warm-up)")
    optimizer: str = _opt("adamw", "optimizer; sgd is torch's SGD with Nesterov momentum", ("adamw", "sgd"))
    weight_decay: float = _opt(0.1, "weight decay of the weights of dim > 1 only: biases and norm parameters are "
                                    "not decayed")
    momentum: float = _opt(0.9, "SGD momentum (Nesterov)")
    warmup_epochs: float = _opt(1.0, "linear warm-up length in epochs, then cosine decay to zero")
    freeze_epochs: int = _opt(0, "train only the classifier for the first N epochs, the rest frozen in eval mode (transfer learning from --weights)")
    label_smoothing: float = _opt(0.0, "label smoothing for the cross-entropy loss")
    grad_accum: int = _opt(1, "gradient accumulation steps per optimizer step")
    clip_grad_norm: float | None = _opt(None, "clip the gradients' global L2 norm to this before each optimizer step "
                                              "(default: no clipping)")
    # the training features of timm's and torchvision's recipes, all off by default
    recipe: str | None = _opt(None, "a published recipe's settings as defaults (options given here still win): "
                                    "tv-resnet50-v2 = torchvision's ResNet-50 IMAGENET1K_V2 (README); shapes-convnext, "
                                    "shapes-vit = a ConvNeXt and a ViT on the built-in data", tuple(RECIPES))
    auto_augment: str | None = _opt(None, "per-image automatic augmentation after the crop and flip: ta_wide = "
                                          "TrivialAugmentWide, ra = RandAugment (2 ops, magnitude 9)", ("ta_wide", "ra"))
    random_erase: float = _opt(0.0, "probability of filling a rectangle of each training image with the mean colour (RandomErasing; 0 = off)")
    mixup_alpha: float = _opt(0.0, "Mixup on each training batch, its Beta(alpha, alpha) mixing weight; with "
                                   "--cutmix-alpha, one of the two per batch (0 = off; no training accuracy then)")
    cutmix_alpha: float = _opt(0.0, "CutMix on each training batch, its Beta(alpha, alpha) area (0 = off)")
    model_ema: bool = _opt(False, "keep an exponential moving average (EMA) of the weights, evaluated beside them "
                                  "every epoch; best.safetensors is whichever did better (README: Model EMA)")
    model_ema_decay: float = _opt(0.999, "the EMA's weight on its past at each update: it averages over about "
                                         "--model-ema-steps / (1 - decay) optimizer steps")
    model_ema_steps: int = _opt(32, "optimizer steps between EMA updates (torchvision's 32)")
    # runtime
    mixed_precision: str | None = _runtime_opt("mixed_precision")
    cpu: bool = _runtime_opt("cpu")
    collective_timeout: float = _runtime_opt("collective_timeout")
    workers: int | None = _runtime_opt("workers")
    seed: int = _opt(0, "random seed (data order, augmentation, initialisation)")
    output: str = _opt(RUNS, "folder that holds the run folders")
    name: str | None = _opt(None, "run folder name (default: <data>-<model>-<res>-<time>)")
    resume: str | None = _opt(None, "run folder or checkpoint to continue, or 'auto' for the newest under --output")
    stop_after: int | None = _opt(None, "stop with a checkpoint after this many epochs of this invocation (time-sliced jobs)")
    log_with: str | None = _opt(None, "Accelerate tracker to log to", ("tensorboard", "wandb"))

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_finite(self)
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            raise ConfigError(f"--batch-size must be a number or 'auto', got {self.batch_size!r}")
        for name in ("train_res", "test_res", "for_test_res", "epochs", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value != "auto" and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        if not 0 < self.min_scale <= 1:
            raise ConfigError(f"--min-scale must be in (0, 1], got {self.min_scale}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.output_stride is not None and self.output_stride not in (8, 16, 32):
            raise ConfigError(f"--output-stride must be 8, 16 or 32, got {self.output_stride}")
        check_kwargs_recordable(self.model_kwargs)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ConfigError(f"--{name} takes 3 numbers (R G B), got {len(value)}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"--std must be > 0 for every channel, got {' '.join(map(str, self.std))}")
        if self.freeze_epochs < 0:
            raise ConfigError(f"--freeze-epochs must be >= 0, got {self.freeze_epochs}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"--clip-grad-norm must be > 0, got {self.clip_grad_norm}")
        if not 0 <= self.random_erase <= 1:
            raise ConfigError(f"--random-erase must be a probability in [0, 1], got {self.random_erase}")
        if self.decode == "gpu" and (self.auto_augment or self.random_erase):
            raise ConfigError("--decode gpu decodes after the workers, where --auto-augment and --random-erase run: "
                              "use --decode cpu (auto does) with them")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (0 = off), got {getattr(self, name)}")
        if not 0 < self.model_ema_decay < 1:
            raise ConfigError(f"--model-ema-decay must be in (0, 1), got {self.model_ema_decay}")
        if self.model_ema_steps < 1:
            raise ConfigError(f"--model-ema-steps must be >= 1, got {self.model_ema_steps}")
        check_collective_timeout(self.collective_timeout)
        check_choices(self)

    @property
    def eval_res(self) -> int:
        return self.test_res or self.train_res

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


# The built-in dataset's defaults: a well-fitted model in minutes on a CPU, whose sweep shows
# the FixRes effect (docs/shapes-lab.md: what was tried).
SHAPES_PRESET = dict(
    model="test_resnet",   # timm's 0.4M-parameter ResNet: fast enough to train on a CPU
    output_stride=8,       # an 8x8 last feature map at 64 px; stride 32's 2x2 turns the sweep into a saw-tooth
    train_res=64,          # stored images are 128 px, so the sweep can go up to 2x
    min_scale=0.08,        # the paper's RandomResizedCrop: the zoom FixRes corrects
    crop_pct=1.0,          # test on the whole frame (timm's test_crop_pct for its ResNets): the object as framed
    epochs=15,             # the last epochs still add
    lr=3e-3,               # AdamW with batch 32
    batch_size=32,
    weight_decay=0.05,
    workers=1,             # decoding 128 px JPEGs is cheap; one worker keeps a core for compute
)

# finetune.py on a run of the built-in data: few steps an epoch where the reference's settings
# assume ImageNet's thousands, so a longer, stronger fine-tune (docs/shapes-lab.md: what was tried)
FINETUNE_SHAPES_PRESET = dict(lr=0.05, epochs=10)


# A preset's or recipe's options that fit its model only: left out when another model is asked for
MODEL_OPTIONS = ("output_stride", "model_kwargs")


def train_presets(given: dict) -> dict:
    """train.py's defaults for the options not given: the built-in dataset's preset when there
    is no --data, and --recipe's settings over it. A preset's or recipe's model options go with
    its model: `--model test_vit` (or a recipe's model) gets no --output-stride it may not take,
    and `--recipe shapes-vit --model test_vit` not the hybrid ViT's constructor keywords."""
    if "for_test_res" in given and {"train_res", "test_res"} & set(given):
        raise ConfigError("--for-test-res N chooses the training size and tests at N: give it without --train-res "
                          "and --test-res, or give those two instead")
    preset = {} if given.get("data") else SHAPES_PRESET
    recipe = RECIPES.get(given.get("recipe"), {})
    model = given.get("model", recipe.get("model", preset.get("model")))
    preset, recipe = ({k: v for k, v in options.items() if options.get("model") == model or k not in MODEL_OPTIONS}
                      for options in (preset, recipe))
    return {**preset, **recipe}


FINETUNE_METHODS = ("finetune", "bn-stats", "parametric")
FINETUNE_AUGS = ("test", "test+", "rrc")


@dataclass
class FinetuneConfig(TrainConfig):
    """finetune.py: the training loop with FixRes fields and defaults. The model, its
    training resolution and the data come from --checkpoint (model, train_res and
    test_res are filled in from it, so they are not command-line options; so are mean and
    std, which the weights' metadata holds)."""
    CLI_HIDDEN: typing.ClassVar[tuple] = ("shapes", "model", "pretrained", "weights", "output_stride", "model_kwargs",
                                          "train_res", "test_res", "for_test_res", "freeze_epochs",
                                          "compile", "fast_decode", "mean", "std",
                                          # train.py's recipe features; fine-tuning has its own --aug
                                          "recipe", "auto_augment", "random_erase", "mixup_alpha", "cutmix_alpha",
                                          "model_ema", "model_ema_decay", "model_ema_steps", "clip_grad_norm")

    checkpoint: str | None = _opt(None, "run folder, checkpoint folder or .safetensors file written by train.py "
                                        f"(default: the newest train.py run under --output, else under {RUNS}/)")
    res: str | int = _opt("auto", "resolution to fine-tune and test at, or 'auto': the best size on the held-out "
                          "validation images, a last BN re-estimated at each on --choice-images training images; "
                          "a run trained with --for-test-res N: N")
    choice_images: int = _opt(1000, "validation images held out for the choices (--res auto's size, the epoch that "
                                    "ships), drawn with --seed, at most half; the rest report before and after")
    method: str = _opt("finetune", "finetune: train the classifier with the last norm (a BN in train mode, a "
                       "LayerNorm's weight and bias); bn-stats: only re-estimate that BN's statistics (no gradients); "
                       "parametric: the paper's Frechet map before the classifier",
                       FINETUNE_METHODS)
    aug: str = _opt("test+", "fine-tuning images: test = Resize + CenterCrop at --res; test+ = that with a flip, light "
                    "colour jitter and a horizontally shifted crop (FixRes v2); rrc = RandomResizedCrop", FINETUNE_AUGS)
    train_bn_affine: bool = _opt(False, "also train the last BN's weight and bias (a LayerNorm's or GroupNorm's "
                                        "always train)")
    train_pos_embed: bool = _opt(False, "with --method finetune, a ViT's absolute position embedding trains too "
                                        "(timm's pos_embed, torchvision's encoder.pos_embedding; no weight decay), as "
                                        "DeiT's fine-tuning at a new size does; a step then backpropagates through "
                                        "every block")
    sizes: list[int] | None = _opt(None, "with --res auto: the sizes to sweep (default: sweep.py's, about 0.5x to 2x the training res)")
    parametric_scope: str = _opt("global", "parametric: one distribution for all pooled features, or one per feature",
                                 ("global", "feature"))
    fit_images: int = _opt(5000, "parametric: training images whose pooled features are fitted at each resolution")
    # the source's training-time preprocessing, kept unless given here
    min_scale: float = _opt(0.08, "RandomResizedCrop min area fraction for --aug rrc and the predicted best size; "
                                  "not given: the source run's (its weights' metadata, else its config), else this")
    crop_pct: float = _opt(0.875, "test crop ratio: Resize(int(res / crop_pct)) then CenterCrop(res); not given: "
                                  "the source run's, else this")
    interpolation: str = _opt("bilinear", "resize interpolation; not given: the source run's, else this",
                              ("bilinear", "bicubic", "nearest"))
    # the training loop's options with fine-tuning defaults (reference: SGD, momentum 0.9, wd 1e-4, lr 1e-3..8e-3)
    epochs: int = _opt(5, "fine-tuning epochs")
    optimizer: str = _opt("sgd", "optimizer; sgd is torch's SGD with Nesterov momentum, as in train.py", ("adamw", "sgd"))
    lr: float = _opt(8e-3, "peak learning rate, cosine decay, no warm-up")
    weight_decay: float = _opt(1e-4, "weight decay of the classifier's weight matrix only: not of its bias nor the "
                                     "last BN's weight and bias, as in train.py")
    warmup_epochs: float = _opt(0.0, "linear warm-up length in epochs (the head starts trained: none needed)")
    output: str | None = _opt(None, "folder for the new run folder (default: the folder that holds the source run)")
    # a speed budget: --res auto chooses among the sizes that meet it; a --res N that does not is refused
    max_latency_ms: float | None = _budget_opt("max_latency_ms")
    min_images_per_s: float | None = _budget_opt("min_images_per_s")

    def validate(self) -> None:
        super().validate()
        if self.resume == "auto" and (self.checkpoint is None or not self.name):
            raise ConfigError("finetune.py --resume auto needs --checkpoint and --name (it continues the fine-tuning "
                              "run of that name, if any); or give --resume the fine-tuning run folder")
        if self.batch_size == "auto":
            raise ConfigError("--batch-size auto is train.py's; give finetune.py a number")
        if self.res != "auto":
            try:
                self.res = int(self.res)
            except ValueError:
                raise ConfigError(f"--res must be a size in pixels or 'auto', got {self.res!r}") from None
            if self.res <= 0:
                raise ConfigError(f"--res must be > 0, got {self.res}")
        if self.sizes is not None and any(s <= 0 for s in self.sizes):
            raise ConfigError(f"--sizes must all be > 0, got {self.sizes}")
        if self.fit_images <= 1:
            raise ConfigError(f"--fit-images must be > 1, got {self.fit_images}")
        if self.choice_images <= 0:
            raise ConfigError(f"--choice-images must be > 0, got {self.choice_images}")
        check_budget(self)
        if self.train_pos_embed and self.method != "finetune":
            raise ConfigError(f"--train-pos-embed goes with --method finetune (--method {self.method} trains no "
                              f"parameters)")


@dataclass
class SweepConfig:
    """sweep.py: one set of weights evaluated at many test sizes."""
    # what to evaluate
    checkpoint: str | None = _opt(None, "run folder, checkpoint folder or .safetensors file written by train.py or "
                                        f"finetune.py (default: the newest run under {RUNS}/)")
    which: str = _opt("best", "weights of a run folder: best (with --model-ema, raw or EMA, whichever scored higher), "
                              "last, or ema (the EMA after the last epoch)", ("best", "last", "ema"))
    model: str | None = _opt(None, "with --weights: timm model name, or tv:<name>")
    weights: str | None = _opt(None, "plain state dict (.safetensors or .pth, no fixres metadata) instead of --checkpoint; needs --model")
    train_res: int | None = _opt(None, "with --weights: the resolution they were trained at (default 224; a checkpoint knows its own)")
    min_scale: float | None = _opt(None, "RandomResizedCrop min scale of training, for the prediction (default: the weights' metadata, else the run's config, else 0.08)")
    # data
    data: str | None = _opt(None, "CSV split or ImageFolder root (default: the data in the run's config.json)")
    images: str | None = _opt(None, "image folder for a CSV split (default: the run's, else beside the CSV)")
    # the sweep
    sizes: list[int] | None = _opt(None, "test sizes (default: about 0.5x to 2x the training res, with it and the predicted best)")
    crop_pct: float | None = _opt(None, "Resize(int(size / crop_pct)) + CenterCrop(size) (default: the run's; with "
                                        "--weights, the model's pretrained preprocessing; else 0.875); the training "
                                        "size at it is the reference of every paired difference")
    crop_pcts: list[float] | None = _opt(None, "also sweep these crop ratios: every (size, crop_pct) pair, each image "
                                               "decoded once for all; the --crop-pct (or the run's) is always in")
    activations: bool = _opt(False, "also collect the pooled features that feed the classifier: stats per size and activations.png")
    # runtime
    batch_size: int = _opt(64, "images per process per forward pass")
    workers: int | None = _runtime_opt("workers")
    decode: str = _opt("auto", "cpu: the loader workers decode and resize; gpu: each image is decoded once on the "
                               "model's device (torchcodec); auto: gpu on CUDA when torchcodec is installed",
                       ("auto", "cpu", "gpu"))
    mixed_precision: str | None = _runtime_opt("mixed_precision")
    cpu: bool = _runtime_opt("cpu")
    collective_timeout: float = _runtime_opt("collective_timeout")
    output: str | None = _opt(None, "folder for sweep.csv, sweep.json and the plots (default: the run folder)")
    write_best: bool = _opt(False, "record the best size (within the budget, when one is given) and its crop_pct "
                                   "as the run's test size and test crop ratio: in the swept weights' metadata (test_res, test_crop_pct) and in the run's timm "
                                   "export (test_input_size, test_crop_pct), which is written again")
    # speed per size: the forward pass alone on synthetic input, before the sweep (fixres/throughput.py)
    speed: bool = _opt(True, "measure each size's images/s at --batch-size and milliseconds at batch 1 on this "
                             "device before the sweep (on a CPU, 4-5 s for the built-in data's 10 sizes beside "
                             "its 37 s sweep); --no-speed skips it")
    speed_repeats: int = _opt(5, "timed forward passes per size and batch (after one warm-up); the median is kept")
    max_latency_ms: float | None = _budget_opt("max_latency_ms")
    min_images_per_s: float | None = _budget_opt("min_images_per_s")

    def __post_init__(self):
        check_finite(self)
        if self.checkpoint is not None and self.weights is not None:
            raise ConfigError("give --checkpoint (a fixres run) or --weights FILE with --model NAME, not both")
        if self.weights and not self.model:
            raise ConfigError("--weights needs --model NAME (the checkpoint's model is only known to fixres runs)")
        if self.model and not self.weights:
            raise ConfigError("--model goes with --weights; a --checkpoint names its own model")
        if self.write_best and self.weights:
            raise ConfigError("--write-best records the size in a fixres run: give --checkpoint, not --weights")
        for name in ("train_res", "batch_size", "speed_repeats"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.min_scale is not None and not 0 < self.min_scale <= 1:
            raise ConfigError(f"--min-scale must be in (0, 1], got {self.min_scale}")
        check_budget(self)
        if not self.speed and (self.max_latency_ms or self.min_images_per_s):
            raise ConfigError("--no-speed: a budget (--max-latency-ms, --min-images-per-s) needs the speed measured")
        check_sizes(self.sizes or [], self.crop_pct if self.crop_pct is not None else 0.875)
        if self.sizes:
            self.sizes = sorted(set(self.sizes))
        if self.crop_pcts is not None:
            if not self.crop_pcts or not all(0 < c <= 1 for c in self.crop_pcts):
                raise ConfigError(f"--crop-pcts: each must be in (0, 1], got {' '.join(map(str, self.crop_pcts))}")
            self.crop_pcts = sorted(set(self.crop_pcts))
        check_collective_timeout(self.collective_timeout)
        check_choices(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser(cls, description: str, preset_note: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field; defaults are SUPPRESSed so
    that the caller can tell which options the user actually gave."""
    parser = argparse.ArgumentParser(description=description, epilog=preset_note,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(cls)
    hidden = getattr(cls, "CLI_HIDDEN", ())
    for f in dataclasses.fields(cls):
        if f.name in hidden:
            continue
        hint = hints[f.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        nargs = None
        if typing.get_origin(hint) is list:  # list[int] -> `--sizes 64 128 224`
            hint, nargs = typing.get_args(hint)[0], "+"
        if hint is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, help=help_text)
        elif hint is dict:  # --model-kwargs k=v k=v
            parser.add_argument(*flags, nargs="+", type=model_kwarg, action=ModelKwargsAction, metavar="KEY=VALUE",
                                help=help_text)
        else:
            parser.add_argument(*flags, type=f.metadata.get("parse") or hint, nargs=nargs, choices=f.metadata.get("choices"),
                                help=help_text, metavar=f.name.upper() if not f.metadata.get("choices") else None)
    return parser


def parse_args(cls, argv, description: str, presets: dict | None = None):
    """Parse argv into (config, explicitly_given_keys). `presets(given) -> dict` may supply
    defaults that depend on what the user gave (the built-in dataset's preset)."""
    parser = build_parser(cls, description)
    given = vars(parser.parse_args(argv))
    try:
        defaults = presets(given) if presets else {}
        return cls(**{**defaults, **given}), set(given)
    except ConfigError as err:
        parser.error(str(err))

