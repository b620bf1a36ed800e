"""docs/reliability.md, written from a run of the tests that prove it.

    python tests/reliability_table.py          # about 4 minutes on 2 cores; rewrites docs/reliability.md

Runs tests/test_reliability.py (which records each fault and what happened, see its
`record`) and the existing tests that cover the rest of issue 7's list (CATALOG
below) in this process, with a plugin that keeps each test's outcome and the
messages of the fixres errors raised in it. Nothing is written unless every one of
those tests passed.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The checklist of bad inputs fixres must refuse or accept, in its order.
CHECKLIST = {
    1: "truncated JPEG", 2: "empty file", 3: "a text file named .jpg", 4: "PNG with alpha", 5: "16-bit PNG",
    6: "CMYK JPEG", 7: "grayscale", 8: "an EXIF-rotated photo (rotated correctly)",
    9: "an image over Pillow's decompression-bomb limit", 10: "a CSV with a byte-order mark",
    11: "duplicate image ids", 12: "a missing label", 13: "unknown is_val values",
    14: "a path leaving the image folder",
    15: "a checkpoint for another number of classes", 16: "a truncated or corrupted checkpoint",
    17: "a config with an unknown key",
}

# Those that tests written before this table cover: (item, input, test, parameter id or None,
# "refused" or what is done instead, text the error raised in the test contains).
CATALOG = [
    (1, "image: truncated JPEG", "tests/test_data.py::test_undecodable_files_name_the_path", "truncated",
     "refused", "cannot decode image"),
    (2, "image: empty file", "tests/test_data.py::test_undecodable_files_name_the_path", "[]", "refused",
     "cannot decode image"),
    (3, "image: a text file named .jpg", "tests/test_data.py::test_undecodable_files_name_the_path", "[this is text",
     "refused", "cannot decode image"),
    (4, "image: PNG with alpha (RGBA)", "tests/test_data.py::test_any_mode_becomes_rgb", "RGBA-PNG",
     "accepted: transparent pixels composited on white, RGB", None),
    (5, "image: 16-bit greyscale PNG", "tests/test_data.py::test_16_bit_greyscale_is_scaled_not_clipped", None,
     "accepted: scaled to 8 bits (not clipped), RGB", None),
    (6, "image: CMYK JPEG", "tests/test_data.py::test_any_mode_becomes_rgb", "CMYK-JPEG", "accepted: converted to RGB",
     None),
    (7, "image: greyscale PNG", "tests/test_data.py::test_any_mode_becomes_rgb", "L-PNG", "accepted: converted to RGB",
     None),
    (8, "image: EXIF-rotated JPEG (orientation 6)", "tests/test_data.py::test_exif_rotation_is_applied", None,
     "accepted: turned upright, clockwise (a marked edge ends on top)", None),
    (10, "CSV with a byte-order mark", "tests/test_data.py::test_csv_with_byte_order_mark", None,
     "accepted: read as UTF-8 with BOM, the first column is image_id", None),
    (11, "CSV: duplicate image ids", "tests/test_data.py::test_csv_errors_name_file_and_row", "duplicate", "refused",
     "duplicate image_id"),
    (12, "CSV: a missing label", "tests/test_data.py::test_csv_errors_name_file_and_row", "missing label", "refused",
     "missing label"),
    (13, "CSV: unknown is_val value", "tests/test_data.py::test_csv_errors_name_file_and_row", "is_val must be",
     "refused", "is_val must be"),
    (14, "CSV: an image path leaving the image folder", "tests/test_data.py::test_csv_errors_name_file_and_row",
     "leaves the image folder", "refused", "leaves the image folder"),
    (15, "checkpoint for another number of classes (sweep.py --weights: a 4-class classifier, 3-class data)",
     "tests/test_sweep.py::test_bad_input_is_one_line_and_status_2", None, "refused", "4-class"),
    (15, "checkpoint whose tensors do not fit the model (--weights resnet18 into resnet50)",
     "tests/test_models.py::test_weights_that_do_not_fit_are_refused", None, "refused", "has shape"),
    (16, "checkpoint: weights file of zeros", "tests/test_checkpoint.py::test_corrupted_weights_file", None, "refused",
     "unreadable weights"),
]
# Faults, not inputs, that earlier tests cover: (section, fault, test, what happens, text of the error).
OTHER_EXISTING = [
    ("rank death", "a NaN loss on rank 1 of 2 only (injected from step 4; two plain processes and torchrun)",
     "tests/test_nonfinite.py::test_a_nan_on_one_rank_stops_both_ranks_at_that_step_with_the_same_line",
     "both ranks stop at that step with the same line and exit 2 (not -15 under torchrun)", "loss is nan on process 1"),
    ("disk", "no space while replacing a weights file (os.replace patched to fail)",
     "tests/test_checkpoint.py::test_failed_write_keeps_the_previous_file", "the previous file is left as it was",
     "cannot write"),
    ("safe loading", "--weights: a .pth whose unpickling calls exec",
     "tests/test_models.py::test_pickled_code_is_not_run",
     "refused, marker file not created", "cannot read weights"),
]


class Recorder:
    """Outcome and duration of every test, and the messages of fixres errors raised in it."""

    def __init__(self):
        self.outcomes: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.messages: dict[str, list[str]] = {}
        self.current = None
        from fixres.checkpoint import CheckpointError
        from fixres.classifiers import ModelError
        from fixres.config import ConfigError
        from fixres.data import DataError
        for cls in (CheckpointError, ConfigError, DataError, ModelError):
            self._listen(cls)

    def _listen(self, cls):
        original = cls.__init__

        def __init__(error, *args, **kwargs):
            original(error, *args, **kwargs)
            self.messages.setdefault(self.current, []).append(str(error))
        cls.__init__ = __init__

    def pytest_runtest_setup(self, item):
        self.current = item.nodeid

    def pytest_runtest_logreport(self, report):
        before = self.outcomes.get(report.nodeid, "passed")
        if report.failed or before == "failed":
            self.outcomes[report.nodeid] = "failed"
        elif report.skipped:
            self.outcomes[report.nodeid] = "skipped"
        elif report.when == "call":
            self.outcomes[report.nodeid] = "passed"
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def nodes(self, test: str, param: str | None) -> list[str]:
        return [n for n in self.outcomes if n.split("[")[0] == test and (param is None or param in n)]

    def said(self, nodes: list[str], contains: str | None) -> str | None:
        found = [m for n in nodes for m in self.messages.get(n, []) if contains and contains in m]
        return found[0] if found else None


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def main() -> int:
    os.chdir(ROOT)
    work = Path(tempfile.mkdtemp(prefix="fixres-reliability-"))
    log, basetemp = work / "records.jsonl", work / "tmp"
    os.environ["FIXRES_RELIABILITY_LOG"] = str(log)
    tests = sorted({c[2] for c in CATALOG} | {c[2] for c in OTHER_EXISTING})
    recorder = Recorder()
    start = time.monotonic()
    status = pytest.main(["-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}", "tests/test_reliability.py",
                          *tests], plugins=[recorder])
    minutes = (time.monotonic() - start) / 60
    failed = [n for n, o in recorder.outcomes.items() if o == "failed"]
    if status != 0 or failed:
        print(f"pytest exit {status}, failed: {failed}; docs/reliability.md left as it was", file=sys.stderr)
        return 1
    records = [json.loads(line) for line in log.read_text().splitlines()]

    def message(text) -> str:
        return "`" + cell(str(text).removeprefix("error: ").replace(str(basetemp), "<tmp>")) + "`"

    def passed(nodes) -> str:
        return "passed" if nodes and all(recorder.outcomes[n] == "passed" for n in nodes) else "not run"

    # bad inputs: earlier tests, then this file's
    rows, handled = [], {}
    for item, what, test, param, outcome, contains in CATALOG:
        nodes = recorder.nodes(test, param)
        said = recorder.said(nodes, contains)
        rows.append((what, "refused" if outcome == "refused" else outcome, message(said) if said else "",
                     f"`{test.split('/')[-1]}`" + (f" ({param.strip('[]')})" if param else ""), passed(nodes)))
        if passed(nodes) == "passed":
            handled.setdefault(item, set()).add("refused" if outcome == "refused" else "accepted")
    for r in (r for r in records if r["section"] == "bad input"):
        rows.append((r["case"], r["outcome"], message(r["message"]), "`test_reliability.py`", "passed"))
        if r.get("item"):
            handled.setdefault(r["item"], set()).add("refused")
    refused = sum(1 for r in rows if r[1] == "refused" and r[4] == "passed")
    accepted = sum(1 for r in rows if r[1] != "refused" and r[4] == "passed")
    items_refused = sum(1 for i in CHECKLIST if handled.get(i) == {"refused"})
    items_accepted = sum(1 for i in CHECKLIST if handled.get(i) == {"accepted"})
    missing = [CHECKLIST[i] for i in CHECKLIST if i not in handled]

    kills = [r for r in records if r["section"] == "kills" and r["case"] != "summary"]
    summary = next(r for r in records if r["section"] == "kills" and r["case"] == "summary")
    cpu = "?"
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "?")
    import torch
    out = [
        "# Reliability: faults survived, bad inputs refused, nothing unsafe loaded",
        "",
        "Written by `python tests/reliability_table.py` from one run of the tests that prove each row",
        "(tests/test_reliability.py, and the earlier tests named in the tables); it is only written when",
        "all of them pass. Messages are those the tests saw (temporary folders shortened to `<tmp>`); the",
        "scripts print them as one line, `error: <message>`, and exit with status 2.",
        "",
        f"Last run: {datetime.datetime.now():%Y-%m-%d %H:%M}, {len(recorder.outcomes)} tests passed in "
        f"{minutes:.1f} min, {os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, CPU only.",
        "",
        f"- **{summary['outcome']}**: SIGKILL at {len(kills)} moments drawn at random (seed {summary['seed']}) "
        "in a 3-epoch run, each followed by `--resume auto`. After every kill each checkpoint on disk loaded "
        "(weights and state) and none of the finished epochs was lost; the final `last.safetensors` and "
        "`best.safetensors` equal those of an uninterrupted run with the same seed, tensor for tensor, and "
        "`metrics.jsonl` has the same numbers.",
        f"- **{refused} bad inputs refused with one-line messages** naming the file, row or option, and "
        f"**{accepted} unusual inputs accepted** and converted. The checklist of bad inputs has {len(CHECKLIST)} kinds: "
        f"{items_refused} refused, {items_accepted} accepted"
        + (f", not covered: {', '.join(missing)}" if missing else "") + ".",
        "",
        "## SIGKILL at random moments, then `--resume auto`",
        "",
        "`tests/kill_harness.py` runs train.py with named pause points. The test draws 10 of an",
        "uninterrupted run's moments (3 training steps, 2 evaluations, 1 start-up write, and one in each",
        "of 4 stages of the save after an epoch), runs `train.py --resume auto` until it reaches the next",
        "moment, and SIGKILLs it there. \"Epochs saved\" counts the checkpoint folders renamed into place",
        "before the kill, by this run or the ones before it.",
        "",
        "| kill | kind of moment | where the run was | epochs saved | newest checkpoint after the kill |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {r['kill']} | {cell(r['kind'])} | `{cell(r['moment'])}` | {r['finished_epochs']} | "
          + (f"epoch {r['newest_checkpoint_epoch']}, loads |" if r['newest_checkpoint_epoch'] else "none yet |")
          for r in kills],
        "",
    ]
    for title, name, note in [
        ("Graceful stop: SIGTERM, SIGINT", "graceful stop",
         "The signal arrives just before an optimizer step: the run finishes that step, saves a checkpoint and "
         "exits; `--resume auto` continues from that step."),
        ("A rank dies or hangs (torchrun, 2 CPU processes over gloo)", "rank death",
         "`--collective-timeout SECONDS` (default 600) bounds every wait at a collective; a dead peer's closed "
         "connection ends it at once."),
        ("Numerical faults", "numerical", "A finished run resumed for more epochs with `--lr 1e38`."),
        ("Disk", "disk", "A finished run resumed for one more epoch, whose checkpoint cannot be written."),
        ("Safe loading", "safe loading",
         "Weights are read with safetensors, the training state with `torch.load(weights_only=True)`, "
         "config and metrics as JSON."),
    ]:
        out += [f"## {title}", "", note, "", "| fault | what happens | message |", "| --- | --- | --- |"]
        out += [f"| {cell(r['case'])} | {cell(r['outcome'])} | {message(r['message']) if r.get('message') else ''} |"
                for r in records if r["section"] == name]
        for section, what, test, happens, contains in OTHER_EXISTING:
            if section == name:
                nodes = recorder.nodes(test, None)
                said = recorder.said(nodes, contains)
                out.append(f"| {cell(what)} (`{test.split('/')[-1]}`, {passed(nodes)}) | {happens} "
                           f"| {message(said) if said else ''} |")
        out.append("")
    out += ["## Bad inputs", "", "| input | what happens | message | test | result |",
            "| --- | --- | --- | --- | --- |",
            *[f"| {cell(a)} | {cell(b)} | {c} | {d} | {e} |" for a, b, c, d, e in rows],
            ""]
    slow = sorted(((s, n) for n, s in recorder.seconds.items() if "test_reliability" in n), reverse=True)[:6]
    out += ["## Slowest tests of this run", "", "| test | seconds |", "| --- | --- |",
            *[f"| `{cell(n.split('::')[1].split('[')[0])}` | {s:.0f} |" for s, n in slow], ""]
    (ROOT / "docs" / "reliability.md").write_text("\n".join(out))
    print(f"wrote docs/reliability.md: {summary['outcome']}; {refused} refused, {accepted} accepted; "
          f"issue items: {items_refused} refused, {items_accepted} accepted, missing {missing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
