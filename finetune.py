"""FixRes: adapt a trained classifier to a higher test resolution; the second step.

    python finetune.py --checkpoint runs/<name>                  # --res auto: choose on training images, fine-tune
    python finetune.py                                           # the newest train.py run under runs/
    accelerate launch finetune.py --checkpoint runs/<name> --res 384      # all GPUs, last BN synced
    torchrun --nproc_per_node 2 finetune.py --cpu --checkpoint runs/<name> --res 80   # two CPU processes
    python finetune.py --checkpoint runs/<name> --res 80 --method bn-stats     # no gradients, seconds
    python finetune.py --checkpoint runs/<name> --res 80 --method parametric   # the paper's Frechet map
    python finetune.py --checkpoint runs/<name> --max-latency-ms 5    # --res auto among the sizes within 5 ms an image

Prints the accuracy at the training resolution, at the new one before and after, with
the paired differences after - before and after - training resolution and their 95%
intervals (a table, on the validation split); with --res auto first the size it chose
on --choice-images training images and why ("--res auto: 80 px, the best of the sweep
(...) on 1000 training images ..."), and one line per fine-tuning epoch; last, which
images chose and which reported ("chosen on: 1000 training images; reported on:
validation split (3000 images)"). With --max-latency-ms and/or --min-images-per-s, --res auto
first times every candidate size (as sweep.py does) and scores only those that meet the budget
("... the best of the sweep (64, 72 px) within --max-latency-ms 5 (80, 96 px outside it) ...");
a budget no size meets, or a --res N outside it, is refused in one line before any scoring
or training. Writes a run folder next to the source run (or under --output) in train.py's
format whose weights expect the new
resolution, plus finetune.json (top-1 and top-5), activations.png (not with --no-plots) and the timm export
(runs/<name>/timm, whose test_input_size is the new resolution; none for --method
parametric, whose adapter timm cannot load). `--help` lists every option.
"""
import gc
import sys

if __name__ == "__main__":
    gc.disable()  # for the imports below; run_main turns it back on (fixres/cli.py: collect_from_here)
from fixres.cli import run_main
from fixres.config import FinetuneConfig
from fixres.layers import parse_command_line
from fixres.finetune import finetune


def main(argv=None):
    return finetune(parse_command_line(FinetuneConfig, argv, __doc__.split("\n")[0]))


if __name__ == "__main__":
    sys.exit(run_main(main))
