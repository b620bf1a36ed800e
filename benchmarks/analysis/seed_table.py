"""The per-seed results tables (docs/families.md) for trained runs, each with its sweep and its fine-tune.

    python benchmarks/analysis/seed_table.py runs/cnx-s0:runs/cnx-s0-ft runs/cnx-s1:runs/cnx-s1-ft ...

Each argument is SOURCE:FINETUNED: a train.py run folder that sweep.py has swept, and a
finetune.py run of it. Nothing is evaluated here: every number is read from the files the
scripts wrote (the best epoch's validation top-1 from best.safetensors' metadata, the sweep
from sweep.json, the size chosen and the paired differences on the reported images from
finetune.json), so the table is what users get from those commands. Prints a markdown table,
one column per seed.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fixres.fileio import load_weights


def interval(d: dict) -> str:
    return f"{100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"


def column(source: Path, finetuned: Path) -> dict[str, str]:
    _, meta = load_weights(source / "best.safetensors")
    config = json.loads((source / "config.json").read_text())
    sweep = json.loads((source / "sweep.json").read_text())
    # the best pair's row (a crop_pct sweep has several rows a size)
    best = next(row for row in sweep["rows"] if row["size"] == sweep["meta"]["measured_best"]
                and row.get("crop_pct", sweep["meta"]["crop_pct"]) == sweep["meta"].get("measured_best_crop_pct",
                                                                                      sweep["meta"]["crop_pct"]))
    tuned = json.loads((finetuned / "finetune.json").read_text())
    if Path(tuned["source"]).resolve().parent != source.resolve():
        sys.exit(f"{finetuned}: a fine-tune of {tuned['source']}, not of {source}")
    train_res, res, diffs = tuned["train_res"], tuned["res"], tuned["differences"]
    n_sweep, n_reported = best["count"], tuned["val_images"]
    return {
        # the size train.py validated at (the weights' test_res is sweep.py --write-best's, once it has run)
        f"train.py: val top-1 at {config['test_res'] or config['train_res']} px (the best epoch, {n_sweep} images)":
            f"{100 * meta['val_acc']:.2f}% (epoch {meta['epoch']})",
        f"sweep.py's highest size, vs {train_res} px ({n_sweep} images, which also chose it: optimistic)":
            f"{best['size']} px: {100 * best['top1']:.2f}%, " + interval(
                {"diff": best["diff_vs_train"], "low": best["diff_low"], "high": best["diff_high"]}),
        "`--res auto`: size chosen on the held-out images": f"{res} px",
        f"{train_res} px, on the {n_reported} reported images": f"{100 * tuned['top1']['train_res']:.2f}%",
        "unchanged at the chosen size, vs the training size": f"{100 * tuned['top1']['before']:.2f}%, "
                                                             + interval(diffs["before_vs_train_res"]),
        f"fine-tuned ({tuned['method']}) vs unchanged there": f"{100 * tuned['top1']['after']:.2f}%, "
                                                             + interval(diffs["after_vs_before"]),
        "fine-tuned vs the training size": interval(diffs["after_vs_train_res"]),
        "loss there: unchanged → fine-tuned": f"{tuned['loss']['before']:.4f} → {tuned['loss']['after']:.4f}",
        "adapted": f"{tuned['adapted']['layer']} ({tuned['adapted']['kind']}), "
                   f"{', '.join(tuned['adapted'].get('classifiers') or [tuned['adapted']['classifier']])}",
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help="SOURCE:FINETUNED run folders")
    args = parser.parse_args(argv)
    columns, names = [], []
    for pair in args.pairs:
        source, sep, finetuned = pair.partition(":")
        if not sep:
            parser.error(f"{pair}: give SOURCE:FINETUNED run folders")
        columns.append(column(Path(source), Path(finetuned)))
        names.append(Path(source).name)
    print("| | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for row in columns[0]:
        print(f"| {row} | " + " | ".join(c.get(row, "") for c in columns) + " |")


if __name__ == "__main__":
    main()
