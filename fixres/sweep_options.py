"""sweep.py's own option groups: the weights, the data, the sizes and crops, what it writes and
times. fixres/config.py composes them, with the groups sweep.py shares with the other jobs
(RuntimeOptions, BudgetOptions, FigureOptions), into SweepConfig; fixres/options.py makes each
field an option.

    python sweep.py --help      # these options, with their defaults
"""
from __future__ import annotations

from dataclasses import dataclass

from fixres.options import RUNS, ConfigError, check_fraction, check_positive, check_sizes, option


@dataclass
class SweepSourceOptions:
    checkpoint: str | None = option(None, "run folder, checkpoint folder or .safetensors file written by train.py or "
                                          f"finetune.py (default: the newest run under {RUNS}/)")
    which: str = option("best", "weights of a run folder: best (with --model-ema, raw or EMA, whichever scored higher), "
                                "last, or ema (the EMA after the last epoch)", ("best", "last", "ema"))
    model: str | None = option(None, "with --weights: timm model name, or tv:<name>")
    weights: str | None = option(None, "plain state dict (.safetensors or .pth, no fixres metadata) instead of --checkpoint; needs --model")
    train_res: int | None = option(None, "with --weights: the resolution they were trained at (default 224; a checkpoint knows its own)")
    min_scale: float | None = option(None, "RandomResizedCrop min scale of training, for the prediction (default: the weights' metadata, else the run's config, else 0.08)")

    def check(self) -> None:
        if self.checkpoint is not None and self.weights is not None:
            raise ConfigError("give --checkpoint (a fixres run) or --weights FILE with --model NAME, not both")
        if self.weights and not self.model:
            raise ConfigError("--weights needs --model NAME (the checkpoint's model is only known to fixres runs)")
        if self.model and not self.weights:
            raise ConfigError("--model goes with --weights; a --checkpoint names its own model")
        check_positive(self, "train_res")
        check_fraction(self, "min_scale")


@dataclass
class SweepDataOptions:
    data: str | None = option(None, "CSV split or ImageFolder root (default: the data in the run's config.json)")
    images: str | None = option(None, "image folder for a CSV split (default: the run's, else beside the CSV)")


@dataclass
class SweepOptions:
    sizes: list[int] | None = option(None, "test sizes (default: about 0.5x to 2x the training res, with it and the predicted best)")
    crop_pct: float | None = option(None, "Resize(int(size / crop_pct)) + CenterCrop(size) (default: the run's; with "
                                          "--weights, the model's pretrained preprocessing; else 0.875); the training "
                                          "size at it is the reference of every paired difference")
    crop_pcts: list[float] | None = option(None, "also sweep these crop ratios: every (size, crop_pct) pair, each image "
                                                 "decoded once for all; the --crop-pct (or the run's) is always in")
    activations: bool = option(False, "also collect the pooled features that feed the classifier: stats per size and "
                                      "(unless --no-plots) activations.png")
    batch_size: int = option(64, "images per process per forward pass")
    decode: str = option("auto", "cpu: the loader workers decode and resize; gpu: each image is decoded once on the "
                                 "model's device (torchcodec); auto: gpu on CUDA when torchcodec is installed",
                         ("auto", "cpu", "gpu"))

    def check(self) -> None:
        check_positive(self, "batch_size")
        check_sizes(self.sizes or [], self.crop_pct if self.crop_pct is not None else 0.875)
        if self.sizes:
            self.sizes = sorted(set(self.sizes))
        if self.crop_pcts is not None:
            if not self.crop_pcts or not all(0 < c <= 1 for c in self.crop_pcts):
                raise ConfigError(f"--crop-pcts: each must be in (0, 1], got {' '.join(map(str, self.crop_pcts))}")
            self.crop_pcts = sorted(set(self.crop_pcts))


@dataclass
class SweepOutputOptions:
    """What sweep.py writes, and the speed it measures (fixres/throughput.py)."""
    output: str | None = option(None, "folder for sweep.csv, sweep.json and the plots (default: the run folder)")
    write_best: bool = option(False, "record the best size (within the budget, when one is given) and its crop_pct "
                                     "as the run's test size and test crop ratio: in the swept weights' metadata (test_res, test_crop_pct) and in the run's timm "
                                     "export (test_input_size, test_crop_pct), which is written again")
    speed: bool = option(True, "measure each size's images/s at --batch-size and milliseconds at batch 1 on this "
                               "device before the sweep (on a CPU, 4-5 s for the built-in data's 10 sizes beside "
                               "its 37 s sweep); --no-speed skips it")
    speed_repeats: int = option(5, "timed forward passes per size and batch (after one warm-up); the median is kept")

    def check(self) -> None:
        check_positive(self, "speed_repeats")
