"""FixRes "apparent object size" model (Touvron, Vedaldi, Douze, Jegou 2019).

Training uses RandomResizedCrop (area fraction s ~ U[a, b], linear scale
sigma = sqrt(s)) resized to K_train; testing uses Resize(K_image_test) +
CenterCrop(K_test) with K_image_test = int(K_test / crop_pct).  An object's
apparent size at test relative to training is sigma * K_image_test / K_train,
and FixRes tests at the resolution that brings E[sigma] * K_image_test / K_train
to 1 (about 1.25 x K_train).

    python -m fixres.resolution --train-res 224
        E[sigma] = 0.7082, the apparent size ratio at --test-res (default: the
        train res) = 0.809, and the recommended test res (277 for 224).
    python -m fixres.resolution --test-res 224
        the inverse, for a test size fixed by deployment: the training size whose
        objects look as large as a test at 224 shows them (181).
    python -m fixres.resolution --train-res 224 --monte-carlo 500 375
        also the ratio from sampling torchvision's own RRC on a 500x375 image
        (0.840) and the test res that equalises under it (267).
Other options: --test-res N, --crop-pct 0.875, --min-scale 0.08, --samples, --seed.
"""
from __future__ import annotations

import argparse
import math

from fixres.options import MAX_SIZE


def _check_scale(scale) -> tuple[float, float]:
    a, b = float(scale[0]), float(scale[1])
    if not (0 < a <= b <= 1):
        raise ValueError(f"--min-scale must satisfy 0 < min-scale <= max-scale <= 1, got scale=({a}, {b})")
    return a, b


def _check_positive(name: str, value) -> None:
    if not value > 0:
        raise ValueError(f"--{name} must be a positive integer, got {value}")


def resize_size(test_res: int, crop_pct: float) -> int:
    """Shorter side before the centre crop: floor(test_res / crop_pct), as timm and FixRes do."""
    _check_positive("test-res", test_res)
    if not (0 < crop_pct <= 1):
        raise ValueError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    return int(test_res / crop_pct)


def expected_sigma(scale: tuple[float, float] = (0.08, 1.0)) -> float:
    """E[sqrt(s)] for s ~ U[a, b]: (2/3)(b^1.5 - a^1.5)/(b - a); 0.7082 for (0.08, 1)."""
    a, b = _check_scale(scale)
    if a == b:
        return math.sqrt(a)
    return (2.0 / 3.0) * (b**1.5 - a**1.5) / (b - a)


def apparent_size_ratio(*, train_res: int, test_res: int, crop_pct: float = 0.875, scale=(0.08, 1.0)) -> float:
    """Closed form E[sigma] * K_image_test / K_train (0.809 for train = test = 224)."""
    _check_positive("train-res", train_res)
    return expected_sigma(scale) * resize_size(test_res, crop_pct) / train_res


def _equalising_test_res(image_res: float, crop_pct: float) -> int:
    """Nearest integer K_test whose pre-crop size is `image_res` (K_test = crop_pct * K_image_test)."""
    return int(round(crop_pct * image_res))


def recommended_test_res(*, train_res: int, crop_pct: float = 0.875, scale=(0.08, 1.0)) -> int:
    """Test res making the expected apparent size ratio 1: round(crop_pct * K_train / E[sigma]) (277 for 224)."""
    _check_positive("train-res", train_res)
    resize_size(train_res, crop_pct)  # validates crop_pct
    return _equalising_test_res(train_res / expected_sigma(scale), crop_pct)


def training_res_for(*, test_res: int, crop_pct: float = 0.875, scale=(0.08, 1.0)) -> int:
    """The inverse of recommended_test_res: the RandomResizedCrop size whose objects look as large
    as a test at `test_res` shows them, round(E[sigma] * K_image_test) (181 for a 224 test at
    crop_pct 0.875, the paper's scale; torchvision's ResNet-50 V2 recipe found 176 by grid
    search). recommended_test_res of it gives `test_res` back within a pixel."""
    return max(1, round(expected_sigma(scale) * resize_size(test_res, crop_pct)))


def monte_carlo_ratio(*, train_res: int, test_res: int, width: int, height: int, crop_pct: float = 0.875,
                      scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), samples: int = 20000, seed: int = 0) -> float:
    """Apparent size ratio from sampling torchvision's RandomResizedCrop.get_params on a W x H image.

    Per sampled crop (h, w): train magnification m_train = K_train / sqrt(h*w) (geometric mean of the
    two axis scalings), test magnification m_test = K_image_test / min(W, H).  Returned value is the
    mean over crops of m_test / m_train = K_image_test * mean(sqrt(h*w)) / (K_train * min(W, H)),
    i.e. the closed form with E[sigma] replaced by the sampled mean of sqrt(h*w) / min(W, H).  It gives
    ~0.76 (500x500) and ~0.84 (500x375) for 224/224 at crop_pct 0.875, vs 0.809 closed form: get_params
    rejects large off-aspect crops (biasing s down, centre-crop fallback after 10 tries), while on
    non-square images the test Resize scales the shorter side, so crops are measured against min(W, H).
    (m_test / mean(m_train) would instead give ~0.70 / ~0.77.)  Seeded; the global RNG is left untouched.
    """
    for name, value in (("train-res", train_res), ("monte-carlo W", width), ("monte-carlo H", height),
                        ("samples", samples)):
        _check_positive(name, value)
    image_res = resize_size(test_res, crop_pct)
    a, b = _check_scale(scale)
    import torch  # lazy: the closed-form CLI path does not need torch/torchvision
    from torchvision.transforms import RandomResizedCrop

    img = torch.zeros(1, 1, 1).expand(1, height, width)  # get_params only reads the size
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(samples):
            _, _, h, w = RandomResizedCrop.get_params(img, [a, b], list(ratio))
            total += math.sqrt(h * w)
    return image_res * (total / samples) / (train_res * min(width, height))


def default_sizes(train_res: int, predicted: int) -> list[int]:
    """About 0.5x..2x the training res in multiples of 8, in steps of 1/8 between 0.75x and
    1.5x where the best size is expected (a coarser ladder can step over the peak), plus the
    training res and the prediction exactly (a ladder step within 4 px of either is dropped)."""
    factors = (0.5, 0.75, 0.875, 1.0, 1.125, 1.25, 1.375, 1.5, 1.75, 2.0)
    ladder = {8 * max(1, round(f * train_res / 8)) for f in factors}
    ladder = {s for s in ladder if min(abs(s - train_res), abs(s - predicted)) > 4}
    return sorted(s for s in ladder | {train_res, predicted} if s <= MAX_SIZE)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fixres.resolution", description=__doc__.splitlines()[0])
    p.add_argument("--train-res", type=int, default=None, help="RandomResizedCrop output size K_train")
    p.add_argument("--test-res", type=int, default=None,
                   help="centre-crop size K_test (default: train res); alone: the training size for it")
    p.add_argument("--crop-pct", type=float, default=0.875, help="K_test / K_image_test (default 0.875)")
    p.add_argument("--min-scale", type=float, default=0.08, help="lower RRC area fraction (default 0.08)")
    p.add_argument("--monte-carlo", type=int, nargs=2, metavar=("W", "H"), help="also sample torchvision RRC")
    p.add_argument("--samples", type=int, default=20000, help="Monte-Carlo samples (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="Monte-Carlo seed (default 0)")
    args = p.parse_args(argv)
    scale = (args.min_scale, 1.0)
    if args.train_res is None:  # a test size fixed by deployment: what to train at
        if args.test_res is None:
            p.error("give --train-res (the test size for it), --test-res (the training size for it), or both")
        if args.monte_carlo:
            p.error("--monte-carlo samples the crops of a training size: give --train-res too")
        try:
            train_res = training_res_for(test_res=args.test_res, crop_pct=args.crop_pct, scale=scale)
        except ValueError as e:
            p.error(str(e))
        print(f"test res {args.test_res} (resize {resize_size(args.test_res, args.crop_pct)}, crop_pct "
              f"{args.crop_pct}), RRC scale {scale}, E[sigma] = {expected_sigma(scale):.4f}")
        back = recommended_test_res(train_res=train_res, crop_pct=args.crop_pct, scale=scale)
        print(f"training res whose objects look as large: {train_res} (nearest multiple of 8: "
              f"{8 * max(1, round(train_res / 8))}); its recommended test res: {back}")
        return
    test_res = args.train_res if args.test_res is None else args.test_res
    try:
        _check_positive("train-res", args.train_res)
        sig = expected_sigma(scale)
        r = apparent_size_ratio(train_res=args.train_res, test_res=test_res, crop_pct=args.crop_pct, scale=scale)
        rec = recommended_test_res(train_res=args.train_res, crop_pct=args.crop_pct, scale=scale)
        mc = None
        if args.monte_carlo:
            w, h = args.monte_carlo
            mc = monte_carlo_ratio(train_res=args.train_res, test_res=test_res, width=w, height=h,
                                   crop_pct=args.crop_pct, scale=scale, samples=args.samples, seed=args.seed)
    except ValueError as e:
        p.error(str(e))
    image_res = resize_size(test_res, args.crop_pct)
    print(f"train res {args.train_res}, RRC scale {scale}, crop_pct {args.crop_pct}")
    print(f"E[sigma] = {sig:.4f}")
    print(f"apparent size ratio (test/train) at test res {test_res} (resize {image_res}): {r:.3f}")
    print(f"recommended test res: {rec} (resize {resize_size(rec, args.crop_pct)}; "
          f"nearest multiple of 8: {8 * round(rec / 8)})")
    if mc is not None:
        eq = _equalising_test_res(image_res / mc, args.crop_pct)
        print(f"Monte-Carlo ratio ({w}x{h}, torchvision RRC, {args.samples} samples): {mc:.3f}")
        print(f"test res equalising under Monte-Carlo: {eq}")


if __name__ == "__main__":
    main()
