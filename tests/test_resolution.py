import re

import numpy as np
import pytest
import torch

from fixres.resolution import (apparent_size_ratio, expected_sigma, main, monte_carlo_ratio, recommended_test_res,
                               resize_size, training_res_for)


def test_expected_sigma_closed_form():
    assert expected_sigma((0.08, 1.0)) == pytest.approx(0.7082, abs=1e-4)
    assert expected_sigma() == expected_sigma((0.08, 1.0))
    assert expected_sigma((0.25, 0.25)) == pytest.approx(0.5)  # degenerate interval -> sqrt(a)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.35, 1.0), (0.1, 0.5)])
def test_closed_form_matches_numeric_monte_carlo(scale):
    s = np.random.default_rng(0).uniform(scale[0], scale[1], size=200_000)
    assert expected_sigma(scale) == pytest.approx(np.sqrt(s).mean(), abs=0.005)


def test_apparent_size_ratio_default():
    assert apparent_size_ratio(train_res=224, test_res=224) == pytest.approx(0.809, abs=0.001)
    assert apparent_size_ratio(train_res=224, test_res=224, crop_pct=1.0) == pytest.approx(0.7082, abs=1e-4)


@pytest.mark.parametrize("train_res", [128, 160, 224, 384])
def test_recommended_test_res_equalises(train_res):
    rec = recommended_test_res(train_res=train_res)
    assert isinstance(rec, int)
    # rounding K_test moves K_image_test by <= 0.5/crop_pct and the floor in resize_size by < 1 more
    tol = expected_sigma() * (0.5 / 0.875 + 1) / train_res
    assert apparent_size_ratio(train_res=train_res, test_res=rec) == pytest.approx(1.0, abs=tol)
    if train_res == 224:
        assert 276 <= rec <= 280


def test_resize_size():
    assert resize_size(224, 0.875) == 256
    assert resize_size(384, 0.875) == 438
    assert resize_size(64, 0.8) == 80
    assert resize_size(224, 1.0) == 224


@pytest.mark.parametrize("crop_pct", [0.0, -0.5, 1.5, float("nan")])
def test_bad_crop_pct(crop_pct):
    with pytest.raises(ValueError, match="--crop-pct"):
        resize_size(224, crop_pct)
    with pytest.raises(ValueError, match="--crop-pct"):
        apparent_size_ratio(train_res=224, test_res=224, crop_pct=crop_pct)
    with pytest.raises(ValueError, match="--crop-pct"):
        recommended_test_res(train_res=224, crop_pct=crop_pct)


def test_bad_resolutions_and_scale():
    with pytest.raises(ValueError, match="--test-res"):
        resize_size(0, 0.875)
    with pytest.raises(ValueError, match="--train-res"):
        apparent_size_ratio(train_res=0, test_res=224)
    with pytest.raises(ValueError, match="--min-scale"):
        expected_sigma((0.0, 1.0))
    with pytest.raises(ValueError, match="--min-scale"):
        expected_sigma((0.9, 0.5))


@pytest.mark.parametrize("size,expected", [((500, 500), 0.76), ((500, 375), 0.84)])
def test_torchvision_monte_carlo(size, expected):
    w, h = size
    state = torch.random.get_rng_state()
    r = monte_carlo_ratio(train_res=224, test_res=224, width=w, height=h)
    assert r == pytest.approx(expected, abs=0.02)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    # seeded: reproducible
    assert monte_carlo_ratio(train_res=224, test_res=224, width=w, height=h, samples=2000, seed=3) == \
        monte_carlo_ratio(train_res=224, test_res=224, width=w, height=h, samples=2000, seed=3)


def test_cli_prints_ratio_and_recommendation(capsys):
    main(["--train-res", "224"])  # python -m fixres.resolution --train-res 224
    out = capsys.readouterr().out
    ratio = float(re.search(r"ratio \(test/train\).*:\s*([0-9.]+)", out).group(1))
    assert round(ratio, 2) == 0.81
    rec = int(re.search(r"recommended test res:\s*(\d+)", out).group(1))
    assert 276 <= rec <= 280
    assert "E[sigma] = 0.708" in out


def test_cli_bad_crop_pct(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--train-res", "224", "--crop-pct", "1.5"])
    assert exc.value.code == 2
    assert "--crop-pct must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_cli_monte_carlo(capsys):
    main(["--train-res", "224", "--monte-carlo", "500", "375", "--samples", "4000"])
    out = capsys.readouterr().out
    mc = float(re.search(r"Monte-Carlo ratio.*:\s*([0-9.]+)", out).group(1))
    assert mc == pytest.approx(0.84, abs=0.03)
    assert re.search(r"test res equalising under Monte-Carlo:\s*\d+", out)


@pytest.mark.parametrize("crop_pct", [0.7, 0.875, 0.95, 1.0])
@pytest.mark.parametrize("min_scale", [0.08, 0.35, 1.0])
def test_the_training_size_for_a_test_size_round_trips_with_the_forward_prediction(crop_pct, min_scale):
    """train -> the test size it predicts -> the training size for that test: within a pixel, at
    every training size from 16 to 1024 px."""
    scale = (min_scale, 1.0)
    for train_res in range(16, 1025):
        test_res = recommended_test_res(train_res=train_res, crop_pct=crop_pct, scale=scale)
        assert abs(training_res_for(test_res=test_res, crop_pct=crop_pct, scale=scale) - train_res) <= 1, train_res


def test_the_training_size_for_a_test_size_equalises_the_apparent_size():
    train_res = training_res_for(test_res=224)  # the paper's scale, crop_pct 0.875
    assert train_res == round(0.7082 * 256) == 181
    assert apparent_size_ratio(train_res=train_res, test_res=224) == pytest.approx(1.0, abs=0.5 / train_res)


def test_cli_prints_the_training_size_for_a_test_size(capsys):
    main(["--test-res", "224"])  # python -m fixres.resolution --test-res 224
    out = capsys.readouterr().out
    assert re.search(r"training res whose objects look as large: 181 \(nearest multiple of 8: 184\); "
                     r"its recommended test res: 224", out)
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "python -m fixres.resolution: error: give --train-res (the test size for it), --test-res (the training size "
        "for it), or both")
    with pytest.raises(SystemExit):  # the Monte-Carlo ratio is of a training size's crops: not ignored
        main(["--test-res", "224", "--monte-carlo", "500", "375"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "python -m fixres.resolution: error: --monte-carlo samples the crops of a training size: give --train-res too")
