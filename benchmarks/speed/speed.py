"""Speed of fixres in one run, side by side: the model alone, the input pipeline alone,
train.py's loop end to end, and a plain loop like the Cassava blog post's as the baseline.

    python benchmarks/speed/speed.py                     # this CPU: resnet18 at 64 px, pipeline at 224 and 128
    python benchmarks/speed/speed.py --model resnet50 --res 224 --batch-size 256 --eval-res 384 \\
        --precision bf16 --compile --images 4096    # a GPU (all CPU cores feed the pipeline)

    python benchmarks/speed/speed.py --parts epochs --images 640 --rounds 5   # persistent workers, prefetch depth
    python benchmarks/speed/speed.py --parts epochs --data ~/.cache/fixres/<shapes>/labels.csv --model test_resnet \
        --output-stride 8 --res 64 --batch-size 32 --loop-workers 1    # the same on the quick start's data

Parts (--parts, default model,pipeline,loop):
  model     (a) model-bound images/s, inputs already in device memory: a training step
            (forward, backward, optimizer), evaluation at --eval-res, a FixRes fine-tuning step
            (frozen trunk); with --compile the training step compiled too; on a GPU the peak
            memory of a training step per batch size, and the fraction of --peak-tflops reached
  pipeline  (b) decode + augment + collate alone on ImageNet-size JPEGs (500 x 375, quality
            90, made by the built-in dataset's generator), for each --pipeline-res: the Cassava
            blog post's (PIL open, RandomResizedCrop, ToTensor, Normalize), train_transform
            (torchvision v2 on the decoded PIL image) and DecodeRandomResizedCrop (train.py's
            fast decode: reduced-scale JPEG decoding, uint8, normalised on the device), also with
            --recipe tv-resnet50-v2's TrivialAugmentWide and random erasing after it; and the
            decoding step alone of the blog's and of the fast decode, the bound on each;
            images/s with one worker and with --workers workers
  loop      (c) train.py's loop (build_loaders, Accelerate, train_one_epoch) and (d) the plain
            loop, same model, data, batch and workers, taking turns for --rounds rounds
  epochs    (e) train.py's epoch loop (training, then evaluation on a quarter of the JPEGs held
            out) for --epochs epochs, its loader workers re-created each epoch (as train.py did
            before persistent workers) or kept (persistent), prefetch_factor 2 or 4, the variants taking turns; with
            --data, on that dataset's training and validation splits instead

Prints tables and writes benchmarks/speed/results/speed-<cpu|cuda>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixres.config import TrainConfig  # noqa: E402
from fixres.data import load_split  # noqa: E402
from fixres.engine import TrainStep, evaluate, train_one_epoch  # noqa: E402
from fixres.adapt import prepare_for_finetuning, train_only  # noqa: E402
from fixres.loaders import PREFETCH_BATCHES, ImageDataset, build_loaders, collate_skipping  # noqa: E402
from fixres.models import create_model  # noqa: E402
from fixres.shapes import generate  # noqa: E402
from fixres.optim import build_optimizer  # noqa: E402
from fixres.preprocessing import create_transform  # noqa: E402
from fixres.runtime import make_accelerator  # noqa: E402
from fixres.transforms import (DecodeRandomResizedCrop, crop_augment, eval_transform, normalize_batch,  # noqa: E402
                               train_transform)
from train_loop import BlogDataset  # noqa: E402  (the Cassava blog post's dataset: PIL open, convert, transform)
from train_loop import plain_loop as blog_loop  # noqa: E402

BLOG_NORMALIZE = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(step, images_per_call: int, calls: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    sync(device)
    return images_per_call * calls / (time.perf_counter() - start)


def forward_flops(model, res: int, device) -> float:
    """FLOPs of one image's forward pass (2 per multiply-add), counted by PyTorch. Attention is
    counted through its plain matrix products: FlopCounterMode has no formula for the CPU's fused
    scaled_dot_product_attention kernel, and would count a ViT's attention as nothing there."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.eval()(torch.randn(1, 3, res, res, device=device))
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- (a) the model alone

def model_bound(a, device) -> dict:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    cfg = TrainConfig(model=a.model, optimizer="adamw")

    def make():
        torch.manual_seed(0)
        return create_model(a.model, a.classes).to(device, memory_format=memory_format)

    def batch(b, res):
        return (torch.randn(b, 3, res, res, device=device).contiguous(memory_format=memory_format),
                torch.randint(0, a.classes, (b,), device=device))

    def train_step_fn(model, optimizer, x, y):
        def step():
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    results = {}
    x, y = batch(a.batch_size, a.res)
    model = make().train()
    optimizer = build_optimizer(model.named_parameters(), cfg)  # fused AdamW on a GPU, as train.py
    results["train"] = timed_rate(train_step_fn(model, optimizer, x, y), a.batch_size, a.steps, 3, device)

    xe, _ = batch(a.eval_batch_size, a.eval_res)
    model.eval()

    def eval_step():
        with torch.inference_mode(), autocast:
            model(xe)
    results[f"eval@{a.eval_res}"] = timed_rate(eval_step, a.eval_batch_size, a.steps, 3, device)

    tuned = make()
    _, last_bn = prepare_for_finetuning(tuned, input_size=a.eval_res)  # frozen but the head and the last BN
    train_only(last_bn)(tuned)
    xf, yf = batch(a.batch_size, a.eval_res)
    ft_optimizer = torch.optim.SGD([q for q in tuned.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)
    results[f"finetune@{a.eval_res}"] = timed_rate(train_step_fn(tuned, ft_optimizer, xf, yf), a.batch_size,
                                                   a.steps, 3, device)
    del tuned, ft_optimizer, xf, yf

    if a.compile:
        compiled = make().train()
        compiled.compile()
        c_optimizer = build_optimizer(compiled.named_parameters(), cfg)
        step = train_step_fn(compiled, c_optimizer, x, y)
        start = time.perf_counter()
        step()  # compiles
        sync(device)
        results["compile_seconds"] = time.perf_counter() - start
        results["train compiled"] = timed_rate(step, a.batch_size, a.steps, 3, device)
        del compiled, c_optimizer

    flops = forward_flops(make(), a.res, device)
    results["forward_gflops_per_image"] = flops / 1e9
    if device.type == "cuda" and a.peak_tflops:
        for key in ("train", "train compiled"):
            if key in results:  # training costs about 3 forward passes
                results[f"{key} fraction of peak"] = 3 * flops * results[key] / (a.peak_tflops * 1e12)
    if device.type == "cuda":
        results["peak_memory_gib"] = {}
        del model, optimizer, x, y, xe
        for b in a.memory_batches:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            try:
                m = make().train()
                o = build_optimizer(m.named_parameters(), cfg)
                xb, yb = batch(b, a.res)
                train_step_fn(m, o, xb, yb)()
                sync(device)
                results["peak_memory_gib"][b] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            except torch.OutOfMemoryError:
                results["peak_memory_gib"][b] = "out of memory"
            finally:
                m = o = xb = yb = None
    return results


# ---------------------------------------------------------------- (b) the input pipeline alone

class NormalizedInWorker:
    """DecodeRandomResizedCrop plus the float normalisation in the worker: what the fast
    decoder costs when its last step cannot be moved to a device."""
    takes_path = True

    def __init__(self, decoder):
        self.decoder = decoder

    def __call__(self, path):
        return normalize_batch(self.decoder(path)[None])[0]


class DecodingAlone:
    """Only a pipeline's decoding step, everything after it skipped: the most that pipeline
    could reach were the crop, resize and tensor work free."""
    takes_path = True

    def __init__(self, decode):
        self.decode = decode

    def __call__(self, path):
        self.decode(path)
        return torch.zeros(3, 1, 1, dtype=torch.uint8)


def pipelines(res: int) -> dict:
    blog_tf = T.Compose([T.RandomResizedCrop(res), T.ToTensor(), BLOG_NORMALIZE])
    fast = DecodeRandomResizedCrop(size=res)
    # --recipe tv-resnet50-v2's per-image augmentation on the fast decoder's crops
    recipe = DecodeRandomResizedCrop(size=res, augment=crop_augment(auto_augment="ta_wide", random_erase=0.1))
    return {
        "blog": lambda samples: BlogDataset(samples, blog_tf),
        "train_transform": lambda samples: ImageDataset(samples, train_transform(size=res), seed=0),
        "fast decode": lambda samples: ImageDataset(samples, fast, seed=0),
        "fast decode + TrivialAugment, erasing 0.1": lambda samples: ImageDataset(samples, recipe, seed=0),
        "fast decode, normalised in worker": lambda samples: ImageDataset(samples, NormalizedInWorker(fast), seed=0),
        "blog's decoding alone": lambda samples: ImageDataset(
            samples, DecodingAlone(lambda path: Image.open(path).convert("RGB")), seed=0),
        "fast decode's decoding alone": lambda samples: ImageDataset(samples, DecodingAlone(fast.decode), seed=0),
    }


def loader_rate(dataset, workers: int, batch_size: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                                         collate_fn=collate_skipping if isinstance(dataset, ImageDataset) else None,
                                         persistent_workers=False, prefetch_factor=4 if workers else None,
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
    iterator = iter(loader)
    next(iterator)  # workers started and the first batch made: not counted
    start, n = time.perf_counter(), 0
    for batch in iterator:
        n += len(batch[1])
    return n / (time.perf_counter() - start)


def input_pipeline(a, samples) -> dict:
    results = {}
    for res in a.pipeline_res:
        makers = pipelines(res)
        for workers in sorted({1, a.workers}):
            subset = samples[: a.images_per_worker * workers]  # about a second's work at any worker count
            rates = {name: [] for name in makers}
            for _ in range(a.rounds):  # taking turns, so that drift in the machine's speed hits all alike
                for name, make in makers.items():
                    rates[name].append(loader_rate(make(subset), workers, a.batch_size))
            for name, r in rates.items():
                results[f"{res}/{name}/{workers}"] = {"res": res, "pipeline": name, "workers": workers,
                                                      "rounds": r, "images_per_s": statistics.median(r)}
    return results


# ---------------------------------------------------------------- (c), (d) whole training loops

def plain_loop(a, samples, device) -> float:
    """benchmarks/speed/train_loop.py's blog-style loop, with fixres's precision for fairness."""
    args = argparse.Namespace(res=a.res, batch_size=a.batch_size, workers=a.loop_workers, model=a.model,
                              classes=a.classes)
    return blog_loop(samples, args, device=device, bf16=a.precision == "bf16")


def fixres_loop(a, samples, fast_decode: bool = True, *, epochs: int = 1, val=(), persistent: bool = True,
                prefetch: int = PREFETCH_BATCHES) -> dict:
    """train.py's loop with train.py's defaults, the fast decoder on or off: loaders built
    once, then `epochs` x (training epoch, evaluation of `val` when given). The training
    images/s of each epoch and the seconds of each (training + evaluation)."""
    torch.manual_seed(0)
    cfg = TrainConfig(model=a.model, train_res=a.res, batch_size=a.batch_size, workers=a.loop_workers,
                      cpu=a.device == "cpu", fast_decode=fast_decode, output_stride=a.output_stride,
                      mixed_precision="bf16" if a.precision == "bf16" else "no")
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    train_tf = create_transform(cfg, "train", device=device)
    split = type("Split", (), {"train": samples, "val": list(val) or samples[:8]})
    train_loader, val_loader = build_loaders(split, cfg, workers=a.loop_workers, pin_memory=device.type == "cuda",
                                             train_tf=train_tf, eval_tf=eval_transform(size=a.res),
                                             persistent=persistent, prefetch=prefetch)
    channels_last = device.type == "cuda"
    model = create_model(a.model, num_classes=a.classes, output_stride=a.output_stride).to(device, memory_format=torch.channels_last
                                                            if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model.named_parameters(), cfg)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    rates, seconds, waits = [], [], []
    setup = TrainStep(model, optimizer, accelerator, lr_at=lambda step: 1e-3, channels_last=channels_last)
    for epoch in range(epochs):
        start = time.perf_counter()
        train_loader.set_epoch(epoch)
        result, _ = train_one_epoch(setup, train_loader, first_step=0)
        if val:
            evaluate(model, val_loader, accelerator, channels_last=channels_last)
        sync(device)
        rates.append(result.images_per_s)
        seconds.append(time.perf_counter() - start)
        waits.append(result.data_wait_frac)
    return {"images_per_s": rates, "seconds": seconds, "data_wait_frac": waits}


def loops(a, samples, device) -> dict:
    variants = {"plain": lambda: plain_loop(a, samples, device),
                "fixres": lambda: fixres_loop(a, samples, True)["images_per_s"][0],
                "fixres --no-fast-decode": lambda: fixres_loop(a, samples, False)["images_per_s"][0]}  # torchvision's
    for run_variant in (lambda n: plain_loop(a, samples[:n], device), lambda n: fixres_loop(a, samples[:n], True)):
        run_variant(2 * a.batch_size)  # warm-up of both: allocations, file cache, cuDNN's algorithm search
    rates = {k: [] for k in variants}
    for _ in range(a.rounds):  # taking turns, so that drift in the machine's speed hits all alike
        for key, run in variants.items():
            rates[key].append(run())
    return {k: {"rounds": v, "images_per_s": statistics.median(v)} for k, v in rates.items()}


LOADER_VARIANTS = {  # (persistent workers, prefetch_factor)
    "workers re-created each epoch, prefetch 2": (False, 2),   # train.py before persistent workers
    "persistent workers, prefetch 2": (True, 2),
    "persistent workers, prefetch 4": (True, 4),
}


def epochs(a, samples, held_out=None) -> dict:
    """(e) train.py's epoch loop (training, then evaluation) over --epochs epochs with each
    loader variant, taking turns; the first epoch (worker start for all, allocations) is
    reported apart from the later ones, where persistent workers are already running.
    `held_out`: the validation samples (--data's); else a quarter of `samples`."""
    if held_out:
        train, val = samples, held_out
    else:
        n_val = max(a.batch_size, len(samples) // 4)
        train, val = samples[n_val:], samples[:n_val]
    fixres_loop(a, train[: 2 * a.batch_size], epochs=1, val=val[: a.batch_size])  # warm-up: allocations, file cache
    runs = {name: [] for name in LOADER_VARIANTS}
    for _ in range(a.rounds):  # taking turns, so that drift in the machine's speed hits all alike
        for name, (persistent, prefetch) in LOADER_VARIANTS.items():
            runs[name].append(fixres_loop(a, train, epochs=a.epochs, val=val, persistent=persistent,
                                          prefetch=prefetch))
    report = {}
    for name, rounds in runs.items():
        later = [s for r in rounds for s in r["seconds"][1:]]
        report[name] = {"rounds": rounds, "first_epoch_seconds": statistics.median(r["seconds"][0] for r in rounds),
                        "later_epoch_seconds": statistics.median(later),
                        "later_images_per_s": statistics.median(x for r in rounds for x in r["images_per_s"][1:]),
                        "later_data_wait_frac": statistics.median(x for r in rounds for x in r["data_wait_frac"][1:])}
    return {"train_images": len(train), "val_images": len(val), "variants": report}


# ---------------------------------------------------------------- report

def hardware(device) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cpu}"
    return cpu


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="model,pipeline,loop")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--res", type=int, default=64, help="training resolution (model and loop parts)")
    p.add_argument("--eval-res", type=int, default=None, help="evaluation and fine-tuning resolution (default: --res)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: 2 x --batch-size")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--compile", action="store_true", help="also time the compiled training step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model-bound rate")
    p.add_argument("--memory-batches", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's dense peak for --precision, for the fraction of peak (H100 SXM bf16: 989)")
    p.add_argument("--pipeline-res", type=int, nargs="+", default=[224, 128])
    p.add_argument("--workers", type=int, default=None, help="pipeline workers besides 1 (default: all cores)")
    p.add_argument("--loop-workers", type=int, default=None, help="loader workers in (c) and (d) (default: "
                   "train.py's, from the cores)")
    p.add_argument("--images", type=int, default=512, help="ImageNet-size JPEGs to generate and read")
    p.add_argument("--pipeline-repeat", type=int, default=1,
                   help="read the JPEGs this many times per pipeline measurement (many workers finish a few "
                        "thousand in a second)")
    p.add_argument("--images-per-worker", type=int, default=256, help="images read per pipeline worker")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="epochs per round in (e)")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--output-stride", type=int, default=None, help="timm's output_stride, as train.py's")
    p.add_argument("--data", default=None, help="(e) on this CSV split or ImageFolder (e.g. the quick start's "
                   "built-in data) instead of the generated 500 x 375 JPEGs")
    p.add_argument("--data-dir", default=None, help="where the JPEGs go (default: $FIXRES_CACHE or ~/.cache/fixres)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.eval_res = a.eval_res or a.res
    a.eval_batch_size = a.eval_batch_size or 2 * a.batch_size
    cores = len(os.sched_getaffinity(0))
    a.workers = a.workers if a.workers is not None else cores
    if a.loop_workers is None:
        from fixres.loaders import worker_count
        a.loop_workers = worker_count()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else "cpu")
    torch.set_flush_denormal(True)  # as make_accelerator does, for every part alike
    parts = set(a.parts.split(","))
    report = {"command": " ".join(["python", "benchmarks/speed/speed.py", *(argv if argv is not None else sys.argv[1:])]),
              "hardware": hardware(device), "torch": torch.__version__, "args": vars(a)}
    print(f"{report['hardware']}, torch {torch.__version__}, {a.model}, batch {a.batch_size}, {a.precision}")

    if "model" in parts:
        report["model"] = m = model_bound(a, device)
        print(f"\n(a) model-bound images/s ({a.model}, inputs in {device.type} memory, "
              f"{m['forward_gflops_per_image']:.2f} GFLOP per forward at {a.res} px)")
        for key, value in m.items():
            if key not in ("forward_gflops_per_image", "peak_memory_gib"):
                print(f"  {key:<28} {value:>10.3f}" if "fraction" in key or "seconds" in key else
                      f"  {key:<28} {value:>10.1f}")
        if "peak_memory_gib" in m:
            print("  peak memory of a training step: " + ", ".join(
                f"batch {b}: {v if isinstance(v, str) else f'{v:.1f} GiB'}" for b, v in m["peak_memory_gib"].items()))

    held_out = None
    if a.data:
        split = load_split(a.data)
        samples, held_out, a.classes = split.train, split.val, len(split.classes)
    elif parts & {"pipeline", "loop", "epochs"}:
        root = Path(a.data_dir or os.environ.get("FIXRES_CACHE") or Path.home() / ".cache" / "fixres")
        folder = root / f"speed-500x375-q90-{a.images}"
        if not (folder / "labels.csv").exists():
            generate(folder, n_train=a.images, n_val=8, width=500, height=375, quality=90, seed=0)
        split = load_split(str(folder / "labels.csv"))
        samples = split.train

    if "pipeline" in parts:
        report["pipeline"] = pipe = input_pipeline(a, samples * a.pipeline_repeat)
        print(f"\n(b) input pipeline alone, {len(samples)} JPEGs x {a.pipeline_repeat} of 500 x 375 (quality 90), batch {a.batch_size}, "
              f"images/s (median of {a.rounds})")
        for res in a.pipeline_res:
            blog = {w: pipe[f"{res}/blog/{w}"]["images_per_s"] for w in sorted({1, a.workers})}
            for name in pipelines(res):
                row = [pipe[f"{res}/{name}/{w}"]["images_per_s"] for w in sorted({1, a.workers})]
                print(f"  {res:>4} px  {name:<34} " + "  ".join(
                    f"{w} worker(s): {r:8.1f} ({r / blog[w]:.2f}x blog)" for w, r in zip(sorted({1, a.workers}), row)))

    if "loop" in parts:
        report["loop"] = lp = loops(a, samples, device)
        plain = lp["plain"]["images_per_s"]
        print(f"\n(c), (d) training loops end to end, {a.model} at {a.res} px, batch {a.batch_size}, "
              f"{a.loop_workers} workers, images/s (median of {a.rounds})")
        for key, value in lp.items():
            print(f"  {key:<22} {value['images_per_s']:8.1f}  ({value['images_per_s'] / plain:.3f}x plain)  rounds: "
                  + " ".join(f"{r:.1f}" for r in value["rounds"]))

    if "epochs" in parts:
        report["epochs"] = ep = epochs(a, samples, held_out)
        before = ep["variants"]["workers re-created each epoch, prefetch 2"]["later_epoch_seconds"]
        print(f"\n(e) train.py's epochs (training on {ep['train_images']} images, then evaluating {ep['val_images']}), "
              f"{a.model} at {a.res} px, batch {a.batch_size}, {a.loop_workers} workers, median of {a.rounds} rounds")
        for name, v in ep["variants"].items():
            print(f"  {name:<44} first epoch {v['first_epoch_seconds']:6.2f} s, later epochs "
                  f"{v['later_epoch_seconds']:6.2f} s ({before / v['later_epoch_seconds']:.3f}x re-created), "
                  f"training {v['later_images_per_s']:.1f} img/s, data wait {100 * v['later_data_wait_frac']:.0f}%")

    out = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / f"speed-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
