"""The FixRes methods that need no gradients, and the --res auto choice, over a data split.

    python finetune.py --checkpoint runs/<name> --method bn-stats --res 96    # bn_stats
    python finetune.py --checkpoint runs/<name> --method parametric --res 96  # parametric
    python finetune.py --checkpoint runs/<name>                               # choose_res, then fine-tune

The pieces they are made of are fixres/adapt.py's (BatchNorm re-estimation, the pooled features)
and fixres/adapter.py's (the Frechet fit and map).
"""
from __future__ import annotations

import copy

import torch

from fixres import adapt
from fixres.adapter import ADAPTER, XI, FrechetAdapter, attach_adapter, fit_gev
from fixres.classifiers import classifier_names
from fixres.config import ConfigError
from fixres.loaders import EpochSampler, ImageDataset, collate_skipping, round_batches
from fixres.model_sizes import sizes_it_takes
from fixres.preprocessing import create_transform
from fixres.report import EpochProgress
from fixres.runtime import use_channels_last
from fixres.resolution import default_sizes
from fixres.stats import add_differences, best_of
from fixres.sweep import run_sweep
from fixres.throughput import add_speeds, budget_of, budget_text, over_budget, timed_sizes


NEGATIVE_CHECK_IMAGES = 32  # parametric: training images whose pooled features must not go far negative
ACTIVATION_FLOOR = -0.375    # the lowest value of hard-swish (x (x + 3) / 6 at x = -1.5); Mish -0.31, SiLU -0.28
CHOICE_KEYS = ("size", "top1", "top5", "loss", "count", "diff_vs_train", "diff_low", "diff_high", "gained", "lost",
               "images_per_s_batch", "latency_ms")  # the last two with a speed budget only


def choose_res(cfg, model, eval_meta, split, accelerator, console, sweep, *, predicted, last_bn, choice):
    """--res auto: the size that does best on `choice`, the validation images held out for
    finetune.py's choices (held_out_split), once the last BN's statistics are re-estimated at
    that size on --choice-images training images (drawn with --seed): a seconds-long stand-in
    for fine-tuning at every size, which moves the best size up (the paper's point; without it
    the choice stops where the untouched statistics still fit). Scored on training images, a
    model that fits them ties at 100% everywhere; scored on the images that then report, the
    luck of the choice would enter the reported gain. Best by fixres.stats.best_of. `last_bn`
    None (a LayerNorm head, a norm-free net): nothing to re-estimate, each size as the model stands.
    Returns (size, the printed reason, the sweep's rows)."""
    train_res = cfg.train_res
    # FixRes tests higher: the default ladder from the training size up (--sizes: any)
    sizes = sorted(set(cfg.sizes or [s for s in default_sizes(train_res, predicted) if s >= train_res]) | {train_res})
    sizes, dropped = sizes_it_takes(model, cfg.model, sizes)  # a ViT: multiples of its patch
    if dropped:
        console.print(dropped)
    candidates, speeds, budget = sizes, None, budget_of(cfg)
    # timed before any scoring (a budget no size meets is refused here); the training size stays the reference
    if budget:
        speeds, candidates, _ = timed_sizes(copy.deepcopy(model), sizes, budget=budget, batch_size=cfg.batch_size,
                                            accelerator=accelerator, console=console)
        sizes = sorted(set(candidates) | {train_res})
    # no running statistics (a LayerNorm head, a norm-free net): each size scored as the model stands
    bn_images = seeded_subset(split.train, cfg.choice_images, cfg.seed) if last_bn else []
    rows = []
    for size in sizes:
        trial = copy.deepcopy(model).to(accelerator.device)
        label = f"choosing: {size} px" + (", last BN re-estimated" if last_bn else "")
        with EpochProgress(console, label, len(bn_images) + len(choice)) as bar:
            if last_bn:
                reestimate_last_bn(trial, bn_images, size, cfg, accelerator, sweep["workers"], last_bn)
            rows += run_sweep(trial, eval_meta, split, [size], cfg.crop_pct, accelerator, progress=bar, samples=choice,
                              **{**sweep, "activations": False})
    by_size = {r["size"]: r for r in add_speeds(add_differences(rows, train_res), speeds)}
    res = best_of([r for r in rows if r["size"] in candidates])["size"]
    how = (f"the last BN's statistics re-estimated at each size on {len(bn_images)} training images" if last_bn else
           "the model as it stands (no running statistics to re-estimate)")
    within = f" within {budget_text(budget)}{over_budget(speeds, candidates, train_res)}" if budget else ""
    why = (f"--res auto: {res} px, the best of the sweep ({', '.join(map(str, candidates))} px){within} on the "
           f"{len(choice)} held-out validation images, {how}: top-1 {100 * by_size[res]['top1']:.2f}% against "
           f"{100 * by_size[train_res]['top1']:.2f}% "
           f"at the training resolution {train_res} px; the apparent-size model predicts {predicted} px")
    if res == train_res:
        why += "; no larger size did better, so this only adapts the last norm and the classifier to test-style crops"
    return res, why, rows


def held_out_split(val: list, count: int, seed: int) -> tuple[list, list]:
    """(held out, reported): --choice-images validation images (at most half of them) drawn
    with `seed` for every choice finetune.py makes (the size, the epoch that ships), and the
    rest, which report before and after and never choose. Both keep the split's order; the
    same on every process."""
    held = min(count, len(val) // 2)
    if held == 0:
        raise ConfigError(f"finetune.py needs at least 2 validation images (one to choose on, one to report on), "
                          f"the split has {len(val)}")
    chosen = set(seeded_subset(range(len(val)), held, seed))
    return [s for i, s in enumerate(val) if i in chosen], [s for i, s in enumerate(val) if i not in chosen]


def seeded_subset(samples: list, count: int, seed: int) -> list:
    """`count` samples (all when there are fewer) in an order drawn with `seed`: the same on every process."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    return [samples[i] for i in order[:count].tolist()]


def bn_stats(cfg, model, split, accelerator, console, workers, last_bn) -> dict:
    """The last BN's running statistics, re-estimated over the training split at the new
    resolution with the test preprocessing (one pass, no gradients)."""
    with EpochProgress(console, f"bn-stats at {cfg.res} px", len(split.train)):
        seen = reestimate_last_bn(model, split.train, cfg.res, cfg, accelerator, workers, last_bn)
    return {"bn_stats_images": seen}


def reestimate_last_bn(model, samples, size, cfg, accelerator, workers, last_bn: str | list[str]) -> int:
    """The last BN's statistics over `samples` at `size`, preprocessed as the run tests; `last_bn`
    a list of names: those BNs' in the same pass (parallel branches, as adapt.reestimate_bn_stats says).
    Every sample counts once: a shuffled order cut into rounds of --batch-size per process,
    the last round partial, not padded by Accelerate's repeats nor dropped. Returns the images seen."""
    tf = create_transform(cfg, "eval", size=size, decode="cpu")
    order = EpochSampler(len(samples), cfg.seed).order()
    rounds = [[order[i] for i in batch] for batch in
              round_batches(len(order), cfg.batch_size, accelerator.process_index, accelerator.num_processes)]
    loader = torch.utils.data.DataLoader(ImageDataset(samples, tf, cfg.skip_bad_images), batch_sampler=rounds,
                                         collate_fn=collate_skipping, num_workers=workers)
    channels_last = use_channels_last(cfg.channels_last, accelerator.device)
    names = [last_bn] if isinstance(last_bn, str) else last_bn
    return adapt.reestimate_bn_stats(model, [model.get_submodule(name) for name in names], loader, accelerator,
                                     channels_last=channels_last)


def pooled_at(cfg, model, samples, size, accelerator, workers) -> torch.Tensor:
    """The classifier's input for `samples` at `size`, preprocessed as the run tests."""
    tf = create_transform(cfg, "eval", size=size, decode="cpu")
    loader = torch.utils.data.DataLoader(ImageDataset(samples, tf, cfg.skip_bad_images), batch_size=cfg.batch_size,
                                         collate_fn=collate_skipping, num_workers=workers)
    return adapt.pooled_features(model, accelerator.prepare(loader), accelerator,
                                 channels_last=use_channels_last(cfg.channels_last, accelerator.device))


def refuse_negative_features(cfg, model, split, accelerator, workers, classifiers: list[str]) -> None:
    """The Frechet distribution is bounded below and heavy above: the parametric map models
    pooled activations (the paper's ReLU; SiLU, GELU, Mish and hard-swish dip a little below 0,
    never under ACTIVATION_FLOOR, and so neither does an average of them). A LayerNorm head
    (ConvNeXt) or a ViT's normalised token centres each image's features on 0, so values far
    below it show on any image: NEGATIVE_CHECK_IMAGES training images at the training size
    decide, before any other work."""
    samples = seeded_subset(split.train, NEGATIVE_CHECK_IMAGES, cfg.seed)
    lowest = pooled_at(cfg, model.to(accelerator.device), samples, cfg.train_res, accelerator, workers).min().item()
    if lowest < ACTIVATION_FLOOR:
        raise ConfigError(f"--method parametric: {cfg.model}'s pooled features (the input of its "
                          f"{adapt.classifiers_text(classifiers)}) go negative ({lowest:.3g} on {len(samples)} "
                          f"training images at {cfg.train_res} px, below any activation's {ACTIVATION_FLOOR}), and the Frechet map "
                          f"models pooled activations; use --method finetune")


def parametric(cfg, model, split, accelerator, console, workers) -> dict:
    """Fit the Frechet model to the pooled features of --fit-images training images at the
    training and at the new resolution; attach the equalising map before the classifier."""
    subset = seeded_subset(split.train, cfg.fit_images, cfg.seed)
    fits = {}
    for size in (cfg.train_res, cfg.res):
        with EpochProgress(console, f"pooled features at {size} px", len(subset)):
            features = pooled_at(cfg, model, subset, size, accelerator, workers)
        fits[size] = fit_gev(features, per_feature=cfg.parametric_scope == "feature")
    adapter = FrechetAdapter(*fits[cfg.res], *fits[cfg.train_res])
    attach_adapter(model, adapter.to(accelerator.device))
    return {"adaptation": {"kind": "frechet", "xi": XI, "scope": cfg.parametric_scope,
                           "module": ADAPTER,  # pooled_features: a row per image and classifier
                           "fit_images": len(features) // len(classifier_names(model))}}
