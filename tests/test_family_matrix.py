"""The model-family matrix (issue 23): each family of timm and torchvision trained at one size,
swept at three, fine-tuned at a larger one, bn-stats run or refused in one line, and every number
compared with the library's own code: timm's create_model("local-dir:...") of the run's export
with timm's own eval transform (timm families), torchvision's own model built at that size with
its weights' own eval transform (torchvision families, which have no timm export: train.py says
so in one line). Then the same sweeps with 2 processes (torchrun, gloo, CPU) against 1.

    python -m pytest -q tests/test_family_matrix.py                 # the whole matrix: about 40 s on this 2-core machine
    python -m pytest -q tests/test_family_matrix.py -m "not slow"   # the quick family (EfficientNet): 2 s
    python -m pytest -q tests/test_family_matrix.py -k deit         # one family (and its 2-process sweep)

Small configurations on 12 training and 12 validation images: timm's through --model-kwargs;
torchvision's builders pass their widths themselves, so its ViT, ConvNeXt and Swin are small
members of those classes registered as torchvision models (tests/small_torchvision.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from torch import nn

from fixres.data import load_split
from fixres.fileio import load_weights
from tests import small_torchvision
from tests.conftest import error_line, make_csv_dataset, run_in_process, script_main
from tests.test_families import DEIT, DEIT_KWARGS, library_logits
from tests.test_vit_sizes import ok, tv_vit_at

small_torchvision.register()  # tv:small_vit_b_16, tv:small_convnext, tv:small_swin


@dataclasses.dataclass(frozen=True, eq=False)  # each one itself: a key of the runs made once a session
class Family:
    id: str
    model: str
    kwargs: dict = dataclasses.field(default_factory=dict)  # --model-kwargs
    sizes: tuple[int, ...] = (32, 40, 48)  # swept; the first is the training size, the second train.py's --test-res
    finetune_res: int = 48
    bn_stats: str | None = None  # finetune.py --method bn-stats's one line of refusal; None: it runs
    size_keyword: str | None = None  # the constructor's size (a ViT is built for one): recorded as the training size
    off_grid: tuple[int, int, str] | None = None  # a size off its patch grid, the patch, the two nearest sizes it takes
    quick: bool = False

    @property
    def timm(self) -> bool:
        return not self.model.startswith("tv:")

    @property
    def model_args(self) -> list[str]:
        return ["--model", self.model, *(["--model-kwargs", *(f"{k}={v}" for k, v in self.kwargs.items())]
                                         if self.kwargs else [])]

    def takes_multiples(self) -> str:
        return f"{self.model} takes multiples of its {self.off_grid[1]} px patch"


def no_running_statistics(model: str, layer: str, kind: str) -> str:
    return (f"error: --method bn-stats: {model}'s last normalisation layer {layer} is a {kind}, which keeps no "
            f"running statistics to re-estimate; use --method finetune")


FAMILIES = [
    # strict sizes: a timm ViT is built for one size (img_size, the training size), 8 px patches here
    Family("vit", "test_vit", {"patch_size": 8, "depth": 1}, size_keyword="img_size", off_grid=(36, 8, "32, 40"),
           bn_stats=no_running_statistics("test_vit", "norm", "LayerNorm")),
    Family("deit", DEIT, DEIT_KWARGS, size_keyword="img_size", off_grid=(36, 8, "32, 40"),  # two heads
           bn_stats=no_running_statistics(DEIT, "norm", "LayerNorm")),
    Family("convnext", "test_convnext", bn_stats=no_running_statistics("test_convnext", "head.norm", "LayerNorm2d")),
    Family("nfnet", "test_nfnet", bn_stats="error: --method bn-stats: test_nfnet has no normalisation layer before "
                                           "its classifier head.fc, so no running statistics to re-estimate; use "
                                           "--method finetune"),
    Family("efficientnet", "test_efficientnet", quick=True),  # BatchNorm: bn-stats runs
    # torchvision's builders pass their widths themselves: small members of its families registered
    # in its model registry (tests/small_torchvision.py), the same classes, patches and windows
    Family("tv-vit", "tv:small_vit_b_16", sizes=(32, 48, 64), size_keyword="image_size", off_grid=(40, 16, "32, 48"),
           bn_stats=no_running_statistics("tv:small_vit_b_16", "encoder.ln", "LayerNorm")),
    Family("tv-convnext", "tv:small_convnext", bn_stats=no_running_statistics(
        "tv:small_convnext", "classifier.0", "LayerNorm2d")),
    # torchvision's Swin pads to its patch and windows: sizes off every grid
    Family("tv-swin", "tv:small_swin", sizes=(32, 38, 50), finetune_res=56, bn_stats=no_running_statistics(
        "tv:small_swin", "norm", "LayerNorm")),
]
# one family in the quick tests (about 2 s): the BatchNorm one, where every step runs (bn-stats too)
PARAMS = [pytest.param(f, id=f.id, marks=() if f.quick else pytest.mark.slow) for f in FAMILIES]
COMMON = ["--workers", "0", "--cpu"]
# each size timed once, and no figures: neither is compared here
SWEEP_COMMON = [*COMMON, "--speed-repeats", "1", "--no-plots"]
FINETUNE_COMMON = [*COMMON, "--no-plots"]


@pytest.fixture(scope="session")  # the late 2-process tests read it after the other files' tests
def data(tmp_path_factory) -> Path:
    """12 training and 12 validation images, half of the latter blends of two colours (a model
    trained one epoch gets every plain one right): which images are right then depends on the
    model and the size, as an image-by-image comparison needs."""
    csv = make_csv_dataset(tmp_path_factory.mktemp("matrix-data"), n_train=12, n_val=12)
    val = [line.split(",")[0] for line in csv.read_text().splitlines()[1:] if line.endswith("True")]
    for name, other in zip(val[::2], val[1::2]):
        with Image.open(csv.parent / "images" / name) as a, Image.open(csv.parent / "images" / other) as b:
            blend = Image.blend(a.convert("RGB"), b.convert("RGB"), 0.5)
        blend.save(csv.parent / "images" / name, quality=90)
    return csv


@dataclasses.dataclass
class Swept:
    folder: Path  # the run folder
    printed: str  # what train.py and sweep.py printed
    rows: list[dict]  # sweep.py's main's rows: sweep.json's, with which images were right (per_image_correct)


TWO_PROCESS_SWEEPS = "test_family_matrix.py: the 2-process sweeps"


def asked_for_two_processes(session) -> list[Family]:
    """The families whose 2-process test this session runs, in their order."""
    return list(dict.fromkeys(item.callspec.params["family"] for item in session.items
                              if getattr(item, "originalname", None) == "test_two_processes_sweep_as_one"))


@pytest.fixture(scope="session")
def swept(request, data, tmp_path_factory, early_runs):
    """family -> Swept: train.py (1 epoch, validated at the second size), then sweep.py at the three
    sizes (and one off its patch grid, dropped), once a session, in this process (the matrix's test
    and the 2-process one both read them). Once every family of the session's 2-process tests is
    swept, their 2-process sweeps start in the background: one torchrun launch (tests/sweep_runs.py:
    sweep.py's main once per run), each family's sweep.json in <folder>/<family id>."""
    root = tmp_path_factory.mktemp("matrix-runs")
    asked = asked_for_two_processes(request.session)
    done: dict[Family, Swept] = {}

    def run(family: Family) -> Swept:
        if family not in done:
            train = ["--data", data, *family.model_args, "--train-res", family.sizes[0], "--test-res", family.sizes[1],
                     "--epochs", 1, "--batch-size", 6, *COMMON, "--output", root, "--name", family.id]
            with contextlib.redirect_stdout(io.StringIO()) as printed:  # rich's console writes to sys.stdout
                script_main("train.py")([str(a) for a in train])
                result = script_main("sweep.py")(sweep_args(family, root / family.id))
            done[family] = Swept(root / family.id, printed.getvalue(), result["rows"])
            if asked and done.keys() >= set(asked) and TWO_PROCESS_SWEEPS not in early_runs:
                out = tmp_path_factory.mktemp("two-processes")
                args = [arg for f in asked for arg in ["--", *sweep_args(f, done[f].folder, "--output", out / f.id)]]
                early_runs.start(TWO_PROCESS_SWEEPS, "tests/sweep_runs.py", *args, processes=2, folder=out)
        return done[family]
    return run


def sweep_args(family: Family, folder: Path, *extra) -> list[str]:
    sizes = sorted({*family.sizes, *(family.off_grid[:1] if family.off_grid else ())})
    return ["--checkpoint", str(folder), "--sizes", *map(str, sizes), "--batch-size", "4", *SWEEP_COMMON, *extra]


def val_samples(folder: Path) -> list:
    meta = load_weights(folder / "best.safetensors")[1]
    return load_split(json.loads((folder / "config.json").read_text())["data"], None, classes=meta["classes"]).val


def library_model_and_transform(family: Family, folder: Path, size: int, meta: dict):
    """The library's own model of the run in `folder` at `size` px and its own eval transform:
    timm's create_model of the run's export and resolve_data_config/create_transform, or
    torchvision's model from the weights (a ViT built at `size`, the weights of another size
    through torchvision's interpolate_embeddings) and its weights' eval preset at that size."""
    if family.timm:
        model = timm.create_model(f"local-dir:{folder / 'timm'}", pretrained=True)
        config = timm.data.resolve_data_config({"input_size": (3, size, size)}, model=model)
        return model, timm.data.create_transform(**config, is_training=False)
    import torchvision
    name = family.model.removeprefix("tv:")
    build = functools.partial(torchvision.models.get_model, name, num_classes=len(meta["classes"]))
    state = load_weights(folder / "best.safetensors")[0]
    built_at = (meta.get("model_kwargs") or {}).get("image_size")
    if built_at not in (None, size):
        model = tv_vit_at(size, state, patch=16, build=lambda s: build(image_size=s))
    else:  # the weights as they are: strictly the network built with the run's recorded arguments
        model = build(**(meta.get("model_kwargs") or {}))
        model.load_state_dict(state)
    # torchvision's ImageClassification preset of the model's weights, at this run's size and normalisation;
    # the shorter side resized to size / crop_pct, floored, as timm's eval transform does
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms
    transform = preset(crop_size=size, resize_size=int(size / meta["crop_pct"]), mean=meta["mean"], std=meta["std"],
                       interpolation=torchvision.transforms.InterpolationMode(meta["interpolation"]))
    return model.eval(), transform


def check_rows_as_library(family: Family, folder: Path, rows: list[dict]) -> None:
    """Each row of a sweep of the run in `folder`, image by image, is what the library's own model gives."""
    meta = load_weights(folder / "best.safetensors")[1]
    samples = val_samples(folder)
    labels = torch.tensor([label for _, label in samples])
    for row in rows:
        model, transform = library_model_and_transform(family, folder, row["size"], meta)
        logits = library_logits(model, samples, transform)
        assert (logits.argmax(1) == labels).tolist() == row["per_image_correct"].tolist(), row["size"]
        assert row["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-4), row["size"]


def recorded_kwargs(family: Family, size: int) -> dict | None:
    return {**family.kwargs, family.size_keyword: size} if family.size_keyword else family.kwargs or None


# what the matrix's tv-* families stand for: torchvision's own vit_b_16, convnext_tiny and swin_t
FULL_SIZE = {"tv-vit": "vit_b_16", "tv-convnext": "convnext_tiny", "tv-swin": "swin_t"}


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.timm], ids=lambda f: f.id)
def test_the_small_torchvision_models_are_built_as_the_full_size_ones(family):
    """The same class, the same layers where the matrix's lines name them (the last norm, as
    fixres finds it, and the classifier), patch, windows and shifts, stages (the size of the
    maps after each, at the matrix's sizes), size keyword and default preprocessing as the
    full-size model (built on the meta device: no memory, no time), and fixres refuses the same
    sizes of both."""
    import torchvision
    from fixres.adapt import find_last_norm
    from fixres.classifiers import classifier_names
    from fixres.models import check_model_sizes, size_keyword
    from fixres.options import ConfigError
    full_name, small_name = FULL_SIZE[family.id], family.model.removeprefix("tv:")
    with torch.device("meta"):
        full, small = (torchvision.models.get_model(n, num_classes=3) for n in (full_name, small_name))
    assert type(small) is type(full)
    norm = family.bn_stats.split("last normalisation layer ")[1].split(" ")[0]  # the matrix's refusal line's
    assert type(small.get_submodule(norm)) is type(full.get_submodule(norm))
    built_for = getattr(full, "image_size", family.sizes[0])  # a ViT runs at the size it is built for only
    assert find_last_norm(small, input_size=built_for) == find_last_norm(full, input_size=built_for) == norm
    assert classifier_names(small) == classifier_names(full)
    if hasattr(full, "features"):  # ConvNeXt's and Swin's stages: the same downsampling, and as many
        def map_sizes(model) -> list[list[tuple[int, ...]]]:
            sizes = []
            for size in (*family.sizes, family.finetune_res):
                x, after = torch.empty(1, 3, size, size, device="meta"), []
                for stage in model.features:
                    x = stage(x)
                    after.append(tuple(x.shape[1:3] if family.id == "tv-swin" else x.shape[2:]))  # Swin: NHWC
                sizes.append(after)
            return sizes
        assert map_sizes(small) == map_sizes(full)
    assert size_keyword(family.model) == size_keyword(f"tv:{full_name}") == family.size_keyword
    assert torchvision.models.get_model_weights(small_name) is torchvision.models.get_model_weights(full_name)
    if family.id == "tv-vit":
        assert small.patch_size == full.patch_size == 16
    if family.id == "tv-swin":
        def geometry(model):
            blocks = [b for b in model.modules() if isinstance(b, torchvision.models.swin_transformer.SwinTransformerBlock)]
            return model.features[0][0].kernel_size, {(tuple(b.attn.window_size), tuple(b.attn.shift_size)) for b in blocks}
        assert geometry(small) == geometry(full)
    for size in (family.off_grid[0],) if family.off_grid else family.sizes:
        refusals = []
        for name in (family.model, f"tv:{full_name}"):
            try:
                check_model_sizes(name, None, {"--res": size})
                refusals.append(None)
            except ConfigError as err:
                refusals.append(str(err).replace(name, "MODEL"))
        assert refusals[0] == refusals[1] and (refusals[0] is not None) == bool(family.off_grid), size


@pytest.mark.parametrize("family", PARAMS)
def test_a_family_trains_sweeps_finetunes_and_evaluates_as_its_library(family, swept, data, tmp_path, capsys):
    run = swept(family)
    meta = load_weights(run.folder / "best.safetensors")[1]
    assert meta["model_kwargs"] == recorded_kwargs(family, family.sizes[0])  # every rebuild: the trained network
    if family.timm:
        assert f"timm export: {run.folder / 'timm'} (test size {family.sizes[1]} px" in run.printed
    else:  # torchvision: no timm export, and one line that says why
        assert f"timm export: none ({family.model} is a torchvision model; timm exports are for timm models)" \
            in run.printed
        assert not (run.folder / "timm").exists()
    if family.off_grid:  # a size off its patch: dropped from a sweep, refused by train.py and finetune.py
        size, _, nearest = family.off_grid
        assert f"dropped {size} px: {family.takes_multiples()}" in run.printed
        refused = run_in_process("train.py", "--data", data, *family.model_args, "--train-res", size,
                                 "--output", tmp_path / "refused", capsys=capsys)
        assert error_line(refused) == f"error: --train-res {size}: {family.takes_multiples()} (nearest: {nearest})"
        refused = run_in_process("finetune.py", "--checkpoint", run.folder, "--res", size,
                                 "--output", tmp_path / "refused", capsys=capsys)
        assert error_line(refused) == f"error: --res {size}: {family.takes_multiples()} (nearest: {nearest})"
        assert not (tmp_path / "refused").exists()

    # the sweep, size by size and image by image, is what the library's own model gives
    rows = json.loads((run.folder / "sweep.json").read_text())["rows"]
    assert [r["size"] for r in rows] == [r["size"] for r in run.rows] == list(family.sizes)
    assert not list(run.folder.glob("*.png"))  # --no-plots: the tables and no figure
    assert [r["loss"] for r in rows] == [r["loss"] for r in run.rows]
    check_rows_as_library(family, run.folder, run.rows)

    # fine-tuned at a larger size (1 epoch): the library's own model of the result gives finetune.json's
    # numbers, and a sweep of it (at the training and the fine-tuning size) the sweep's
    ok(run_in_process("finetune.py", "--checkpoint", run.folder, "--res", family.finetune_res, "--epochs", "1",
                      "--batch-size", "6", *FINETUNE_COMMON, "--output", tmp_path, "--name", "ft", capsys=capsys))
    check_finetune_run(family, tmp_path / "ft")
    assert not (tmp_path / "ft" / "activations.png").exists()  # --no-plots
    rows = script_main("sweep.py")(["--checkpoint", str(tmp_path / "ft"), "--sizes", str(family.finetune_res),
                                    "--batch-size", "4", *SWEEP_COMMON])["rows"]
    assert [r["size"] for r in rows] == [family.sizes[0], family.finetune_res]
    check_rows_as_library(family, tmp_path / "ft", rows)

    bn_stats = run_in_process("finetune.py", "--checkpoint", run.folder, "--method", "bn-stats", "--res",
                              family.finetune_res, *FINETUNE_COMMON, "--output", tmp_path, "--name", "bn", capsys=capsys)
    if family.bn_stats is None:
        ok(bn_stats)
        check_finetune_run(family, tmp_path / "bn")
    else:
        assert error_line(bn_stats) == family.bn_stats
        assert not (tmp_path / "bn").exists()


def check_finetune_run(family: Family, tuned: Path) -> None:
    """A finetune.py run: the network of its new size, its export (timm) at that size, and
    finetune.json's numbers after on the reported images as the library's own model gives them."""
    summary = json.loads((tuned / "finetune.json").read_text())
    meta = load_weights(tuned / "best.safetensors")[1]
    assert summary["finetune_res"] == meta["test_res"] == family.finetune_res
    assert meta["model_kwargs"] == recorded_kwargs(family, family.finetune_res)  # rebuilt at that size
    if family.timm:
        export = timm.create_model(f"local-dir:{tuned / 'timm'}", pretrained=True)
        assert timm.data.resolve_data_config({}, model=export, use_test_size=True)["input_size"] == \
            (3, family.finetune_res, family.finetune_res)
    else:
        assert not (tuned / "timm").exists()
    held_out = set(summary["held_out"])
    reported = [s for s in val_samples(tuned) if s[0] not in held_out]
    model, transform = library_model_and_transform(family, tuned, family.finetune_res, meta)
    logits = library_logits(model, reported, transform)
    labels = torch.tensor([label for _, label in reported])
    assert summary["loss"]["after"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-4)
    assert summary["top1"]["after"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())


# ---- 2 processes (torchrun, gloo, CPU) against 1 ----------------------------------------------------

@pytest.fixture(scope="session")
def two_process_sweeps(request, swept, early_runs) -> Path:
    """The folder of the 2-process sweeps that `swept` started (each family swept first, here, if
    the matrix's own test of it has not run)."""
    for family in asked_for_two_processes(request.session):
        swept(family)
    ok(early_runs[TWO_PROCESS_SWEEPS])
    return early_runs.folders[TWO_PROCESS_SWEEPS]


@pytest.mark.slow  # one torchrun launch for all of them: two new interpreters
@pytest.mark.late
@pytest.mark.parametrize("family", FAMILIES, ids=[f.id for f in FAMILIES])
def test_two_processes_sweep_as_one(family, swept, two_process_sweeps):
    one = json.loads((swept(family).folder / "sweep.json").read_text())
    two = json.loads((two_process_sweeps / family.id / "sweep.json").read_text())
    assert (one["meta"]["processes"], two["meta"]["processes"]) == (1, 2)
    exact = ("size", "resize", "correct", "correct5", "count", "diff_vs_train", "diff_low", "diff_high", "gained", "lost")
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert {k: a[k] for k in exact} == {k: b[k] for k in exact}  # every image counted once, its result in place
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)  # only the summation order differs
    assert one["per_class"] == two["per_class"]
