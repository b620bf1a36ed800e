"""--decode gpu on this CPU (the same code, device="cpu", TorchCodec's libjpeg-turbo decoder)
against the Pillow path: the same crop boxes and pixels within 1 level of 255, the
per-image fallbacks, the sweep's accuracy through both paths, train.py end to end. Tests
that decode skip where torchcodec is not installed.

    python -m pytest -q tests/test_device_decode.py      # about a minute on 2 CPU cores
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from conftest import TINY_TRAIN, run_in_process
from fixres import device_decode
from fixres.config import ConfigError, FinetuneConfig, TrainConfig
from fixres.data import load_split
from fixres.layers import build_parser
from fixres.device_decode import (CropSpec, DeviceBatch, ReadForDevice, ResizeSpec, decode_on_device,
                                  resolve_decode, torchcodec_decode_jpeg)
from fixres.images import BadImageError, open_image
from fixres.loaders import ImageDataset, collate_skipping
from fixres.sweep import run_sweep
from fixres.preprocessing import create_transform
from fixres.trained_model import load_run_model
from fixres.transforms import IMAGENET_STD, DecodeRandomResizedCrop, eval_transform, normalize_batch
from test_speed import photo

needs_torchcodec = pytest.mark.skipif(torchcodec_decode_jpeg() is None, reason="torchcodec is not installed")
CPU = torch.device("cpu")
STD_LEVELS = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255  # normalised differences back to levels of 255


def batch_of(dataset, keys):
    return collate_skipping([dataset[k] for k in keys])


def cli_choices(option: str) -> tuple:
    """Every value train.py and finetune.py accept for `option`, read from their parsers."""
    return tuple(dict.fromkeys(choice for cls in (TrainConfig, FinetuneConfig)
                               for choice in build_parser(cls, "")._option_string_actions[option].choices))


INTERPOLATIONS = cli_choices("--interpolation")
# Pillow against torch on noise, (largest, mean) difference in levels of 255: the same pixels
# picked (nearest), or kernels a little apart (Pillow's bicubic a = -0.5 overshoots less than
# torch's -0.75 next to a sharp edge). Picking the neighbouring pixels costs a mean of 30+.
TOLERANCE = {"nearest": (0, 0.0), "bilinear": (1, 0.3), "bicubic": (24, 0.5)}


def assert_close_to_pillow(images: torch.Tensor, pillow: torch.Tensor, interpolation: str, where) -> None:
    diff = levels(images, pillow).float()
    largest, mean = TOLERANCE[interpolation]
    assert diff.max() <= largest and diff.mean() <= mean, (where, diff.max().item(), diff.mean().item())


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Absolute differences in levels of 255."""
    return (a.int() - b.int()).abs()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("photos")
    return [str(photo(root / f"{i}.jpg", seed=i)) for i in range(8)]


# ---- choosing the decoder -------------------------------------------------------------------

@pytest.fixture
def fresh_probe():
    """decode_problem's cache emptied before and after (it would keep the fakes' answers)."""
    device_decode.decode_problem.cache_clear()
    yield
    device_decode.decode_problem.cache_clear()


def test_auto_decodes_on_cuda_only_where_torchcodec_decodes_there(fresh_probe, monkeypatch):
    cuda = torch.device("cuda")
    assert resolve_decode("cpu", cuda) == "cpu" and resolve_decode("auto", CPU) == "cpu"
    monkeypatch.setattr(device_decode, "torchcodec_decode_jpeg", lambda: None)
    assert resolve_decode("auto", cuda) == "cpu"
    with pytest.raises(ConfigError, match="--decode gpu needs torchcodec.*pip install torchcodec"):
        resolve_decode("gpu", CPU)

    def cpu_only_build(source, mode, device):  # a torchcodec without CUDA support
        if str(device) != "cpu":
            raise RuntimeError("CUDA support is not available in this build")
        return torch.zeros(3, 6, 8, dtype=torch.uint8)
    monkeypatch.setattr(device_decode, "torchcodec_decode_jpeg", lambda: cpu_only_build)
    device_decode.decode_problem.cache_clear()
    assert resolve_decode("auto", cuda) == "cpu" and resolve_decode("gpu", CPU) == "gpu"
    with pytest.raises(ConfigError, match="--decode gpu cannot decode on cuda with this torchcodec .CUDA support"):
        resolve_decode("gpu", cuda)
    monkeypatch.setattr(device_decode, "decode_problem", lambda device: None)
    assert resolve_decode("auto", cuda) == "gpu"
    cfg = TrainConfig(train_res=40, test_res=56)
    assert isinstance(create_transform(cfg, "train", device=cuda), ReadForDevice)
    assert create_transform(cfg, "eval", device=cuda).spec == ResizeSpec(((56, 0.875),), "bilinear")
    assert isinstance(create_transform(cfg, "train", device=CPU), DecodeRandomResizedCrop)


@pytest.mark.parametrize("script", ["train.py", "sweep.py", "finetune.py"])
def test_decode_gpu_without_torchcodec_is_one_line(script, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(device_decode, "decode_problem", lambda device: "needs torchcodec, which is not installed: "
                        + device_decode.INSTALL_HINT)
    result = run_in_process(script, "--decode", "gpu", "--cpu", "--output", tmp_path / "nothing", capsys=capsys)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, err
    assert err[0].startswith("error: --decode gpu needs torchcodec") and "pip install torchcodec" in err[0]
    assert not (tmp_path / "nothing").exists()  # refused before any work


# ---- the same boxes, the same pixels --------------------------------------------------------

@needs_torchcodec
def test_training_crops_are_the_cpu_paths_boxes_within_one_level(photos):
    samples = [(p, i) for i, p in enumerate(photos)]
    on_device = ImageDataset(samples, ReadForDevice(CropSpec(64), min_scale=0.08), seed=5)
    full_decode = ImageDataset(samples, DecodeRandomResizedCrop(size=64, draft=False), seed=5)
    reduced = ImageDataset(samples, DecodeRandomResizedCrop(size=64), seed=5)
    for epoch in (0, 1):
        keys = [(epoch, i) for i in range(len(samples))]
        batch, labels, skipped = batch_of(on_device, keys)
        assert isinstance(batch, DeviceBatch) and batch.blob.numel() == sum(Path(p).stat().st_size for p in photos)
        images, labels, skipped = decode_on_device(batch, labels, skipped, CPU)
        assert images.shape == (8, 3, 64, 64) and images.dtype == torch.uint8 and skipped == 0
        assert labels.tolist() == list(range(8)) and any(batch.flips) and not all(batch.flips)
        # the same seeded draws: same box, same flip; the device resizes in float and rounds once
        expected = batch_of(full_decode, keys)[0]
        assert levels(images, expected).max() <= 1
        # train.py's CPU default decodes large boxes at reduced scale: close, not equal
        assert levels(images, batch_of(reduced, keys)[0]).float().mean() < 4.0


@pytest.fixture(scope="module")
def noise_pngs(tmp_path_factory) -> list[str]:
    """Noise (every pixel unlike its neighbours, so a resize that picks other pixels shows) as
    PNGs: the device path takes them as pixels decoded in the worker, so no torchcodec is needed."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(3)
    paths = []
    for i, (width, height) in enumerate([(61, 45), (97, 70), (50, 88)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return paths


def test_every_interpolation_choice_is_known_to_both_paths():
    assert set(INTERPOLATIONS) == set(TOLERANCE) and "nearest" in INTERPOLATIONS


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_device_evaluation_resize_is_pillows_for_every_interpolation(noise_pngs, interpolation):
    sizes = (24, 40, 96)  # down, about the same, up
    samples = [(p, 0) for p in noise_pngs]
    spec = ResizeSpec(tuple((s, 0.8) for s in sizes), interpolation)
    batch, _, _ = batch_of(ImageDataset(samples, ReadForDevice(spec)), range(3))
    assert sorted(batch.pixels) == [0, 1, 2]  # decoded in the worker: only the resize runs on the device
    outputs, _ = batch.decode(CPU)
    for size, images in zip(sizes, outputs):
        expected = torch.stack([eval_transform(size=size, crop_pct=0.8, interpolation=interpolation, normalize=False)(
            open_image(p)) for p in noise_pngs])
        assert_close_to_pillow(images, expected, interpolation, size)


def test_device_evaluation_of_size_and_crop_pct_pairs_from_one_decode(noise_pngs):
    """A crop_pct sweep's ResizeSpec: every (size, crop_pct) pair from one decode is what that
    pair alone gives on the device, pixel for pixel, and Pillow's within the tolerance."""
    pairs = [(24, 0.8), (24, 1.0), (40, 0.875), (40, 1.0)]
    sizes, crops = zip(*pairs)
    samples = [(p, 0) for p in noise_pngs]
    batch, _, _ = batch_of(ImageDataset(samples, ReadForDevice(ResizeSpec(tuple(zip(sizes, crops))))), range(3))
    outputs, _ = batch.decode(CPU)
    assert len(outputs) == len(pairs)
    for (size, crop_pct), images in zip(pairs, outputs):
        alone, _, _ = batch_of(ImageDataset(samples, ReadForDevice(ResizeSpec(((size, crop_pct),)))), range(3))
        assert torch.equal(images, alone.decode(CPU)[0][0]), (size, crop_pct)
        expected = torch.stack([eval_transform(size=size, crop_pct=crop_pct, normalize=False)(open_image(p))
                                for p in noise_pngs])
        assert_close_to_pillow(images, expected, "bilinear", (size, crop_pct))


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_device_training_crop_is_pillows_for_every_interpolation(noise_pngs, interpolation):
    """The device's crops, and the CPU path's (DecodeRandomResizedCrop), against Pillow's own
    crop + resize + flip of the same boxes."""
    samples = [(p, i) for i, p in enumerate(noise_pngs)]
    keys = [(0, i) for i in range(3)]
    for size in (32, 128):
        batch, labels, skipped = batch_of(ImageDataset(samples, ReadForDevice(CropSpec(size, interpolation)), seed=2),
                                          keys)
        images, _, _ = decode_on_device(batch, labels, skipped, CPU)
        cpu_path = batch_of(ImageDataset(samples, DecodeRandomResizedCrop(size=size, interpolation=interpolation),
                                         seed=2), keys)[0]
        for i, path in enumerate(noise_pngs):
            top, left, height, width = batch.boxes[i]
            crop = Image.open(path).crop((left, top, left + width, top + height))
            crop = crop.resize((size, size), getattr(Image.Resampling, interpolation.upper()))
            if batch.flips[i]:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pillow = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)
            assert_close_to_pillow(images[i], pillow, interpolation, ("device", size, i))
            assert_close_to_pillow(cpu_path[i], pillow, interpolation, ("cpu", size, i))


@needs_torchcodec
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_evaluation_sizes_from_one_decode_match_pillow(photos, interpolation):
    sizes = (48, 80)
    samples = [(p, 0) for p in photos]
    spec = ResizeSpec(tuple((s, 0.875) for s in sizes), interpolation)
    batch, _, _ = batch_of(ImageDataset(samples, ReadForDevice(spec)), range(len(samples)))
    outputs, kept = batch.decode(CPU)
    assert kept == list(range(len(samples)))
    for size, images in zip(sizes, outputs):
        # Pillow's antialiased resize against torch's: within about one level of 255
        expected = torch.stack([eval_transform(size=size, interpolation=interpolation)(open_image(p)) for p in photos])
        assert images.shape == expected.shape == (len(photos), 3, size, size)
        diff = (normalize_batch(images) - expected).abs() * STD_LEVELS
        # Pillow's bicubic kernel (a = -0.5) is not torch's (a = -0.75): a little further apart;
        # nearest picks the same pixels, decoded within a level
        largest = 3.0 if interpolation == "bicubic" else 1.5
        assert diff.max() < largest and diff.mean() < 0.3, (diff.max(), diff.mean())


# ---- per-image fallbacks --------------------------------------------------------------------

@needs_torchcodec
def test_files_the_device_cannot_take_are_decoded_in_the_worker(photos, tmp_path):
    base = Image.open(photos[0])
    png, cmyk, rotated = tmp_path / "a.png", tmp_path / "cmyk.jpg", tmp_path / "rotated.jpg"
    base.save(png)
    base.convert("CMYK").save(cmyk, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(rotated, quality=95, exif=exif.tobytes())
    paths = [photos[1], str(png), str(cmyk), str(rotated)]
    samples = [(p, i) for i, p in enumerate(paths)]
    batch, labels, _ = batch_of(ImageDataset(samples, ReadForDevice(CropSpec(40)), seed=0), range(4))
    assert sorted(batch.pixels) == [1, 2, 3]  # only the plain JPEG travels as bytes
    assert batch.sizes[3] == (375, 500)       # upright: the crop box is drawn on the rotated image
    images, _, _ = decode_on_device(batch, labels, 0, CPU)
    expected = batch_of(ImageDataset(samples, DecodeRandomResizedCrop(size=40, draft=False), seed=0), range(4))[0]
    assert levels(images, expected).max() <= 1


@needs_torchcodec
def test_a_batch_the_decoder_refuses_is_decoded_image_by_image(photos, monkeypatch):
    real = torchcodec_decode_jpeg()
    calls = []

    def refuses_batches(source, **kw):
        calls.append(type(source))
        if isinstance(source, list):
            raise RuntimeError("simulated nvJPEG batch failure")
        return real(source, **kw)
    monkeypatch.setattr(device_decode, "torchcodec_decode_jpeg", lambda: refuses_batches)
    samples = [(p, 0) for p in photos[:3]]
    batch, _, _ = batch_of(ImageDataset(samples, ReadForDevice(ResizeSpec(((32, 0.875),)))), range(3))
    [images], kept = batch.decode(CPU)
    assert calls == [list, torch.Tensor, torch.Tensor, torch.Tensor] and kept == [0, 1, 2]
    expected = torch.stack([eval_transform(size=32)(open_image(p)) for p, _ in samples])
    assert ((normalize_batch(images) - expected).abs() * STD_LEVELS).max() < 1.5


@needs_torchcodec
def test_a_corrupt_jpeg_stops_or_is_skipped_and_counted(photos, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    data = Path(photos[0]).read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])  # the header reads; the pixels stop halfway
    samples = [(photos[1], 7), (str(corrupt), 8), (photos[2], 9)]
    batch, labels, skipped = batch_of(ImageDataset(samples, ReadForDevice(CropSpec(32))), range(3))
    assert batch.pixels == {} and skipped == 0  # the worker passed it on: only decoding finds out
    with pytest.raises(BadImageError, match=f"cannot decode image {corrupt}"):
        decode_on_device(batch, labels, skipped, CPU)
    batch, labels, skipped = batch_of(ImageDataset(samples, ReadForDevice(CropSpec(32), skip_bad=True)), range(3))
    images, labels, skipped = decode_on_device(batch, labels, skipped, CPU)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [7, 9] and skipped == 1


# ---- end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_decoded_run(tiny_csv, tmp_path_factory):
    """train.py --decode gpu on the CPU, 2 epochs with 2 loader workers that stay."""
    out = tmp_path_factory.mktemp("runs")
    result = run_in_process("train.py", "--data", tiny_csv, *TINY_TRAIN, "--workers", "2", "--decode", "gpu", "--cpu",
                            "--epochs", "2", "--output", out, "--name", "gpu")
    return result, out / "gpu"


@pytest.mark.slow
@needs_torchcodec
def test_train_py_decodes_on_the_device_and_reports_the_data_wait(gpu_decoded_run):
    result, run = gpu_decoded_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "decoding on" in result.stdout
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("data wait " in line for line in epoch_lines)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["data_wait_frac"] <= 1.0 for r in records)
    assert records[-1]["val_acc"] > 0.5 and json.loads((run / "config.json").read_text())["decode"] == "gpu"


@pytest.mark.slow
@needs_torchcodec
def test_the_sweep_gives_the_same_accuracy_through_both_decoders(gpu_decoded_run, tiny_csv):
    _, run = gpu_decoded_run
    model, meta = load_run_model(run, "best")
    split = load_split(tiny_csv)
    accelerator = Accelerator(cpu=True)
    rows = {decode: run_sweep(model, meta, split, [32, 48], 0.875, accelerator, batch_size=8, decode=decode)
            for decode in ("cpu", "gpu")}
    for cpu_row, gpu_row in zip(rows["cpu"], rows["gpu"]):
        # pixels within about a level: at most one of the 25 validation images may change its answer
        assert abs(cpu_row["correct"] - gpu_row["correct"]) <= 1, (cpu_row["size"], cpu_row["top1"], gpu_row["top1"])
        assert abs(cpu_row["loss"] - gpu_row["loss"]) < 0.02 and cpu_row["count"] == gpu_row["count"] == 25


@pytest.mark.slow
@needs_torchcodec
def test_finetune_py_decodes_on_the_device(gpu_decoded_run, tmp_path):
    """Its sweeps (before, after) and --aug rrc's training crops go through the device path."""
    _, run = gpu_decoded_run
    result = run_in_process("finetune.py", "--no-plots", "--checkpoint", run, "--res", "40", "--epochs", "1", "--aug", "rrc",
                            "--decode", "gpu", "--cpu", "--workers", "0", "--output", tmp_path, "--name", "ft")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert summary["val_images"] == 13 and 0 <= summary["top1"]["after"] <= 1  # 25 less 12 held out
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["decode"] == "gpu"
