"""train.py's training loop against a plain PyTorch loop like the Cassava blog post's.

Same model, data, batch size, threads and worker count; the two loops take turns
(A B A B ...) so that drift in the machine's speed hits both alike, and the median
of the rounds is compared.

    python benchmarks/speed/train_loop.py                       # shapes data, resnet18 at 64 px
    python benchmarks/speed/train_loop.py --model resnet50 --res 64 --images 256 --rounds 3

Prints a table and writes benchmarks/speed/results/train_loop.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fixres.config import TrainConfig  # noqa: E402
from fixres.data import load_split  # noqa: E402
from fixres.engine import TrainStep, train_one_epoch  # noqa: E402
from fixres.loaders import build_loaders  # noqa: E402
from fixres.models import create_model  # noqa: E402
from fixres.shapes import ensure_shapes  # noqa: E402
from fixres.optim import build_optimizer  # noqa: E402
from fixres.runtime import make_accelerator  # noqa: E402
from fixres.transforms import eval_transform, train_transform  # noqa: E402


class BlogDataset(torch.utils.data.Dataset):
    """What the Cassava blog post's PyTorch code does: PIL open, convert, transform."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(Image.open(path).convert("RGB")), label


def plain_loop(samples, args, device=torch.device("cpu"), bf16: bool = False) -> float:
    """Like the Cassava blog post's loop: its dataset and transforms, model.to(device),
    loss.backward(), optimizer.step(); `bf16` autocast gives it fixres's precision on a GPU."""
    torch.manual_seed(0)
    tf = T.Compose([T.RandomResizedCrop(args.res), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = torch.utils.data.DataLoader(BlogDataset(samples, tf), batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, drop_last=True, pin_memory=device.type == "cuda")
    model = create_model(args.model, num_classes=args.classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    start, seen = time.perf_counter(), 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        seen += labels.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)


def fixres_loop(samples, val, args) -> float:
    torch.manual_seed(0)
    cfg = TrainConfig(model=args.model, train_res=args.res, batch_size=args.batch_size, workers=args.workers,
                      cpu=True, channels_last=args.channels_last)
    accelerator = make_accelerator(cfg)
    split = type("Split", (), {"train": samples, "val": val})
    train_loader, _ = build_loaders(split, cfg, workers=args.workers, pin_memory=False,
                                    train_tf=train_transform(size=args.res),
                                    eval_tf=eval_transform(size=args.res))
    model = create_model(args.model, num_classes=args.classes)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.named_parameters(), cfg)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    setup = TrainStep(model, optimizer, accelerator, lr_at=lambda step: 1e-3, channels_last=cfg.channels_last)
    result, _ = train_one_epoch(setup, train_loader, first_step=0)
    return result.images_per_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1024, help="training images per timed pass")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_loop.json"))
    args = parser.parse_args(argv)

    # fixres flushes denormals on CPU (make_accelerator); the setting is process-wide, so
    # set it up front or the first plain round alone would run without it
    torch.set_flush_denormal(True)
    split = load_split(ensure_shapes())
    samples = split.train[: args.images]
    args.classes = len(split.classes)
    plain_loop(samples[: 2 * args.batch_size], args)  # warm-up: first-call allocations, file cache
    rates = {"plain": [], "fixres": []}
    for _ in range(args.rounds):
        rates["plain"].append(plain_loop(samples, args))
        rates["fixres"].append(fixres_loop(samples, split.val[:8], args))
    median = {k: statistics.median(v) for k, v in rates.items()}
    ratio = median["fixres"] / median["plain"]
    print(f"{'loop':<8} {'images/s (median)':>18}  rounds")
    for name in ("plain", "fixres"):
        print(f"{name:<8} {median[name]:>18.1f}  " + " ".join(f"{r:.1f}" for r in rates[name]))
    print(f"ratio fixres/plain: {ratio:.3f}")
    result = {"args": vars(args), "rates": rates, "median": median, "ratio": ratio,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()
              or platform.machine(), "command": " ".join(["python", "benchmarks/speed/train_loop.py", *(argv or sys.argv[1:])])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
