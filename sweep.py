"""Evaluate a checkpoint at many test resolutions; compare the best with the FixRes prediction.

    python sweep.py --checkpoint runs/<name>                      # sizes about 0.5x..2x the training res
    python sweep.py                                               # the newest run under runs/
    python sweep.py --checkpoint runs/<name> --sizes 64 128 224 384 480 --crop-pct 0.8
    accelerate launch sweep.py --checkpoint runs/<name>           # all GPUs share every size
    torchrun --nproc_per_node 2 sweep.py --cpu --checkpoint runs/<name>   # two CPU processes (gloo)
    python sweep.py --checkpoint runs/<name> --activations        # + pooled-feature statistics
    python sweep.py --checkpoint runs/<name> --crop-pcts 0.875 0.95 1.0   # every (size, crop_pct) pair
    python sweep.py --checkpoint runs/<name> --write-best         # the best size becomes the run's test size
    python sweep.py --checkpoint runs/<name> --no-plots           # sweep.csv and sweep.json, no figure
    python sweep.py --checkpoint runs/<name> --max-latency-ms 5   # the best size that takes at most 5 ms an image
    python sweep.py --checkpoint runs/<name> --min-images-per-s 2000 --write-best   # ... that does 2000 images/s
    python sweep.py --model tv:resnet50 --weights r50.pth --data data/ --train-res 224  # plain weights

Prints the resolved config, a progress bar, a table (size, crop_pct, resize, top-1, the paired
difference in top-1 against the training size on the same images with its 95% interval,
"+2.40 [+1.20, +3.60]" in points, the images gained and lost against it, top-5 (top-k,
k = min(5, classes), named so: "top-3" for 3 classes), loss, images,
forward img/s, the measured speed "img/s b64" and "ms b1", which size was trained / predicted / best)
and a line like "best: 80 px (top-1 91.2%), trained at 64 px, predicted 79 px"; with --activations, the
fraction of zeros, mean and spread of the pooled features per size.

Speed: before the sweep, each size's forward pass is timed on synthetic input on the main
process's device (fixres/throughput.py): images/s at --batch-size and milliseconds at batch 1,
the medians of --speed-repeats timings after a warm-up ("speed: 10 size(s) timed ... in 3.2 s";
--no-speed skips it). With --max-latency-ms and/or --min-images-per-s the best size is chosen
among the sizes that meet the budget: "best within --max-latency-ms 5: 80 px (top-1 91.2%, 4.2 ms
at batch 1, ...); best overall: 96 px", and --write-best writes that one. A budget that no size
meets is refused in one line before any evaluation ("error: --max-latency-ms 2: no size meets it
(the fastest, 32 px, takes 3.1 ms at batch 1 on cpu)"). Writes sweep.csv,
sweep.json (columns crop_pct, top5, diff_vs_train, diff_low, diff_high, gained, lost among them; sweep.json
also per-class top-1 at every size, "per_class") and
sweep.png (top-1, and below it the difference with its interval as error bars), sweep_speed.png
(top-1 against images/s and against ms at batch 1, each point a size, the budget drawn; sweep.json's
"speed", "budget" and "best_within_budget" say how it was measured and chosen) and activations.png
into the run folder or --output. The table is the same with 1 and N
processes. With --write-best, the swept weights' metadata then says test_res = the best
size and test_crop_pct = its crop_pct, and the run's timm export (runs/<name>/timm,
fixres/export.py) is written again with them as test_input_size and test_crop_pct.

--crop-pcts 0.875 0.95 1.0 (any list, each in (0, 1]): every (size, crop_pct) pair, each image
still decoded once for all of them. The rows go by size, then crop_pct; the reference of every
paired difference is the training size at --crop-pct (else the run's crop_pct), swept whether
listed or not; the best pair is the highest top-1, then the lower loss, then the first row
(fixres.stats.best_of). Also printed: a grid of top-1 by size and crop_pct and a line like
"best: 80 px at crop_pct 0.95 (top-1 91.2%), ..."; also written: sweep_crop.png (a heat map of
top-1, size by crop_pct, the best pair outlined), and sweep.png draws a line per crop_pct;
sweep.json's per_class and activations are keyed by pair ("80@0.95"), its meta gains
crop_pcts and measured_best_crop_pct. `--help` lists every option.
"""
import gc
import shlex
import sys

if __name__ == "__main__":
    gc.disable()  # for the imports below; run_main turns it back on (fixres/cli.py: collect_from_here)
from fixres.cli import run_main
from fixres.config import SweepConfig
from fixres.layers import parse_command_line
from fixres.sweep import sweep


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    given = parse_command_line(SweepConfig, argv, __doc__.split("\n")[0])
    return sweep(given, command=shlex.join(["sweep.py", *argv]))


if __name__ == "__main__":
    sys.exit(run_main(main))
