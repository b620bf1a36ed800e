"""How fast a model runs at each test size, and the best size within a speed budget.

    python sweep.py --checkpoint runs/<name>                        # img/s at --batch-size and ms at batch 1 per size
    python sweep.py --checkpoint runs/<name> --max-latency-ms 5     # best size that takes at most 5 ms an image
    python finetune.py --checkpoint runs/<name> --min-images-per-s 2000   # --res auto among the sizes that fast

    from fixres.throughput import measure_speed
    speeds = measure_speed(model, [64, 96], batch_size=64, accelerator=accelerator)
    # {64: {"images_per_s": 2400.0, "latency_ms": 3.1}, 96: {...}}

The numbers are the model's forward pass alone on synthetic input (no decoding, no
resizing), as the sweep runs it: channels_last, the accelerator's autocast, inference mode,
on the device of the main process. After `warmup` forwards of each, every (size, batch) is
timed once a round for `repeats` rounds, taking turns so that drift in the machine's speed
falls on all sizes alike, and the median is kept: images/s at batch `batch_size`,
milliseconds at batch 1 (a pass shorter than 20 ms repeated within its timing).
A budget is {"max_latency_ms": ..., "min_images_per_s": ...} (either or both); a size meets
it when it meets every limit given. A budget no size meets is refused in one line before
any evaluation.
"""
from __future__ import annotations

import math
import statistics
import time

import torch
from accelerate.utils import broadcast_object_list
from torch import nn

from fixres.config import ConfigError
from fixres.stats import best_of

WARMUP = 1   # untimed forward passes per size and batch: the first allocates and picks kernels
REPEATS = 5  # timed rounds, the median kept: 4-5 s for the built-in data's 10 sizes on 2 CPU cores (its sweep: 37 s)

# (budget key, the option that sets it, the speed it limits, "at most" or "at least")
LIMITS = (("max_latency_ms", "--max-latency-ms", "latency_ms", min),
          ("min_images_per_s", "--min-images-per-s", "images_per_s", max))


def input_channels(model: nn.Module) -> int:
    """The channels of the model's first convolution (a ViT's patch embedding is one); 3 without one."""
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)


MIN_TIMING_S = 0.02  # a timing shorter than this is mostly timer and scheduler noise: repeat the forward within it


def seconds_per_pass(forward, x, passes: int, device: torch.device) -> float:
    """The mean time of `passes` forward passes of `x`, the kernels finished (CUDA)."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the kernels have finished, not only been queued
    synchronize()  # `x` itself is made, earlier work is done
    start = time.perf_counter()
    for _ in range(passes):
        forward(x)
    synchronize()
    return (time.perf_counter() - start) / passes


def median_seconds(forward, inputs: dict, *, warmup: int, repeats: int, device: torch.device) -> dict:
    """{key: the median time of one forward pass of inputs[key]} over `repeats` rounds, after
    `warmup` untimed passes of each. Every round times every input once, in turn, so that the
    machine's drift (a shared VM's neighbours, clock changes) falls on all of them alike rather
    than on whichever was timed in a slow moment. A pass shorter than MIN_TIMING_S (batch 1 of
    a small model: a few ms) is repeated within each timing, as timeit's autorange does."""
    passes = {}
    for key, x in inputs.items():
        for _ in range(warmup):
            seconds_per_pass(forward, x, 1, device)
        passes[key] = max(1, math.ceil(MIN_TIMING_S / max(seconds_per_pass(forward, x, 1, device), 1e-6)))
    times = {key: [] for key in inputs}
    for _ in range(repeats):
        for key, x in inputs.items():
            times[key].append(seconds_per_pass(forward, x, passes[key], device))
    return {key: statistics.median(values) for key, values in times.items()}


def measure_speed(model: nn.Module, sizes, *, batch_size: int, accelerator, warmup: int = WARMUP,
                  repeats: int = REPEATS) -> dict[int, dict]:
    """{size: {"images_per_s": at batch `batch_size`, "latency_ms": at batch 1}}, medians of
    `repeats` timings. Measured on the main process only (the others wait: timing them all at
    once on shared CPU cores would measure the contention) and broadcast, so every process
    returns the same numbers. The model's train/eval modes are restored after."""
    speeds = None
    if accelerator.is_main_process:
        net = accelerator.unwrap_model(model)
        modes = {m: m.training for m in net.modules()}
        device = accelerator.device
        net.to(device, memory_format=torch.channels_last).eval()  # outside inference mode: it can still train after
        channels = input_channels(net)

        def forward(x):
            with accelerator.autocast():
                return net(x)
        try:
            with torch.inference_mode():
                inputs = {(size, n): torch.randn(n, channels, size, size, device=device)
                          .contiguous(memory_format=torch.channels_last) for size in sizes for n in (batch_size, 1)}
                seconds = median_seconds(forward, inputs, warmup=warmup, repeats=repeats, device=device)
                speeds = {size: {"images_per_s": batch_size / seconds[size, batch_size],
                                 "latency_ms": 1000 * seconds[size, 1]} for size in sizes}
        finally:
            for module, training in modes.items():
                module.train(training)
    if accelerator.num_processes > 1:
        speeds = broadcast_object_list([speeds])[0]
    return speeds


def timed_sizes(model: nn.Module, sizes, *, budget: dict, batch_size: int, accelerator, console,
                repeats: int = REPEATS) -> tuple[dict[int, dict], list[int], float]:
    """measure_speed, then the sizes that meet `budget` (all of them without one), and the
    seconds it took; a budget no size meets is refused here, in one line (sizes_within)."""
    start = time.perf_counter()
    speeds = measure_speed(model, sizes, batch_size=batch_size, accelerator=accelerator, repeats=repeats)
    seconds = time.perf_counter() - start
    console.print(f"speed: {len(speeds)} size(s) timed at batch {batch_size} and 1 on "
                  f"{device_name(accelerator.device)} in {seconds:.1f} s")
    within = sizes_within(speeds, budget, batch_size=batch_size, device=accelerator.device) if budget else list(speeds)
    return speeds, within, seconds


def budget_of(cfg) -> dict:
    """The limits a config gives ({} for none)."""
    return {key: getattr(cfg, key) for key, *_ in LIMITS if getattr(cfg, key) is not None}


def budget_text(budget: dict) -> str:
    """"--max-latency-ms 5 and --min-images-per-s 100", as the options were given."""
    return " and ".join(f"{option} {budget[key]:g}" for key, option, *_ in LIMITS if key in budget)


def meets(speed: dict, budget: dict) -> bool:
    return all(speed[measured] <= budget[key] if better is min else speed[measured] >= budget[key]
               for key, _, measured, better in LIMITS if key in budget)


def sizes_within(speeds: dict[int, dict], budget: dict, *, batch_size: int, device) -> list[int]:
    """The sizes that meet `budget`, in order; a ConfigError in one line when none does, with
    what the fastest size reaches for each limit."""
    within = [size for size, speed in speeds.items() if meets(speed, budget)]
    if within:
        return within
    fastest = []
    for key, _, measured, better in LIMITS:
        if key in budget:
            size = better(speeds, key=lambda s: speeds[s][measured])
            value = _number(speeds[size][measured])
            fastest.append(f"the fastest, {size} px, takes {value} ms at batch 1" if measured == "latency_ms" else
                           f"the fastest, {size} px, does {value} images/s at batch {batch_size}")
    raise ConfigError(f"{budget_text(budget)}: no size meets {'both' if len(budget) > 1 else 'it'} "
                      f"({'; '.join(fastest)} on {device_name(device)})")


def _number(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"  # 3.1, 12.3, 4520: never 4.52e+03


def over_budget(speeds: dict[int, dict], within: list[int], train_res: int) -> str:
    """" (88, 96 px outside it)" for --res auto's reason; the training size, swept as the reference, said so."""
    over = [size for size in speeds if size not in within]
    reference = f"; {train_res} px, the training size, scored as the reference only" if train_res in over else ""
    return f" ({', '.join(map(str, over))} px outside it{reference})" if over else ""


def refuse_over_budget(model: nn.Module, size: int, budget: dict, *, batch_size: int, accelerator,
                       target: bool = False) -> None:
    """finetune.py --res N (or `target`: the test size its source run was trained for) with a
    budget: N timed, and a ConfigError in one line when it is outside."""
    speed = measure_speed(model, [size], batch_size=batch_size, accelerator=accelerator)[size]
    if not meets(speed, budget):
        what, remedy = ((f"--res auto: {size} px, the test size the source run was trained for (--for-test-res),",
                         "give --res N to fine-tune at another size, or drop the budget") if target else
                        (f"--res {size}", "use --res auto to choose within it, or drop the budget"))
        raise ConfigError(f"{what} takes {_number(speed['latency_ms'])} ms at batch 1 and does "
                          f"{_number(speed['images_per_s'])} images/s at batch {batch_size} on "
                          f"{device_name(accelerator.device)}: outside {budget_text(budget)}; {remedy}")


def device_name(device: torch.device) -> str:
    """"cpu", or "cuda:0 (NVIDIA H100 80GB HBM3)": what the numbers were measured on."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def best_within(rows: list[dict], speeds: dict[int, dict], budget: dict) -> dict | None:
    """best_of among the rows whose size meets `budget`; None when none does."""
    within = [r for r in rows if meets(speeds[r["size"]], budget)]
    return best_of(within) if within else None


def add_speeds(rows: list[dict], speeds: dict[int, dict] | None) -> list[dict]:
    """Each row's measured speed, attached by its size: images_per_s_batch (at the sweep's
    batch) and latency_ms (batch 1); rows without speeds (--no-speed) stay as they are."""
    for row in rows if speeds else []:
        row.update(images_per_s_batch=speeds[row["size"]]["images_per_s"], latency_ms=speeds[row["size"]]["latency_ms"])
    return rows


def budget_line(chosen: dict, best: dict, budget: dict, *, batch_size: int, crops: bool = False) -> str:
    """"best within --max-latency-ms 5: 80 px (top-1 91.2%, 4.2 ms at batch 1, ...); best overall: 96 px";
    with `crops` (a crop_pct sweep) each size with its crop_pct."""
    at = (lambda row: f" at crop_pct {row['crop_pct']:g}") if crops else (lambda row: "")  # noqa: E731
    return (f"best within {budget_text(budget)}: {chosen['size']} px{at(chosen)} (top-1 {100 * chosen['top1']:.1f}%, "
            f"{_number(chosen['latency_ms'])} ms at batch 1, {_number(chosen['images_per_s_batch'])} images/s at "
            f"batch {batch_size}); best overall: {best['size']} px{at(best)}")


def speed_record(*, measured: bool, budget: dict, chosen: dict, batch_size: int, repeats: int, device,
                 seconds: float) -> dict:
    """sweep.json's summary of the speed step: how it measured, the budget and the size chosen within it."""
    how = {"device": device_name(device), "batch_size": batch_size, "warmup": WARMUP, "repeats": repeats,
           "statistic": "median", "input": "synthetic, channels_last; forward pass only", "seconds": seconds}
    return {"speed": how if measured else None, "budget": budget or None,
            "best_within_budget": chosen["size"] if budget else None,
            "best_within_budget_crop_pct": chosen["crop_pct"] if budget else None}
