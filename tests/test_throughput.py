"""Speed per size (fixres/throughput.py) and the best size within a speed budget: sweep.py
--max-latency-ms / --min-images-per-s and finetune.py --res auto with them.

No test times anything against anything: the budgets are tested on speeds injected in
place of fixres.throughput.measure_speed, so the chosen size depends on the numbers given
only. The 2-process check (the same speeds on both ranks) is in tests/test_sweep.py's
2-process sweep.

    python -m pytest tests/test_throughput.py -q
"""
import json
import re
from pathlib import Path

import pytest
import timm
import torch
from accelerate import Accelerator

from fixres import finetune as finetune_lib
from fixres import methods as methods_lib
from fixres import sweep as sweep_lib
from fixres import throughput
from fixres.config import ConfigError, FinetuneConfig, SweepConfig
from fixres.fileio import save_weights
from fixres.stats import best_of
from fixres.throughput import best_within, budget_line, measure_speed, meets, sizes_within
from tests.conftest import make_csv_dataset, run_in_process, script_main
from tests.test_finetune import write_source_run

SWEEP_MAIN = script_main("sweep.py")
SIZES = [16, 24, 32, 40]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- measuring ----------------------------------------------------------------------------------

def test_measure_speed_gives_positive_numbers_and_restores_the_modes():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    model.train()
    model.fc.eval()  # a mixed state, as finetune.py leaves it: kept as it was
    speeds = measure_speed(model, [16, 24], batch_size=4, accelerator=Accelerator(cpu=True), warmup=1, repeats=2)
    assert sorted(speeds) == [16, 24]
    for speed in speeds.values():
        assert set(speed) == {"images_per_s", "latency_ms"}
        assert all(0 < value < float("inf") for value in speed.values())
    assert model.training and not model.fc.training
    assert not torch.is_inference_mode_enabled()
    model(torch.randn(2, 3, 16, 16)).sum().backward()  # it can still train: not an inference tensor


# ---- the budget, on given numbers --------------------------------------------------------------

SPEEDS = {16: {"images_per_s": 4000.0, "latency_ms": 1.0}, 24: {"images_per_s": 2000.0, "latency_ms": 2.0},
          32: {"images_per_s": 1000.0, "latency_ms": 4.0}, 40: {"images_per_s": 500.0, "latency_ms": 8.0}}


def test_each_size_and_batch_gets_its_own_timing(monkeypatch):
    """measure_speed's wiring, on a clock that charges a pass by its pixels: images/s from the
    batch's own time at its own size, ms from batch 1's (not another size's, not the batch's)."""
    timed = []

    def fake_seconds(forward, x, passes, device):
        timed.append(tuple(x.shape))
        return x.numel() * 1e-9
    monkeypatch.setattr(throughput, "seconds_per_pass", fake_seconds)
    model = timm.create_model("test_resnet", num_classes=3)
    speeds = throughput.measure_speed(model, [16, 32], batch_size=8, accelerator=Accelerator(cpu=True), repeats=3)
    for size in (16, 32):
        assert speeds[size]["latency_ms"] == pytest.approx(1000 * 3 * size * size * 1e-9)
        assert speeds[size]["images_per_s"] == pytest.approx(8 / (8 * 3 * size * size * 1e-9))
    # one warm-up and one calibrating pass each, then 3 rounds taking turns over every (size, batch)
    assert timed[4 * 2:] == [(n, 3, s, s) for s in (16, 32) for n in (8, 1)] * 3


def test_a_size_meets_a_budget_when_it_meets_every_limit_given():
    assert sizes_within(SPEEDS, {"max_latency_ms": 2.0}, batch_size=64, device="cpu") == [16, 24]  # at most: 2.0 too
    assert sizes_within(SPEEDS, {"min_images_per_s": 1000.0}, batch_size=64, device="cpu") == [16, 24, 32]
    assert sizes_within(SPEEDS, {"max_latency_ms": 5.0, "min_images_per_s": 1500.0}, batch_size=64,
                        device="cpu") == [16, 24]
    assert meets(SPEEDS[40], {})  # no budget: every size


def test_the_best_within_a_budget_is_best_of_the_sizes_that_meet_it():
    rows = [{"size": 16, "top1": 0.5, "loss": 1.0}, {"size": 24, "top1": 0.7, "loss": 0.9},
            {"size": 32, "top1": 0.7, "loss": 0.8}, {"size": 40, "top1": 0.9, "loss": 0.5}]
    assert best_within(rows, SPEEDS, {"max_latency_ms": 5.0}) is rows[2]  # 40 px is out; 32 beats 24 on loss
    assert best_within(rows, SPEEDS, {"max_latency_ms": 3.0}) is rows[1]
    assert best_within(rows, SPEEDS, {"max_latency_ms": 0.5}) is None
    speeds = {r["size"]: SPEEDS[r["size"]] for r in rows}
    chosen = best_within(rows, speeds, {"max_latency_ms": 3.0})
    throughput.add_speeds(rows, speeds)
    assert budget_line(chosen, best_of(rows), {"max_latency_ms": 3.0}, batch_size=64) == (
        "best within --max-latency-ms 3: 24 px (top-1 70.0%, 2 ms at batch 1, 2000 images/s at batch 64); "
        "best overall: 40 px")


def test_a_budget_no_size_meets_is_refused_in_one_line():
    with pytest.raises(ConfigError) as refused:
        sizes_within(SPEEDS, {"max_latency_ms": 0.5}, batch_size=64, device=torch.device("cpu"))
    assert str(refused.value) == "--max-latency-ms 0.5: no size meets it (the fastest, 16 px, takes 1 ms at batch 1 on cpu)"
    with pytest.raises(ConfigError) as refused:  # each met by some size, both by none
        sizes_within(SPEEDS, {"max_latency_ms": 1.5, "min_images_per_s": 5000}, batch_size=8,
                     device=torch.device("cpu"))
    assert str(refused.value) == ("--max-latency-ms 1.5 and --min-images-per-s 5000: no size meets both (the fastest, "
                                  "16 px, takes 1 ms at batch 1; the fastest, 16 px, does 4000 images/s at batch 8 "
                                  "on cpu)")


@pytest.mark.parametrize("kwargs,named", [
    (dict(max_latency_ms=0.0), "--max-latency-ms must be > 0"), (dict(min_images_per_s=-5.0), "--min-images-per-s"),
    (dict(max_latency_ms=float("nan")), "--max-latency-ms must be a finite"), (dict(speed_repeats=0), "--speed-repeats"),
    (dict(max_latency_ms=5.0, speed=False), "--no-speed"),
])
def test_config_refuses_a_bad_budget(kwargs, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        SweepConfig(checkpoint="runs/x", **kwargs)
    if "speed" not in kwargs and "speed_repeats" not in kwargs:  # sweep.py's options only
        with pytest.raises(ConfigError, match=re.escape(named)):
            FinetuneConfig(checkpoint="runs/x", **kwargs)


# ---- sweep.py and finetune.py on injected speeds -----------------------------------------------

@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    """A test_resnet run folder (untrained weights: the sizes differ in loss, enough to choose)."""
    root = tmp_path_factory.mktemp("speed")
    csv = make_csv_dataset(root / "data", n_train=12, n_val=15)
    torch.manual_seed(0)
    save_weights(root / "run" / "best.safetensors", timm.create_model("test_resnet", num_classes=3).state_dict(),
                 {"model": "test_resnet", "classes": ["blue", "green", "red"], "train_res": 24, "test_res": 24,
                  "crop_pct": 0.875, "interpolation": "bilinear"})
    (root / "run" / "config.json").write_text(json.dumps({"data": str(csv), "images": None}))
    return root / "run"


def inject(monkeypatch, latency_ms: dict) -> list:
    """fixres.throughput.measure_speed replaced: these latencies, images/s = 64000 / latency;
    returns the list of the size lists it was asked for."""
    asked = []

    def fake(model, sizes, *, batch_size, accelerator, **timing):
        asked.append(list(sizes))
        return {s: {"images_per_s": 64000 / latency_ms[s], "latency_ms": latency_ms[s]} for s in sizes}
    monkeypatch.setattr(throughput, "measure_speed", fake)
    return asked


def test_sweep_chooses_the_best_within_the_budget(untrained_run, tmp_path, monkeypatch, capsys):
    common = ["--checkpoint", str(untrained_run), "--sizes", *map(str, SIZES), "--cpu", "--workers", "0"]
    inject(monkeypatch, {s: 1.0 for s in SIZES})
    overall = best_of(SWEEP_MAIN(common + ["--output", str(tmp_path / "all")])["rows"])["size"]
    latency = {s: 10.0 if s == overall else 1.0 + s / 100 for s in SIZES}  # the best overall is the slowest
    inject(monkeypatch, latency)
    written = []
    monkeypatch.setattr(sweep_lib, "write_best_size", lambda weights, run, size, *rest: written.append(size))
    capsys.readouterr()
    result = SWEEP_MAIN(common + ["--output", str(tmp_path / "budget"), "--max-latency-ms", "5", "--write-best"])
    stdout = capsys.readouterr().out
    chosen = best_of([r for r in result["rows"] if r["size"] != overall])
    assert written == [chosen["size"]] != [overall]
    assert (f"best within --max-latency-ms 5: {chosen['size']} px (top-1 {100 * chosen['top1']:.1f}%, "
            f"{latency[chosen['size']]:.3g} ms at batch 1, {64000 / latency[chosen['size']]:.0f} images/s at batch 64); "
            f"best overall: {overall} px") in stdout
    record = json.loads((tmp_path / "budget" / "sweep.json").read_text())
    assert record["meta"]["budget"] == {"max_latency_ms": 5.0} and record["meta"]["best_within_budget"] == chosen["size"]
    assert record["meta"]["measured_best"] == overall
    assert record["meta"]["speed"]["device"] == "cpu" and record["meta"]["speed"]["batch_size"] == 64
    for row in record["rows"]:  # attached by size
        assert row["latency_ms"] == latency[row["size"]] and row["images_per_s_batch"] == 64000 / latency[row["size"]]
    assert "latency_ms" in (tmp_path / "budget" / "sweep.csv").read_text().splitlines()[0]
    assert (tmp_path / "budget" / "sweep_speed.png").read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads((tmp_path / "all" / "sweep.json").read_text())["meta"]["best_within_budget"] is None


def test_a_budget_chooses_among_every_crop_pct_of_the_sizes_within_it(untrained_run, tmp_path, monkeypatch, capsys):
    common = ["--checkpoint", str(untrained_run), "--sizes", *map(str, SIZES), "--crop-pcts", "0.5", "1.0", "--cpu",
              "--workers", "0"]
    inject(monkeypatch, {s: 1.0 for s in SIZES})
    overall = best_of(SWEEP_MAIN(common + ["--output", str(tmp_path / "all")])["rows"])
    inject(monkeypatch, {s: 10.0 if s == overall["size"] else 1.0 for s in SIZES})  # the best overall's size: too slow
    written = []
    monkeypatch.setattr(sweep_lib, "write_best_size", lambda weights, run, size, crop, console: written.append((size, crop)))
    capsys.readouterr()
    rows = SWEEP_MAIN(common + ["--output", str(tmp_path / "budget"), "--max-latency-ms", "5", "--write-best"])["rows"]
    chosen = best_of([r for r in rows if r["size"] != overall["size"]])  # every crop_pct of the other sizes
    assert chosen["crop_pct"] != 0.875  # here another crop wins: a budget applied to the run's crop alone would show
    assert written == [(chosen["size"], chosen["crop_pct"])]
    assert f"best within --max-latency-ms 5: {chosen['size']} px at crop_pct {chosen['crop_pct']:g} (" in capsys.readouterr().out
    meta = json.loads((tmp_path / "budget" / "sweep.json").read_text())["meta"]
    assert (meta["best_within_budget"], meta["best_within_budget_crop_pct"]) == (chosen["size"], chosen["crop_pct"])


def test_sweep_refuses_a_budget_no_size_meets_before_any_evaluation(untrained_run, tmp_path, monkeypatch, capsys):
    inject(monkeypatch, {s: 2.0 + s / 100 for s in SIZES})
    result = run_in_process("sweep.py", "--checkpoint", untrained_run, "--sizes", *SIZES, "--cpu", "--workers", 0,
                            "--output", tmp_path / "out", "--max-latency-ms", 2, capsys=capsys)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --max-latency-ms 2: no size meets it (the fastest, 16 px, takes 2.16 ms at batch 1 on cpu)"]
    assert not (tmp_path / "out").exists()


def test_sweep_without_speed(untrained_run, tmp_path, monkeypatch):
    asked = inject(monkeypatch, {})
    result = SWEEP_MAIN(["--checkpoint", str(untrained_run), "--sizes", "16", "--cpu", "--workers", "0", "--no-speed",
                         "--output", str(tmp_path)])
    assert asked == [] and "latency_ms" not in result["rows"][0] and result["meta"]["speed"] is None
    assert not (tmp_path / "sweep_speed.png").exists()


def test_finetune_res_auto_chooses_among_the_sizes_within_the_budget(tmp_path, monkeypatch):
    csv = make_csv_dataset(tmp_path / "data", n_train=12, n_val=15)
    source = write_source_run(tmp_path / "source", "test_resnet", csv)  # trained at 32 px
    asked = inject(monkeypatch, {24: 1.0, 32: 9.0, 40: 2.0, 48: 9.0})
    scored = []
    real = methods_lib.run_sweep
    monkeypatch.setattr(methods_lib, "run_sweep", lambda *args, **kwargs: scored.extend(args[3]) or real(*args, **kwargs))
    common = dict(checkpoint=str(source), data=str(csv), sizes=[24, 40, 48], choice_images=6, method="bn-stats",
                  workers=0, cpu=True, output=str(tmp_path))
    summary = finetune_lib.finetune(dict(**common, res="auto", max_latency_ms=5.0, name="auto"))
    assert asked == [[24, 32, 40, 48]]
    assert scored == [24, 32, 40]  # 48 px is outside; 32 px, the training size, is scored as the reference only
    assert summary["res"] in (24, 40)
    assert re.match(rf"--res auto: {summary['res']} px, the best of the sweep \(24, 40 px\) within --max-latency-ms 5 "
                    r"\(32, 48 px outside it; 32 px, the training size, scored as the reference only\) on the 6 ",
                    summary["res_choice"])
    choice = {r["size"]: r for r in summary["choice_sweep"]}
    assert choice[24]["latency_ms"] == 1.0 and choice[40]["images_per_s_batch"] == 32000.0
    assert choice[summary["res"]] == max((choice[24], choice[40]), key=lambda r: (r["top1"], -r["loss"]))

    with pytest.raises(ConfigError) as refused:  # --res N outside the budget: refused, not warned
        finetune_lib.finetune(dict(**common, res=48, max_latency_ms=5.0, name="fixed"))
    assert str(refused.value) == ("--res 48 takes 9 ms at batch 1 and does 7111 images/s at batch 64 on cpu: outside "
                                  "--max-latency-ms 5; use --res auto to choose within it, or drop the budget")
    assert not (tmp_path / "fixed").exists()
