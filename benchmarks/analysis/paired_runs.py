"""Two fine-tunes of one source run, compared on the same images: which choice of what to train
(`--train-pos-embed` or not, one size or another) gives more.

    python benchmarks/analysis/paired_runs.py runs/vit-s0-ft runs/vit-s0-ftpos

Both are finetune.py runs of the same source with the same held-out images (the same --seed and
--choice-images). Each run's shipped weights (best.safetensors) are evaluated at its own size on
the validation images neither held out (finetune.json's reported images), and the second is
compared with the first: the paired difference in top-1 with its 95% interval (fixres.stats),
and each one's loss.
"""
import argparse
import json
import sys
from pathlib import Path

from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fixres.config import SweepConfig
from fixres.stats import METHOD as STATS_METHOD
from fixres.stats import paired_difference_of
from fixres.sweep import load_for_sweep, run_sweep


def evaluate(run: Path, accelerator, samples=None) -> tuple[dict, dict, list]:
    """(finetune.json, the run at its own size on `samples` or its reported images, those samples)."""
    summary = json.loads((run / "finetune.json").read_text())
    model, meta, split, _, _ = load_for_sweep(SweepConfig(checkpoint=str(run)), accelerator)
    if samples is None:
        held_out = set(summary["held_out"])
        samples = [s for s in split.val if s[0] not in held_out]
    row = run_sweep(model, meta, split, [summary["res"]], summary["crop_pct"], accelerator, workers=1,
                    samples=samples)[0]
    return summary, row, samples


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="a finetune.py run folder")
    parser.add_argument("second", type=Path, help="another fine-tune of the same source")
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=True)
    first, a, samples = evaluate(args.first, accelerator)
    second = json.loads((args.second / "finetune.json").read_text())
    if second["source"] != first["source"] or set(second["held_out"]) != set(first["held_out"]):
        sys.exit(f"{args.second}: not a fine-tune of {first['source']} with {args.first}'s held-out images")
    second, b, _ = evaluate(args.second, accelerator, samples)
    d = paired_difference_of(b["per_image_correct"], a["per_image_correct"])
    print(f"{args.first} ({first['res']} px): {100 * a['top1']:.2f}%, loss {a['loss']:.4f}, "
          f"{first['method_seconds']:.0f} s | {args.second} ({second['res']} px): {100 * b['top1']:.2f}%, "
          f"loss {b['loss']:.4f}, {second['method_seconds']:.0f} s | second - first: {100 * d['diff']:+.2f} "
          f"[{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] ({d['gained']} gained, {d['lost']} lost of {d['n']} "
          f"images; {STATS_METHOD})")


if __name__ == "__main__":
    main()
