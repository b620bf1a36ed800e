"""The paired difference in top-1 and its bootstrap interval (fixres/stats.py)."""
import math

import pytest
import torch

from fixres.stats import paired_difference, paired_difference_of


def binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def test_all_disagreements_one_way_give_binomial_quantiles():
    """12 images of 120 right only in the first evaluation, none only in the second: each
    resampled difference is B / 120 with B ~ Binomial(120, 0.1), whose 2.5% quantile is 6
    and 97.5% quantile 19, both well clear of the boundaries 10,000 draws could blur."""
    assert binomial_cdf(5, 120, 0.1) < 0.02 and binomial_cdf(6, 120, 0.1) > 0.035
    assert binomial_cdf(18, 120, 0.1) < 0.971 and binomial_cdf(19, 120, 0.1) > 0.98
    result = paired_difference(gained=12, lost=0, n=120)
    assert result == {"diff": 0.1, "low": 6 / 120, "high": 19 / 120, "gained": 12, "lost": 0, "n": 120}


@pytest.mark.parametrize("gained, lost, n, expected", [(0, 0, 50, 0.0), (50, 0, 50, 1.0), (0, 7, 7, -1.0)])
def test_no_doubt_when_every_image_agrees_or_every_one_moves(gained, lost, n, expected):
    result = paired_difference(gained, lost, n)
    assert result["diff"] == result["low"] == result["high"] == expected


def test_the_issue_cases_and_the_normal_approximation():
    clear = paired_difference(60, 20, 3000)
    assert 0 < clear["low"] < clear["diff"] < clear["high"]
    unclear = paired_difference(25, 20, 3000)
    assert unclear["low"] < 0 < unclear["high"]
    # many disagreements: close to McNemar's normal approximation, diff +- 1.96 x its standard error
    se = math.sqrt((60 + 20) / 3000 ** 2 - (60 - 20) ** 2 / 3000 ** 3)
    assert clear["low"] == pytest.approx(clear["diff"] - 1.96 * se, abs=5e-4)
    assert clear["high"] == pytest.approx(clear["diff"] + 1.96 * se, abs=5e-4)
    assert paired_difference(60, 20, 3000) == clear  # a fixed seed: the counts decide


def test_from_per_image_correctness():
    correct = torch.tensor([True, True, False, True, False, True])
    reference = torch.tensor([True, False, False, False, True, True])
    assert paired_difference_of(correct, reference) == paired_difference(2, 1, 6)
    assert paired_difference_of(correct.numpy(), reference.numpy()) == paired_difference(2, 1, 6)
    with pytest.raises(ValueError, match="not the same images"):
        paired_difference_of(correct, reference[:5])


@pytest.mark.parametrize("gained, lost, n", [(-1, 0, 10), (6, 5, 10), (0, 0, 0)])
def test_impossible_counts_are_refused(gained, lost, n):
    with pytest.raises(ValueError):
        paired_difference(gained, lost, n)
