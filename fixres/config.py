"""Typed configuration of the three jobs, composed from shared option groups.

A group is a dataclass of options that belong together: defaults, one-line help, `check`. A
job's config is made of groups (`GROUPS`) and offers some on its command line (`COMMAND_LINE`):
finetune.py's model and resolution are the fine-tuned run's, fields but not options. The
parser (fixres/layers.py) is generated from the groups, so no flag exists without a field;
`--batch-size` and `--batch_size` both work. Where each value comes from (defaults < preset or
recipe < the source or resumed run < the command line) is decided in fixres/layers.py.

    python train.py --help                  # every option with its default
    python train.py --epochs 2 --lr 1e-3    # overrides on top of the preset
"""
from __future__ import annotations

import typing
from dataclasses import dataclass

from fixres.options import (RUNS, Config, ConfigError, batch_size_arg, check_fraction,
                            check_kwargs_recordable, check_positive, composed, flag, option)
from fixres.presets import RECIPES
from fixres.sweep_options import SweepDataOptions, SweepOptions, SweepOutputOptions, SweepSourceOptions

FINETUNE_METHODS = ("finetune", "bn-stats", "parametric")
FINETUNE_AUGS = ("test", "test+", "rrc")


@dataclass
class DataOptions:
    data: str | None = option(None, "CSV split (image_id,label,is_val) or ImageFolder root with train/ and val/; none = built-in shapes dataset")
    images: str | None = option(None, "image folder for a CSV split (default: the CSV's folder, or its images/ subfolder)")
    skip_bad_images: bool = option(False, "skip images that fail to decode (counted per epoch) instead of stopping")


@dataclass
class BuiltInDataRecord:
    """Not an option: train.py records the built-in dataset a run used."""
    shapes: dict | None = option(None, "set by train.py, not an option: the built-in dataset a run used (no --data), "
                                       "its version, what its images depend on and the CSV read")


@dataclass
class ModelOptions:
    """train.py's; finetune.py's are those of the run it fine-tunes."""
    model: str = option("resnet50", "timm model name, or tv:<name> for torchvision")
    pretrained: bool = option(False, "start from the library's pretrained weights (needs network access)")
    weights: str | None = option(None, "local state dict (.safetensors or .pth) to start from; the classifier is replaced if the class count differs")
    output_stride: int | None = option(None, "timm models that support it: total stride of the network (16 or 8 dilate the last "
                                             "stages: a larger last feature map at the same resolution, same weights)")
    model_kwargs: dict | None = option(None, "KEY=VALUE ... for the model's constructor, as timm's train.py takes them "
                                             "(patch_size=8 img_size=64 drop_path_rate=0.1 stem_type=deep): values are "
                                             "Python literals where they parse, else text; kept with the weights")
    freeze_epochs: int = option(0, "train only the classifier for the first N epochs, the rest frozen in eval mode (transfer learning from --weights)")

    def check(self) -> None:
        if self.output_stride is not None and self.output_stride not in (8, 16, 32):
            raise ConfigError(f"--output-stride must be 8, 16 or 32, got {self.output_stride}")
        check_kwargs_recordable(self.model_kwargs)
        if self.freeze_epochs < 0:
            raise ConfigError(f"--freeze-epochs must be >= 0, got {self.freeze_epochs}")


@dataclass
class DeviceOptions:
    channels_last: bool | None = option(None, "channels_last memory format (default: on for GPUs; off on CPUs, where it measured slower)")
    decode: str = option("auto", "where JPEGs are decoded: cpu = in the loader workers; gpu = a batch at a time on the "
                                 "model's device (pip install torchcodec); auto = gpu on CUDA when torchcodec is installed",
                         ("auto", "cpu", "gpu"))


@dataclass
class TrainSpeedOptions:
    """train.py's; fine-tuning runs without them."""
    compile: bool = option(False, "torch.compile the model (minutes of compiling first; pays on GPUs for long runs)")
    fast_decode: bool | None = option(True, "training crops drawn before decoding, JPEGs decoded at reduced scale, "
                                            "resized as uint8 and normalised on the device; --no-fast-decode: "
                                            "torchvision's transforms on each decoded image (null: on for GPUs only)")


@dataclass
class ResolutionOptions:
    """train.py's; finetune.py's training size is its source run's."""
    train_res: int = option(224, "RandomResizedCrop size for training")
    test_res: int | None = option(None, "centre-crop size for validation (default: --train-res)")
    for_test_res: int | None = option(None, "the test size a deployment fixes: train at the size whose objects look as "
                                            "large as a test at it shows them (python -m fixres.resolution --test-res N, "
                                            "from --crop-pct and --min-scale), validate at it; instead of --train-res "
                                            "and --test-res")

    def check(self) -> None:
        check_positive(self, "train_res", "test_res", "for_test_res")

    @property
    def eval_res(self) -> int:
        return self.test_res or self.train_res


@dataclass
class PreprocessingOptions:
    min_scale: float = option(0.08, "smallest RandomResizedCrop area fraction (torchvision's default 0.08)")
    crop_pct: float = option(0.875, "test crop ratio: Resize(int(res / crop_pct)) then CenterCrop(res); not given, "
                                    "with --pretrained or --weights: the model's pretrained weights' own")
    interpolation: str = option("bilinear", "resize interpolation; not given, with --pretrained or --weights: the "
                                            "model's pretrained weights' own, as crop_pct", ("bilinear", "bicubic", "nearest"))

    def check(self) -> None:
        check_fraction(self, "crop_pct")
        check_fraction(self, "min_scale")


@dataclass
class SourcePreprocessingOptions(PreprocessingOptions):
    """finetune.py's: the source's training-time preprocessing, kept unless given here."""
    min_scale: float = option(0.08, "RandomResizedCrop min area fraction for --aug rrc and the predicted best size; "
                                    "not given: the source run's (its weights' metadata, else its config), else this")
    crop_pct: float = option(0.875, "test crop ratio: Resize(int(res / crop_pct)) then CenterCrop(res); not given: "
                                    "the source run's, else this")
    interpolation: str = option("bilinear", "resize interpolation; not given: the source run's, else this",
                                ("bilinear", "bicubic", "nearest"))


@dataclass
class NormalisationOptions:
    """train.py's; finetune.py's are those its source's weights record."""
    mean: list[float] | None = option(None, "per-channel normalisation mean (R G B); not given, with --pretrained or "
                                            "--weights: the pretrained weights' own; else ImageNet's")
    std: list[float] | None = option(None, "per-channel normalisation std (R G B); chosen as --mean")

    def check(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ConfigError(f"--{name} takes 3 numbers (R G B), got {len(value)}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"--std must be > 0 for every channel, got {' '.join(map(str, self.std))}")


@dataclass
class LoopOptions:
    epochs: int = option(10, "training epochs")
    batch_size: int | str = option(64, "images per process per step, or 'auto': the largest power of two whose "
                                       "training step fits in 90%% of the GPU's memory (64 on a CPU)", parse=batch_size_arg)
    lr: float = option(1e-3, "peak learning rate (reached after warm-up)")
    optimizer: str = option("adamw", "optimizer; sgd is torch's SGD with Nesterov momentum", ("adamw", "sgd"))
    weight_decay: float = option(0.1, "weight decay of the weights of dim > 1 only: biases and norm parameters are "
                                      "not decayed")
    momentum: float = option(0.9, "SGD momentum (Nesterov)")
    warmup_epochs: float = option(1.0, "linear warm-up length in epochs, then cosine decay to zero")
    label_smoothing: float = option(0.0, "label smoothing for the cross-entropy loss")
    grad_accum: int = option(1, "gradient accumulation steps per optimizer step")

    def check(self) -> None:
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            raise ConfigError(f"--batch-size must be a number or 'auto', got {self.batch_size!r}")
        check_positive(self, "epochs", "batch_size", "grad_accum", "lr")


@dataclass
class FinetuneLoopOptions(LoopOptions):
    """The training loop with fine-tuning defaults (reference: SGD, momentum 0.9, wd 1e-4, lr 1e-3..8e-3)."""
    epochs: int = option(5, "fine-tuning epochs")
    optimizer: str = option("sgd", "optimizer; sgd is torch's SGD with Nesterov momentum, as in train.py", ("adamw", "sgd"))
    lr: float = option(8e-3, "peak learning rate, cosine decay, no warm-up")
    weight_decay: float = option(1e-4, "weight decay of the classifier's weight matrix only: not of its bias nor the "
                                       "last BN's weight and bias, as in train.py")
    warmup_epochs: float = option(0.0, "linear warm-up length in epochs (the head starts trained: none needed)")


@dataclass
class RecipeOptions:
    """The training features of timm's and torchvision's recipes, all off by default (train.py's;
    fine-tuning has its own --aug)."""
    clip_grad_norm: float | None = option(None, "clip the gradients' global L2 norm to this before each optimizer step "
                                                "(default: no clipping)")
    recipe: str | None = option(None, "a published recipe's settings as defaults (options given here still win): "
                                      "tv-resnet50-v2 = torchvision's ResNet-50 IMAGENET1K_V2 (docs/recipes.md); shapes-convnext, "
                                      "shapes-vit = a ConvNeXt and a ViT on the built-in data", tuple(RECIPES))
    auto_augment: str | None = option(None, "per-image automatic augmentation after the crop and flip: ta_wide = "
                                            "TrivialAugmentWide, ra = RandAugment (2 ops, magnitude 9)", ("ta_wide", "ra"))
    random_erase: float = option(0.0, "probability of filling a rectangle of each training image with the mean colour (RandomErasing; 0 = off)")
    mixup_alpha: float = option(0.0, "Mixup on each training batch, its Beta(alpha, alpha) mixing weight; with "
                                     "--cutmix-alpha, one of the two per batch (0 = off; no training accuracy then)")
    cutmix_alpha: float = option(0.0, "CutMix on each training batch, its Beta(alpha, alpha) area (0 = off)")
    model_ema: bool = option(False, "keep an exponential moving average (EMA) of the weights, evaluated beside them "
                                    "every epoch; best.safetensors is whichever did better (docs/recipes.md: EMA)")
    model_ema_decay: float = option(0.999, "the EMA's weight on its past at each update: it averages over about "
                                           "--model-ema-steps / (1 - decay) optimizer steps")
    model_ema_steps: int = option(32, "optimizer steps between EMA updates (torchvision's 32)")

    def check(self) -> None:
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"--clip-grad-norm must be > 0, got {self.clip_grad_norm}")
        if not 0 <= self.random_erase <= 1:
            raise ConfigError(f"--random-erase must be a probability in [0, 1], got {self.random_erase}")
        if self.decode == "gpu" and (self.auto_augment or self.random_erase):
            raise ConfigError("--decode gpu decodes after the workers, where --auto-augment and --random-erase run: "
                              "use --decode cpu (auto does) with them")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be >= 0 (0 = off), got {getattr(self, name)}")
        if not 0 < self.model_ema_decay < 1:
            raise ConfigError(f"--model-ema-decay must be in (0, 1), got {self.model_ema_decay}")
        if self.model_ema_steps < 1:
            raise ConfigError(f"--model-ema-steps must be >= 1, got {self.model_ema_steps}")


@dataclass
class RuntimeOptions:
    mixed_precision: str | None = option(None, "autocast dtype (default: Accelerate's config / launch flag, else none)", ('no', 'bf16', 'fp16'))
    cpu: bool = option(False, 'run on the CPU even when a GPU is present')
    collective_timeout: float = option(600.0, "seconds a process waits for the others at a collective before it stops with an error (a rank died or hangs); torch's own default is 30 min")
    workers: int | None = option(None, 'data loader worker processes per rank (default: from the CPU count)')

    def check(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.collective_timeout <= 0:
            raise ConfigError(f"--collective-timeout must be > 0 seconds, got {self.collective_timeout}")


@dataclass
class RunOptions:  # the run folder a job writes, and its seed
    seed: int = option(0, "random seed (data order, augmentation, initialisation)")
    output: str = option(RUNS, "folder that holds the run folders")
    name: str | None = option(None, "run folder name (default: <data>-<model>-<res>-<time>)")
    resume: str | None = option(None, "run folder or checkpoint to continue, or 'auto' for the newest under --output")
    stop_after: int | None = option(None, "stop with a checkpoint after this many epochs of this invocation (time-sliced jobs)")
    log_with: str | None = option(None, "Accelerate tracker to log to", ("tensorboard", "wandb"))


@dataclass
class FinetuneRunOptions(RunOptions):
    output: str | None = option(None, "folder for the new run folder (default: the folder that holds the source run)")


@dataclass
class FinetuneOptions:
    checkpoint: str | None = option(None, "run folder, checkpoint folder or .safetensors file written by train.py "
                                          f"(default: the newest train.py run under --output, else under {RUNS}/)")
    res: str | int = option("auto", "resolution to fine-tune and test at, or 'auto': the best size on the held-out "
                            "validation images, a last BN re-estimated at each on --choice-images training images; "
                            "a run trained with --for-test-res N: N")
    choice_images: int = option(1000, "validation images held out for the choices (--res auto's size, the epoch that "
                                      "ships), drawn with --seed, at most half; the rest report before and after")
    method: str = option("finetune", "finetune: train the classifier with the last norm (a BN in train mode, a "
                         "LayerNorm's weight and bias); bn-stats: only re-estimate that BN's statistics (no gradients); "
                         "parametric: the paper's Frechet map before the classifier",
                         FINETUNE_METHODS)
    aug: str = option("test+", "fine-tuning images: test = Resize + CenterCrop at --res; test+ = that with a flip, light "
                      "colour jitter and a horizontally shifted crop (FixRes v2); rrc = RandomResizedCrop", FINETUNE_AUGS)
    train_bn_affine: bool = option(False, "also train the last BN's weight and bias (a LayerNorm's or GroupNorm's "
                                          "always train)")
    train_pos_embed: bool = option(False, "with --method finetune, a ViT's absolute position embedding trains too "
                                          "(timm's pos_embed, torchvision's encoder.pos_embedding; no weight decay), as "
                                          "DeiT's fine-tuning at a new size does; a step then backpropagates through "
                                          "every block")
    sizes: list[int] | None = option(None, "with --res auto: the sizes to sweep (default: sweep.py's, about 0.5x to 2x the training res)")
    parametric_scope: str = option("global", "parametric: one distribution for all pooled features, or one per feature",
                                   ("global", "feature"))
    fit_images: int = option(5000, "parametric: training images whose pooled features are fitted at each resolution")

    def check(self) -> None:
        if self.res != "auto":
            try:
                self.res = int(self.res)
            except ValueError:
                raise ConfigError(f"--res must be a size in pixels or 'auto', got {self.res!r}") from None
            check_positive(self, "res")
        if self.sizes is not None and any(s <= 0 for s in self.sizes):
            raise ConfigError(f"--sizes must all be > 0, got {self.sizes}")
        if self.fit_images <= 1:
            raise ConfigError(f"--fit-images must be > 1, got {self.fit_images}")
        check_positive(self, "choice_images")
        if self.train_pos_embed and self.method != "finetune":
            raise ConfigError(f"--train-pos-embed goes with --method finetune (--method {self.method} trains no "
                              f"parameters)")


@dataclass
class FigureOptions:
    plots: bool = option(True, "draw the figures (sweep.py: sweep.png, sweep_speed.png, with --crop-pcts sweep_crop.png, "
                               "with --activations activations.png; finetune.py: activations.png); --no-plots "
                               "writes the tables and numbers only (a figure takes 0.2-0.3 s of a CPU core), and "
                               "leaves the figures of an earlier run in the folder as they were (sweep.py names them)")


@dataclass
class BudgetOptions:
    """A speed budget (fixres/throughput.py): the best size among those that meet it."""
    max_latency_ms: float | None = option(None, 'choose the best size among those whose forward pass of one image (batch 1) takes at most this many milliseconds on this device (the median of timings after a warm-up)')
    min_images_per_s: float | None = option(None, 'choose the best size among those that forward at least this many images a second at --batch-size on this device (with --max-latency-ms: a size must meet both)')

    def check(self) -> None:
        check_positive(self, "max_latency_ms", "min_images_per_s")


# the jobs' configs, each the groups it is made of
TRAIN_GROUPS = (DataOptions, BuiltInDataRecord, ModelOptions, DeviceOptions, TrainSpeedOptions,
                ResolutionOptions, PreprocessingOptions, NormalisationOptions, LoopOptions, RecipeOptions,
                RuntimeOptions, RunOptions)


@dataclass
class TrainConfig(Config, *composed(TRAIN_GROUPS)):
    """train.py: every option of every group but the built-in dataset's record."""
    COMMAND_LINE: typing.ClassVar[tuple] = tuple(g for g in TRAIN_GROUPS if g is not BuiltInDataRecord)


FINETUNE_GROUPS = (DataOptions, BuiltInDataRecord, ModelOptions, DeviceOptions, TrainSpeedOptions,
                   ResolutionOptions, SourcePreprocessingOptions, NormalisationOptions, FinetuneLoopOptions,
                   RecipeOptions, RuntimeOptions, FinetuneRunOptions, FinetuneOptions, BudgetOptions, FigureOptions)


@dataclass
class FinetuneConfig(Config, *composed(FINETUNE_GROUPS)):
    """finetune.py: the training loop's groups with fine-tuning defaults, and its own; the model,
    its resolution and normalisation are --checkpoint's, the recipe features off: not options."""
    COMMAND_LINE: typing.ClassVar[tuple] = (DataOptions, DeviceOptions, SourcePreprocessingOptions, FinetuneLoopOptions,
                                            RuntimeOptions, FinetuneRunOptions, FinetuneOptions, BudgetOptions,
                                            FigureOptions)

    def check_across(self) -> None:
        if self.resume == "auto" and (self.checkpoint is None or not self.name):
            raise ConfigError("finetune.py --resume auto needs --checkpoint and --name (it continues the fine-tuning "
                              "run of that name, if any); or give --resume the fine-tuning run folder")
        if self.batch_size == "auto":
            raise ConfigError("--batch-size auto is train.py's; give finetune.py a number")


SWEEP_GROUPS = (SweepSourceOptions, SweepDataOptions, SweepOptions, RuntimeOptions, SweepOutputOptions, BudgetOptions,
                FigureOptions)


@dataclass
class SweepConfig(Config, *composed(SWEEP_GROUPS)):
    """sweep.py: one set of weights evaluated at many test sizes."""
    COMMAND_LINE: typing.ClassVar[tuple] = SWEEP_GROUPS

    def check_across(self) -> None:
        if self.write_best and self.weights:
            raise ConfigError("--write-best records the size in a fixres run: give --checkpoint, not --weights")
        if not self.speed and (self.max_latency_ms or self.min_images_per_s):
            raise ConfigError("--no-speed: a budget (--max-latency-ms, --min-images-per-s) needs the speed measured")
