"""The fast paths against the plain ones: the reduced-scale decode, uint8 cropping with
normalisation on the device, channels_last, torch.compile and --batch-size auto; and the
data-wait share that tells a user the loader is what limits them.
No timings here; benchmarks/speed/speed.py measures the speed."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import timm
import torch
from accelerate import Accelerator
from PIL import Image

from conftest import ROOT, TINY_TRAIN, error_line, make_csv_dataset, run_file_in_process, run_in_process
from fixres import transforms
from fixres.engine import TrainStep, train_one_epoch
from fixres.images import BadImageError, open_image
from fixres.loaders import ImageDataset
from fixres.optim import largest_batch
from fixres.transforms import DecodeRandomResizedCrop, normalize_batch, sample_crop


def photo(path, size=(500, 375), seed=0, exif_orientation=None):
    """A smooth, photo-like JPEG (gradients and a few discs) so that a downscaled decode
    can be compared with a full one pixel by pixel."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 80)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    pil = Image.fromarray(img.clip(0, 255).astype("uint8"))
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    pil.save(path, quality=90, exif=exif.tobytes())
    return path


def decoded_sizes(monkeypatch):
    """Record the size of every image fixres.transforms decodes."""
    sizes = []

    def recording_open(path, draft_size=None):
        img = open_image(path, draft_size)
        sizes.append(img.size)
        return img
    monkeypatch.setattr(transforms, "open_image", recording_open)
    return sizes


def crops(decoder, path, seeds):
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(decoder(str(path)))
    return out


def test_draft_decode_has_the_requested_size_and_close_pixels(tmp_path, monkeypatch):
    path = photo(tmp_path / "a.jpg")
    sizes = decoded_sizes(monkeypatch)
    fast = crops(DecodeRandomResizedCrop(size=64, min_scale=0.25, hflip=False), path, range(20))
    full = crops(DecodeRandomResizedCrop(size=64, min_scale=0.25, hflip=False, draft=False), path, range(20))
    drafted = [s for s in sizes[:20] if s != (500, 375)]
    assert len(drafted) >= 10, "a 64 px target from a 500x375 photo: most crops decode at reduced scale"
    assert all(s[0] < 500 for s in drafted) and sizes[20:] == [(500, 375)] * 20
    for a, b in zip(fast, full):
        assert a.shape == b.shape == (3, 64, 64) and a.dtype == torch.uint8
        # same crop box, decoded smaller by libjpeg's DCT scaling: within a few levels of 255
        assert (a.float() - b.float()).abs().mean() < 4.0


def test_fast_decode_matches_torchvision_crop_of_the_full_decode(tmp_path):
    """draft=False is exactly 'crop, then antialiased resize' of the full decode."""
    path = photo(tmp_path / "a.jpg")
    torch.manual_seed(3)
    ours = DecodeRandomResizedCrop(size=48, hflip=False, draft=False)(str(path))
    torch.manual_seed(3)
    top, left, h, w = sample_crop(375, 500, (0.08, 1.0), (3 / 4, 4 / 3))
    from torchvision.transforms.v2 import functional as F
    expected = F.resized_crop(F.pil_to_tensor(open_image(str(path))), top, left, h, w, [48, 48], antialias=True)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("size, seed", [((500, 375), 766), ((500, 333), 232), ((375, 500), 345)])
def test_reduced_scale_box_stays_inside_the_decoded_image(tmp_path, size, seed):
    """Draws (about 1 in 2,000 at 64 px) whose box, scaled to the 1/4 decode, used to round one
    pixel past its right or bottom edge, where Pillow's crop pads with black."""
    colour = (200, 150, 100)
    path = tmp_path / "flat.jpg"
    Image.new("RGB", size, colour).save(path, quality=95)
    decoder = DecodeRandomResizedCrop(size=64, hflip=False)
    torch.manual_seed(seed)
    img, (left, top, right, bottom) = decoder.decode(str(path))
    assert img.width < size[0]  # decoded at reduced scale
    assert 0 <= left < right <= img.width and 0 <= top < bottom <= img.height
    torch.manual_seed(seed)
    out = decoder(str(path)).float()
    worst = (out - torch.tensor(colour, dtype=torch.float32)[:, None, None]).abs().amax(dim=(0, 1))
    assert worst.max() < 8, f"off the flat colour by up to {worst.tolist()} per column"


def test_sample_crop_stays_inside_and_covers_the_scale_range():
    torch.manual_seed(0)
    areas = []
    for _ in range(400):
        top, left, h, w = sample_crop(375, 500, (0.25, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        areas.append(h * w / (375 * 500))
    assert min(areas) < 0.3 and max(areas) > 0.9


def test_exif_rotated_photo_is_cropped_upright(tmp_path):
    """Orientation 6 (rotate 90): the crop is drawn on the upright image, as open_image returns it."""
    upright = photo(tmp_path / "upright.jpg", size=(375, 500), seed=1)
    rotated_pixels = Image.open(upright).transpose(Image.ROTATE_90)  # stored sideways ...
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                                                  # ... and tagged to be turned back
    rotated_pixels.save(rotated, quality=95, exif=exif.tobytes())
    decoder = DecodeRandomResizedCrop(size=64, min_scale=1.0, ratio=(0.75, 0.75), hflip=False)
    a, b = crops(decoder, upright, [0])[0], crops(decoder, rotated, [0])[0]
    assert (a.float() - b.float()).abs().mean() < 4.0


def test_normalize_batch_equals_per_image_normalisation():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    # the per-image path: a decoded image to a tensor, then scaled and normalised with ImageNet's mean and std
    per_image = transforms.v2.Compose([transforms.v2.PILToTensor(), transforms.float_normalize()])
    expected = torch.stack([per_image(transforms.v2.functional.to_pil_image(img)) for img in x])
    assert torch.allclose(normalize_batch(x), expected, atol=1e-5)
    floats = torch.randn(2, 3, 4, 4)
    assert normalize_batch(floats) is floats


def test_bad_file_through_the_fast_decoder_names_it(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(BadImageError, match="bad.jpg"):
        DecodeRandomResizedCrop(size=32)(str(bad))
    dataset = ImageDataset([(str(bad), 0)], DecodeRandomResizedCrop(size=32), skip_bad=True, seed=0)
    assert dataset[0] is None


@pytest.mark.slow  # torch.compile: 4.5 s
def test_channels_last_and_compiled_models_give_the_same_logits():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        cl_model = timm.create_model("test_resnet", num_classes=5).eval()
        cl_model.load_state_dict(model.state_dict())
        cl_model = cl_model.to(memory_format=torch.channels_last)
        channels_last = cl_model(x.contiguous(memory_format=torch.channels_last))
        model.compile()
        compiled = model(x)
    assert torch.allclose(channels_last, reference, atol=1e-4, rtol=1e-4)
    assert torch.allclose(compiled, reference, atol=1e-4, rtol=1e-4)
    assert "_orig_mod" not in "".join(model.state_dict())  # checkpoints keep their key names


def test_largest_batch_halves_until_it_fits():
    def try_batch(b):
        if b > 300:
            raise torch.OutOfMemoryError("simulated")
        return b / 200  # fraction of memory used: 256 runs but leaves too little free
    batch, trials = largest_batch(try_batch, start=1024)
    assert batch == 128
    assert [b for b, _ in trials] == [1024, 512, 256, 128]
    assert trials[0][1] == "out of memory" and trials[2][1] == "peak 128% of memory"


@pytest.mark.slow
def test_batch_size_auto_and_fast_decode_train_on_cpu(tmp_path):
    out = tmp_path
    data = make_csv_dataset(out / "data", n_train=140)  # two batches of auto's 64 on a CPU
    result = run_in_process("train.py", "--data", data, *TINY_TRAIN, "--epochs", "1", "--cpu", "--output", out,
                            "--batch-size", "auto", "--fast-decode", "--name", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--batch-size auto: 64 on cpu" in result.stdout
    assert json.loads((out / "auto" / "config.json").read_text())["batch_size"] == 64
    record = json.loads((out / "auto" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_count"] == 25


def test_bad_batch_size_is_one_line(tmp_path, capsys):
    result = run_in_process("train.py", "--data", tmp_path / "labels.csv", *TINY_TRAIN, "--epochs", "1", "--cpu",
                            "--output", tmp_path, "--batch-size", "big", "--name", "bad", capsys=capsys)
    assert result.returncode == 2
    assert "--batch-size" in error_line(result) and "'big'" in error_line(result)


def test_fast_decode_is_the_default_and_old_runs_keep_their_choice():
    """With --decode cpu (auto on a CPU); tests/test_device_decode.py covers --decode gpu."""
    from fixres.config import TrainConfig
    from fixres.preprocessing import create_transform
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert isinstance(create_transform(TrainConfig(), "train", device=cpu), DecodeRandomResizedCrop)
    assert isinstance(create_transform(TrainConfig(fast_decode=False, decode="cpu"), "train", device=gpu), transforms.v2.Compose)
    # a run configured before the default changed stored null: the GPU-only choice it started with
    assert isinstance(create_transform(TrainConfig(fast_decode=None), "train", device=cpu), transforms.v2.Compose)
    assert isinstance(create_transform(TrainConfig(fast_decode=None, decode="cpu"), "train", device=gpu), DecodeRandomResizedCrop)


class SlowImages(torch.utils.data.Dataset):
    """Random uint8 images that take 30 ms each to 'load'."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        time.sleep(0.03)
        return torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8), i % 2


def test_a_slow_loader_shows_as_data_wait():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(SlowImages(), batch_size=4,
                                         collate_fn=lambda b: (*torch.utils.data.default_collate(b), 0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    result, _ = train_one_epoch(TrainStep(model, optimizer, accelerator, lr_at=lambda step: 0.1), loader, first_step=0)
    assert result.images == 16
    # 120 ms of loading per batch against a linear layer's step: nearly all of it is waiting
    assert 0.5 < result.data_wait_frac <= 1.0 and result.data_wait_seconds <= result.seconds


BENCHMARKS = sorted(path.relative_to(ROOT / "benchmarks").as_posix() for path in (ROOT / "benchmarks").glob("*/*.py"))


@pytest.mark.slow  # fifteen scripts, each importing fixres afresh: a few seconds
@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_answers_help(name):
    """`python benchmarks/<folder>/<script> --help`, run as a new interpreter runs it but in this
    process (run_file_in_process): from its own folder, fixres not imported yet, so a script that
    cannot import fixres from there fails."""
    result = run_file_in_process(ROOT / "benchmarks" / name, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {name.split('/')[-1]}"), result.stdout + result.stderr[-2000:]
