"""Train an image classifier with Accelerate; the first step of FixRes.

    python train.py                                    # built-in shapes data, ~6 min on 2 CPU cores
    python train.py --data data/train.csv --images data/train_images    # CSV split, ResNet-50 at 224
    accelerate launch --mixed_precision bf16 train.py --data /imagenet  # ImageFolder, all GPUs
    torchrun --nproc_per_node 2 train.py --cpu --epochs 1               # two CPU processes (gloo)
    python train.py --resume auto                      # continue the newest run under runs/
    python train.py --data /imagenet --recipe tv-resnet50-v2   # torchvision's ResNet-50 V2 recipe (docs/recipes.md)
    python train.py --data /imagenet --for-test-res 224   # a fixed test size: trains at 181 px, validates at 224

Prints the resolved config, a progress bar and one line per epoch
("epoch   3 | train loss ... | val loss ... acc 81.20% top-5 97.10% (n=1000) | ..."; top-5 is
top-k with k = min(5, classes)), the timm export's folder ("timm export: runs/<name>/timm
..."), then a table and the commands that come next ("next: python sweep.py --checkpoint runs/<name>",
"then: python finetune.py --checkpoint runs/<name>"); writes runs/<name>/ (see
fixres/checkpoint.py). `--help` lists every option.
"""
import gc
import sys

if __name__ == "__main__":
    gc.disable()  # for the imports below; run_main turns it back on (fixres/cli.py: collect_from_here)
from fixres.cli import run_main
from fixres.config import TrainConfig
from fixres.layers import parse_command_line
from fixres.presets import train_preset
from fixres.training import train


def main(argv=None):
    # No --data: the built-in dataset, with defaults sized for a laptop CPU; --recipe: a published recipe's
    # settings under what is given (fixres/presets.py)
    given = parse_command_line(TrainConfig, argv, __doc__.split("\n")[0], preset=train_preset)
    return train(given)


if __name__ == "__main__":
    sys.exit(run_main(main))
