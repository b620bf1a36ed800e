"""A fixres finetune.py run against its source at the source sweep's best size, paired on the
images the fine-tuned run reports on (the README's "after vs the sweep's best" row).

    python benchmarks/analysis/vs_sweep_best.py runs/<source> runs/<finetuned> [runs/<another finetuned> ...]

The source needs sweep.json (python sweep.py --checkpoint runs/<source>), for its sizes and
crop. The sweep's best is chosen as finetune.py chooses: on the fine-tuned run's held-out
validation images (finetune.json's "held_out"), by fixres.stats.best_of. The source at that
size and the fine-tuned run at its own size are then compared on the other validation
images, the ones finetune.json reports on: no number printed here was chosen on its images.
"""
import argparse
import json
import sys
from pathlib import Path

from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fixres.config import SweepConfig
from fixres.stats import best_of, paired_difference_of
from fixres.sweep import load_for_sweep, run_sweep


def compare(source: Path, finetuned: Path, data: str | None, accelerator) -> str:
    """Two lines: the source at the sweep's best (chosen on the held-out images) against its training
    size, then the fine-tuned run against the source there, both on the reported images."""
    sweep = json.loads((source / "sweep.json").read_text())
    summary = json.loads((finetuned / "finetune.json").read_text())
    model, meta, split, _, _ = load_for_sweep(SweepConfig(checkpoint=str(source), data=data), accelerator)
    held_out = set(summary["held_out"])
    choice = [s for s in split.val if s[0] in held_out]
    reported = [s for s in split.val if s[0] not in held_out]
    if len(choice) != len(held_out) or Path(summary["source"]).resolve() != Path(meta["weights_path"]).resolve():
        sys.exit(f"{finetuned}: not a fine-tune of {source} on its validation images ({len(choice)} of its "
                 f"{len(held_out)} held-out images found; source {summary['source']})")
    crop_pct = sweep["meta"]["crop_pct"]
    sizes = sorted({row["size"] for row in sweep["rows"]})  # a crop_pct sweep has a row per pair
    best = best_of(run_sweep(model, meta, split, sizes, crop_pct, accelerator, workers=1, samples=choice))["size"]
    train_res = int(meta["train_res"])
    on_reported = {row["size"]: row for row in run_sweep(model, meta, split, sorted({train_res, best}), crop_pct,
                                                         accelerator, workers=1, samples=reported)}
    trained, reference = on_reported[train_res], on_reported[best]
    tuned, tuned_meta, _, _, _ = load_for_sweep(SweepConfig(checkpoint=str(finetuned)), accelerator)
    after = run_sweep(tuned, tuned_meta, split, [summary["res"]], summary["crop_pct"], accelerator, workers=1,
                      samples=reported)[0]
    d = paired_difference_of(after["per_image_correct"], reference["per_image_correct"])
    gain = paired_difference_of(reference["per_image_correct"], trained["per_image_correct"])
    return (f"{source.name} at {train_res} px (trained): {100 * trained['top1']:.2f}%, at the sweep's best: "
            f"{100 * gain['diff']:+.2f} [{100 * gain['low']:+.2f}, {100 * gain['high']:+.2f}] on the reported images\n"
            f"{finetuned.name} at {summary['res']} px: {100 * after['top1']:.2f}%, loss {after['loss']:.4f} | "
            f"{source.name} at the sweep's best {best} px (chosen on the {len(choice)} held-out images; on all "
            f"{sweep['meta']['val_images']}: {sweep['meta']['measured_best']} px): {100 * reference['top1']:.2f}%, "
            f"loss {reference['loss']:.4f} | difference {100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, "
            f"{100 * d['high']:+.2f}] ({d['gained']} gained, {d['lost']} lost of {d['n']} reported images)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the train.py run folder, swept (sweep.json)")
    parser.add_argument("finetuned", type=Path, nargs="+", help="finetune.py run folders of that source")
    parser.add_argument("--data", help="the source's data, for a run that does not record it")
    args = parser.parse_args(argv)
    for folder, name in [(args.source, "sweep.json")] + [(run, "finetune.json") for run in args.finetuned]:
        if not (folder / name).is_file():
            parser.error(f"{folder}: no {name}")
    accelerator = Accelerator(cpu=True)
    for run in args.finetuned:
        print(compare(args.source, run, args.data, accelerator))


if __name__ == "__main__":
    main()
