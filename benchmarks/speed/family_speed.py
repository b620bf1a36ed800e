"""A sweep's images/s per test size for a ViT and CNNs of similar cost, side by side in one run:
a ViT's cost grows with the square of its token count, a CNN's with the pixels.

    python benchmarks/speed/family_speed.py                                    # this machine, the default ladder
    OMP_NUM_THREADS=1 python benchmarks/speed/family_speed.py --repeats 1 --sizes 64 96   # a quick check
    python benchmarks/speed/family_speed.py --device cuda --batches 20 --repeats 7        # a GPU

The models, built by fixres.models.create_model as train.py builds them for the built-in data
(6 classes, trained at --train-res 64):
  shapes-vit       --recipe shapes-vit: vit_tiny_r_s16_p8_224 with its model_kwargs (a hybrid ViT:
                   2 x 2 patches of its stem's stride-4 map, a token per 8 px, 64 tokens at 64 px),
                   built at img_size 64 and run at every size as sweep.py runs it (dynamic_img_size:
                   the position embedding resampled from the trained grid in each forward pass)
  shapes-convnext  --recipe shapes-convnext: test_convnext with its model_kwargs (BatchNorm, ReLU)
  test_resnet      the quick start's (SHAPES_PRESET): output_stride 8
Each runs only at the sizes it takes (fixres.model_sizes.sizes_it_takes: the ViT at multiples of its
8 px patch); the others show "-". The table gives a ViT's tokens per image at each size.

Measured: the forward pass alone, in eval mode under torch.inference_mode, on a batch of
--batch-size (the sweep's 64) random images already on the device, in channels_last as the
sweep runs them; no data loading, decoding or resizing. Per size the models take turns
(A B C A B C ...) for --repeats rounds after a warm-up pass each, so that drift in the machine's
speed hits all alike; each round times --batches forward passes, and the median round is shown.
FLOPs per image are counted by torch.utils.flop_counter.FlopCounterMode (2 per multiply-add),
attention included (speed.forward_flops).
Prints a markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixres.presets import RECIPES, SHAPES_PRESET  # noqa: E402
from fixres.engine import to_device_batch  # noqa: E402
from fixres.model_sizes import patch_size, sizes_it_takes  # noqa: E402
from fixres.models import any_size_kwargs, create_model, sized_model_kwargs  # noqa: E402
from fixres.shapes import CLASS_NAMES  # noqa: E402
from speed import forward_flops, sync  # noqa: E402

LADDER = [64, 72, 80, 96, 112, 128]


def models(train_res: int) -> dict[str, tuple[str, dict]]:
    """label: (timm name, constructor keywords), as train.py builds each for the built-in data and
    load_run_model rebuilds it for a sweep (a ViT: built at train_res, run at any size)."""
    chosen = {label: (RECIPES[label]["model"], RECIPES[label].get("model_kwargs"))
              for label in ("shapes-vit", "shapes-convnext")}
    chosen[SHAPES_PRESET["model"]] = (SHAPES_PRESET["model"], {"output_stride": SHAPES_PRESET["output_stride"]})
    return {label: (name, any_size_kwargs(name, sized_model_kwargs(name, train_res, kwargs)))
            for label, (name, kwargs) in chosen.items()}


def rate(model, images, batches: int, device) -> float:
    """Images/s of `batches` forward passes on `images`."""
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(batches):
            model(images)
    sync(device)
    return batches * len(images) / (time.perf_counter() - start)


def measure(a, device) -> tuple[dict, dict, dict]:
    """({label: {size: [images/s per round]}}, {label: {size: GFLOPs per image}}, {label: patch px or None})."""
    built = {}
    for label, (name, kwargs) in models(a.train_res).items():
        torch.manual_seed(0)
        model = create_model(name, len(CLASS_NAMES), model_kwargs=kwargs).eval()
        built[label] = (name, model.to(device, memory_format=torch.channels_last))
    takes = {label: set(sizes_it_takes(model, name, a.sizes)[0]) for label, (name, model) in built.items()}
    rates = {label: {} for label in built}
    gflops = {label: {} for label in built}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")
    for size in a.sizes:
        images = to_device_batch(torch.randn(a.batch_size, 3, size, size, device=device), channels_last=True)
        here = [label for label in built if size in takes[label]]
        with autocast:
            for label in here:
                gflops[label][size] = forward_flops(built[label][1], size, device) / 1e9
                rate(built[label][1], images, 1, device)  # warm-up at this size
                rates[label][size] = []
            for _ in range(a.repeats):
                for label in here:
                    rates[label][size].append(rate(built[label][1], images, a.batches, device))
        print(f"{size} px: " + ", ".join(f"{label} {statistics.median(rates[label][size]):.0f} img/s"
                                         for label in here), file=sys.stderr, flush=True)
    return rates, gflops, {label: patch_size(model) for label, (_, model) in built.items()}


def table(a, rates: dict, gflops: dict, patches: dict) -> str:
    labels = list(rates)
    token_labels = [label for label in labels if patches[label]]
    columns = [f"{label} tokens" for label in token_labels]
    columns += [column for label in labels for column in (f"{label} img/s (x)", f"{label} GFLOPs/img (x)")]
    head = "| size | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---:|" * (1 + len(columns))]
    for size in a.sizes:
        cells = [str((size // patches[label]) ** 2) if size in rates[label] else "-" for label in token_labels]
        for label in labels:
            if size not in rates[label]:
                cells += ["-", "-"]
                continue
            speed, flops = statistics.median(rates[label][size]), gflops[label][size]
            base, base_flops = statistics.median(rates[label][a.train_res]), gflops[label][a.train_res]
            cells += [f"{speed:.0f} ({speed / base:.2f}x)", f"{flops:.3f} ({flops / base_flops:.2f}x)"]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=LADDER,
                        help="test sizes, --train-res always among them (default: %(default)s)")
    parser.add_argument("--train-res", type=int, default=SHAPES_PRESET["train_res"],
                        help="the training size: the ViT is built there, as train.py builds it, and each model's "
                             "speed there is the reference of the x columns (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: the sweep's 64)")
    parser.add_argument("--batches", type=int, default=5, help="forward passes per round (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per model and size (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: under autocast, as sweep.py --mixed-precision bf16 (default: %(default)s)")
    a = parser.parse_args(argv)
    for option in ("batch_size", "batches", "repeats", "train_res"):
        if getattr(a, option) <= 0:
            parser.error(f"--{option.replace('_', '-')} must be > 0, got {getattr(a, option)}")
    if any(s <= 0 for s in a.sizes):
        parser.error(f"--sizes must all be > 0, got {a.sizes}")
    a.sizes = sorted(set(a.sizes) | {a.train_res})  # the reference, as sweep.py always sweeps it
    device = torch.device(a.device)
    rates, gflops, patches = measure(a, device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"Forward pass only (no data loading), eval mode, torch.inference_mode, batch {a.batch_size}, "
          f"channels_last, {a.precision}; median of {a.repeats} rounds of {a.batches} batches, the models taking "
          f"turns; {hardware}, torch {torch.__version__}. x: against the model's own {a.train_res} px.\n")
    print(table(a, rates, gflops, patches))


if __name__ == "__main__":
    main()
