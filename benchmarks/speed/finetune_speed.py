"""Fine-tuning speed against full training: same model, same resolution, same loop.

    python benchmarks/speed/finetune_speed.py                          # resnet18 at 96 px, CPU
    python benchmarks/speed/finetune_speed.py --model resnet50 --res 224 --batch-size 64   # on a GPU

Both runs go through fixres.engine.train_one_epoch over the same in-memory batches (no
decoding, so the numbers are the model's): "full" trains every parameter with the
model in train mode, as train.py does; "finetune" is finetune.py's setup (everything
frozen but the classifier, eval mode but the last BatchNorm, which is synced). The two
alternate for --rounds rounds after one warm-up epoch each; the median images/s of each
is printed, with their ratio and a forward-only (inference) figure for reference, and
written to benchmarks/speed/results/finetune_speed.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fixres.engine import TrainStep, train_one_epoch  # noqa: E402
from fixres.adapt import prepare_for_finetuning, train_only  # noqa: E402
from fixres.models import create_model  # noqa: E402


def epoch_images_per_s(model, batches, accelerator, optimizer, set_modes) -> float:
    setup = TrainStep(model, optimizer, accelerator, lr_at=lambda step: 1e-3,
                      channels_last=accelerator.device.type == "cuda", set_modes=set_modes)
    result, _ = train_one_epoch(setup, batches, first_step=0)
    return result.images_per_s


@torch.inference_mode()
def forward_images_per_s(model, batches) -> float:
    model.eval()
    start = time.perf_counter()
    for images, _, _ in batches:
        model(images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images)
    if images.is_cuda:
        torch.cuda.synchronize()
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--res", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="batches per timed epoch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--cpu", action="store_true")
    a = p.parse_args(argv)

    accelerator = Accelerator(cpu=a.cpu)
    device = accelerator.device
    torch.manual_seed(0)
    # channels_last on GPUs only, as train.py decides (it measured slower on CPUs)
    full = create_model(a.model, a.classes).to(device, memory_format=torch.channels_last if device.type == "cuda"
                                                else torch.contiguous_format)
    tuned = copy.deepcopy(full)
    name, bn = prepare_for_finetuning(tuned, input_size=a.res)
    batches = [(torch.randn(a.batch_size, 3, a.res, a.res, device=device),
                torch.randint(0, a.classes, (a.batch_size,), device=device), 0) for _ in range(a.batches)]
    jobs = {
        "full": (full, torch.optim.SGD(full.parameters(), lr=1e-3, momentum=0.9), lambda m: m.train()),
        "finetune": (tuned, torch.optim.SGD([q for q in tuned.parameters() if q.requires_grad], lr=1e-3,
                                            momentum=0.9), train_only(bn)),
    }
    rates = {key: [] for key in (*jobs, "forward")}
    for key, (model, optimizer, modes) in jobs.items():  # warm-up
        epoch_images_per_s(model, batches[:2], accelerator, optimizer, modes)
    for _ in range(a.rounds):  # taking turns, so that drift in the machine's speed hits all alike
        for key, (model, optimizer, modes) in jobs.items():
            rates[key].append(epoch_images_per_s(model, batches, accelerator, optimizer, modes))
        rates["forward"].append(forward_images_per_s(full, batches))
    inference = statistics.median(rates["forward"])
    full_rate, tuned_rate = statistics.median(rates["full"]), statistics.median(rates["finetune"])
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"{a.model} at {a.res} px, batch {a.batch_size}, {a.batches} batches x {a.rounds} rounds, {hardware}, "
          f"torch {torch.__version__}; last BN {name}")
    print(f"full training   {full_rate:8.1f} img/s   (rounds: {', '.join(f'{r:.1f}' for r in rates['full'])})")
    print(f"fine-tuning     {tuned_rate:8.1f} img/s   (rounds: {', '.join(f'{r:.1f}' for r in rates['finetune'])})")
    print(f"forward only    {inference:8.1f} img/s")
    print(f"fine-tuning / full training = {tuned_rate / full_rate:.2f}x")
    out = Path(__file__).resolve().parent / "results" / "finetune_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "hardware": hardware, "torch": torch.__version__, "last_bn": name,
                               "images_per_s": rates, "median": {"full": full_rate, "finetune": tuned_rate,
                                                                 "forward": inference},
                               "ratio": tuned_rate / full_rate}, indent=1) + "\n")


if __name__ == "__main__":
    main()
