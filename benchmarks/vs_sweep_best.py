"""A fixres finetune.py run against its source at the source sweep's best size, paired on the
same validation images (the README's "after vs the sweep's best" row).

    python benchmarks/vs_sweep_best.py runs/<source> runs/<finetuned> [runs/<another finetuned> ...]

The source needs sweep.json (python sweep.py --checkpoint runs/<source>); each fine-tuned run
is evaluated at its own test size, the source at the sweep's best, with the run's crop.
"""
import argparse
import json
import sys
from pathlib import Path

from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixres.config import SweepConfig
from fixres.stats import paired_difference_of
from fixres.sweep import load_for_sweep, run_sweep


def evaluate(run: Path, size: int, crop_pct: float, accelerator) -> dict:
    model, meta, split, _, _ = load_for_sweep(SweepConfig(checkpoint=str(run)), accelerator)
    return run_sweep(model, meta, split, [size], crop_pct, accelerator, workers=1)[0]


def main(source: str, *finetuned: str) -> None:
    accelerator = Accelerator(cpu=True)
    rows = json.loads((Path(source) / "sweep.json").read_text())["rows"]
    best = max(rows, key=lambda r: r["top1"])
    reference = None
    for run in map(Path, finetuned):
        summary = json.loads((run / "finetune.json").read_text())
        if reference is None:
            reference = evaluate(Path(source), best["size"], summary["crop_pct"], accelerator)
        after = evaluate(run, summary["res"], summary["crop_pct"], accelerator)
        d = paired_difference_of(after["per_image_correct"], reference["per_image_correct"])
        print(f"{run.name} at {summary['res']} px: {100 * after['top1']:.2f}%, loss {after['loss']:.4f} | "
              f"{Path(source).name} at its sweep's best {best['size']} px: {100 * reference['top1']:.2f}%, loss "
              f"{reference['loss']:.4f} | difference {100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, "
              f"{100 * d['high']:+.2f}] ({d['gained']} gained, {d['lost']} lost of {d['n']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the source run folder, with sweep.json (python sweep.py --checkpoint it)")
    parser.add_argument("finetuned", nargs="+", help="finetune.py run folders of that source")
    args = parser.parse_args()
    if not (Path(args.source) / "sweep.json").is_file():
        parser.error(f"{args.source}: no sweep.json (python sweep.py --checkpoint {args.source})")
    main(args.source, *args.finetuned)
