"""Runs trained and fine-tuned for one test size, compared on the same images: is training at the
high size better than training low and fine-tuning high, for what each costs?

    python benchmarks/experiments/train_for_test.py --reported-by runs/ft64to96-s0 \
        a=runs/t45-s0@64 b=runs/t64-s0@64 c=runs/ft45to64-s0@64 d1=runs/t96-s0@96 d2=runs/ft64to96-s0@96 \
        --compare a-b c-b c-a d2-d1 --json benchmarks/experiments/results/train_for_test-s0.json

Each LABEL=RUN@SIZE is evaluated at SIZE (its run's crop_pct) on the validation images that
the --reported-by fine-tune did not hold out for its choices (every fine-tune given here must
have held out the same ones: the same --seed and --choice-images), so no number below was
chosen on the images it is measured on. A train.py run is evaluated with its last weights (its
best.safetensors was chosen on every validation image); a finetune.py run with the weights it
ships (chosen on the held-out images), which must have started from its source's
last.safetensors (refused otherwise: a best.safetensors was chosen on the reported images). Each --compare X-Y prints X's top-1 minus Y's on the
same images with its 95% interval (fixres.stats: paired bootstrap). The cost of each: the
seconds its epochs took (metrics.jsonl: training and validation), a fine-tune's plus its
source run's.
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


def training_seconds(run: Path) -> float:
    """The seconds a run's epochs took, and for a fine-tune its source run's too."""
    seconds = sum(json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines())
    summary = run / "finetune.json"
    if summary.exists():
        source = Path(json.loads(summary.read_text())["source"])  # its weights file
        seconds += training_seconds(source.parent if source.suffix else source)
    return seconds


def parse_entry(text: str) -> tuple[str, Path, int]:
    label, _, rest = text.partition("=")
    run, _, size = rest.rpartition("@")
    if not (label and run and size.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=RUN@SIZE")
    return label, Path(run), int(size)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=parse_entry, help="LABEL=RUN@SIZE")
    parser.add_argument("--reported-by", type=Path, required=True, help="a finetune.py run: its reported images")
    parser.add_argument("--compare", nargs="*", default=[], help="X-Y: X's top-1 minus Y's, paired")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    held_out = set(json.loads((args.reported_by / "finetune.json").read_text())["held_out"])
    accelerator = Accelerator(cpu=True)
    results, rows = {}, {}
    for label, run, size in args.runs:
        summary = run / "finetune.json"
        if summary.exists() and set(json.loads(summary.read_text())["held_out"]) != held_out:
            sys.exit(f"{run}: held out other images than {args.reported_by}")
        source = Path(json.loads(summary.read_text())["source"]) if summary.exists() else None
        if source and source.name == "best.safetensors" and not (source.parent / "finetune.json").exists():
            sys.exit(f"{run}: fine-tuned from {source}, the epoch train.py chose on every validation image, the "
                     f"reported ones among them: fine-tune from {source.parent / 'last.safetensors'}")
        which = "best" if summary.exists() else "last"
        model, meta, split, _, _ = load_for_sweep(SweepConfig(checkpoint=str(run), which=which), accelerator)
        samples = [s for s in split.val if s[0] not in held_out]
        if results and samples != first_samples:  # a paired difference needs the same images in the same order
            sys.exit(f"{run}: its reported images differ from {args.runs[0][1]}'s (another data seed?)")
        first_samples = samples
        row = run_sweep(model, meta, split, [size], meta["crop_pct"], accelerator, workers=1, samples=samples)[0]
        rows[label] = row
        results[label] = {"run": str(run), "weights": which, "size": size, "train_res": meta["train_res"],
                          "top1": row["top1"], "loss": row["loss"], "images": row["count"],
                          "training_seconds": training_seconds(run)}
        print(f"{label}: {run} ({which}) at {size} px, trained at {meta['train_res']} px: top-1 "
              f"{100 * row['top1']:.2f}%, loss {row['loss']:.4f} on {row['count']} images; "
              f"{results[label]['training_seconds']:.0f} s of training")
    comparisons = {}
    for pair in args.compare:
        x, y = pair.split("-")
        d = paired_difference_of(rows[x]["per_image_correct"], rows[y]["per_image_correct"])
        comparisons[pair] = {k: d[k] for k in ("diff", "low", "high", "gained", "lost", "n")}
        print(f"{x} - {y}: {100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] "
              f"({d['gained']} gained, {d['lost']} lost of {d['n']} images; {STATS_METHOD})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": results, "compare": comparisons}, indent=1))


if __name__ == "__main__":
    main()
