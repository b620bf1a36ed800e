"""How sure a difference in top-1 is: two evaluations of the same images, paired.

    from fixres.stats import paired_difference, paired_difference_of
    paired_difference(gained=60, lost=20, n=3000)   # diff 0.0133, 95% interval about [0.0076, 0.0190]
    paired_difference_of(correct_at_80px, correct_at_64px)   # the same from per-image correctness
    add_differences(sweep_rows, train_res=64)                # each row against the 64 px row
    add_differences(sweep_rows, 64, crop_pct=0.875)          # a crop_pct sweep: against (64 px, 0.875)
    best_of(rows)                                            # the one rule for "best"

Two evaluations of the same n images (one model at two test sizes, or before and after
fine-tuning) differ only where exactly one of them is right: `gained` images are right
only in the first, `lost` only in the second, and the difference in top-1 is
(gained - lost) / n. Pairing is what makes small differences measurable: the images both
get right or both get wrong add nothing to the noise.

The 95% interval is a paired bootstrap over the images: draw n images with replacement,
10,000 times, and take the 2.5th and 97.5th percentiles of the drawn difference. Each image
contributes +1, -1 or 0, so drawing images is exactly one multinomial draw of the counts
(gained, lost, rest) with probabilities (gained, lost, rest) / n: cheap whatever n is. The
seed is fixed, so the interval is a function of (gained, lost, n) alone: the same on every
process, in every run. An interval that excludes 0 says that the difference is larger than
the luck of which images the validation split happens to hold; it says nothing about the
spread between training runs (another seed trains another model).
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
METHOD = f"{LEVEL:.0%} interval: paired bootstrap over the images ({RESAMPLES} resamples, seed {SEED}), percentiles"


def paired_difference(gained: int, lost: int, n: int, *, resamples: int = RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> dict:
    """{"diff", "low", "high", "gained", "lost", "n"}: the difference in top-1 (a fraction)
    and its bootstrap interval, from the counts of images right in only one evaluation."""
    if not (n > 0 and gained >= 0 and lost >= 0 and gained + lost <= n):
        raise ValueError(f"need 0 <= gained, lost and gained + lost <= n > 0, got {gained}, {lost}, {n}")
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [gained / n, lost / n, (n - gained - lost) / n], size=resamples)
    tail = (1 - level) / 2
    low, high = np.quantile((draws[:, 0] - draws[:, 1]) / n, [tail, 1 - tail])
    return {"diff": (gained - lost) / n, "low": float(low), "high": float(high), "gained": gained, "lost": lost,
            "n": n}


def paired_difference_of(correct, reference) -> dict:
    """paired_difference of two boolean per-image vectors (tensors or arrays) over the same images."""
    if len(correct) != len(reference):
        raise ValueError(f"not the same images: {len(correct)} against {len(reference)}")
    return paired_difference(int((correct & ~reference).sum()), int((reference & ~correct).sum()), len(correct))


def add_differences(rows: list[dict], train_res: int, crop_pct: float | None = None) -> list[dict]:
    """Give every row its paired difference in top-1 against the training size's row (the
    same images): diff_vs_train with its 95% interval diff_low..diff_high, and the counts
    behind it, gained / lost (images right only at this size / only at the training size).
    `crop_pct`: with rows at several crop ratios (a crop_pct sweep), the reference row's."""
    reference = next(r for r in rows if r["size"] == train_res
                     and (crop_pct is None or r["crop_pct"] == crop_pct))["per_image_correct"]
    for r in rows:
        d = paired_difference_of(r["per_image_correct"], reference)
        r.update(diff_vs_train=d["diff"], diff_low=d["low"], diff_high=d["high"], gained=d["gained"], lost=d["lost"])
    return rows


def best_of(items: list[dict], *, top1: str = "top1", loss: str = "loss") -> dict:
    """The one rule for "best" wherever fixres chooses (a test size, an epoch, a benchmark's
    reference): the highest top-1; among equal top-1, the lowest loss, which still orders
    models that get every image right; among exact equals, the first (the smaller size, then
    the smaller crop_pct, in a sweep's rows; the earlier epoch)."""
    return max(items, key=lambda item: (item[top1], -item[loss]))
