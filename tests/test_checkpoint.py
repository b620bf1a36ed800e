"""The run-folder format: weights with their preprocessing, atomic checkpoints, resume lookup."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixres import checkpoint as ckpt
from fixres import fileio
from tests.conftest import ROOT, environ, niced


def test_weights_round_trip_with_metadata(tmp_path):
    state = {"w": torch.randn(3, 4).t(), "n": torch.tensor(5)}  # non-contiguous on purpose
    fileio.save_weights(tmp_path / "m.safetensors", state, {"model": "x", "test_res": 96})
    loaded, meta = fileio.load_weights(tmp_path / "m.safetensors")
    assert torch.equal(loaded["w"], state["w"]) and meta == {"model": "x", "test_res": 96}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_checkpoints_rotate_and_newest_is_found(tmp_path):
    run = tmp_path / "runs" / "a"
    for epoch in (1, 2, 3):
        ckpt.RunFolder(run).save_checkpoint(name=ckpt.RunFolder.checkpoint_name(epoch, 10 * epoch),
                                            state_dict={"w": torch.ones(1)}, meta={},
                                            training_state={"run": {"epoch": epoch}}, keep=2)
    names = [p.name for p in ckpt.RunFolder(run).checkpoints()]
    assert names == ["epoch-0002-step-000020", "epoch-0003-step-000030"]
    assert ckpt.RunFolder.resolve_resume("auto", tmp_path / "runs").path.name == names[-1]
    assert ckpt.RunFolder.resolve_resume(str(run), tmp_path).path.name == names[-1]
    assert ckpt.RunFolder.read_training_state(ckpt.RunFolder(run).checkpoints()[-1])["run"]["epoch"] == 3


def test_half_written_checkpoint_is_ignored(tmp_path):
    run = tmp_path / "a"
    ckpt.RunFolder(run).save_checkpoint(name="epoch-0001-step-000001", state_dict={"w": torch.ones(1)}, meta={},
                                        training_state={})
    (run / "checkpoints" / ".epoch-0002-step-000002.x.tmp").mkdir()  # what a crash mid-write leaves
    (run / "checkpoints" / "epoch-0003-step-000003").mkdir()          # no state file
    assert [p.name for p in ckpt.RunFolder(run).checkpoints()] == ["epoch-0001-step-000001"]


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    fileio.save_weights(path, {"w": torch.zeros(2)}, {"v": 1})

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(ckpt.CheckpointError, match=f"cannot write {path}: No space left"):
        fileio.save_weights(path, {"w": torch.ones(2)}, {"v": 2})
    monkeypatch.undo()
    assert fileio.load_weights(path)[1] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


@pytest.mark.parametrize("resume, message", [("auto", None), ("/nonexistent/run", "no such run folder")])
def test_resume_lookup_errors(tmp_path, resume, message):
    if message is None:
        assert ckpt.RunFolder.resolve_resume(resume, tmp_path / "empty") is None
    else:
        with pytest.raises(ckpt.CheckpointError, match=message):
            ckpt.RunFolder.resolve_resume(resume, tmp_path)


def test_corrupted_weights_file(tmp_path):
    path = tmp_path / "best.safetensors"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ckpt.CheckpointError, match=f"{path}: unreadable weights"):
        fileio.load_weights(path)


def test_the_run_folder_owns_its_layout(tmp_path):
    """RunFolder: the folder of a weights file (beside it or above checkpoints/<name>/), and
    the rule that a folder holding a run (a checkpoint, or shipped weights) is not written over."""
    run = ckpt.RunFolder(tmp_path / "run")
    assert run.refuse_if_taken() is run  # nothing there yet
    run.start({"seed": 0}, ["a", "b"])
    saved = run.save(epoch=1, step=5, files={"last.safetensors": ({"w": torch.ones(2)}, {"epoch": 1})},
                     training_state={"run": {"epoch": 1}}, records=[{"epoch": 1}])
    assert saved == tmp_path / "run" / "checkpoints" / "epoch-0001-step-000005"
    assert ckpt.RunFolder.holding(saved / ckpt.WEIGHTS_FILE).path == run.path
    assert ckpt.RunFolder.holding(run.path / "last.safetensors").path == run.path
    assert ckpt.RunFolder.holding(tmp_path / "loose.safetensors") is None  # no config.json beside or above
    assert run.read_config() == {"seed": 0} and (run.path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    with pytest.raises(ckpt.CheckpointError, match="already holds a run; continue it with --resume"):
        run.refuse_if_taken()
    shipped = ckpt.RunFolder(tmp_path / "bn-stats")  # a run without checkpoints (bn-stats, parametric)
    shipped.write_weights({"best.safetensors": ({"w": torch.ones(1)}, {})})
    with pytest.raises(ckpt.CheckpointError, match="already holds a run; choose another --name"):
        shipped.refuse_if_taken()
    resumed = ckpt.RunFolder.resolve_resume(str(run.path), tmp_path)  # read once, handed over with its folder
    assert resumed.run_folder.path == run.path and torch.equal(resumed.weights["w"], torch.ones(2))
    assert resumed.training_state["run"] == {"epoch": 1} and resumed.meta == {"epoch": 1}


def test_resume_auto_falls_back_inside_the_newest_run_only(tmp_path):
    """Two runs under one --output; the newer one's newest checkpoint cut in half: --resume auto
    continues the newer run from its checkpoint before, never the other run."""
    out = tmp_path / "runs"
    # two jobs side by side: b's checkpoints before and after a's newest
    for t, (run, epoch) in enumerate([("a", 1), ("b", 1), ("a", 2), ("b", 2)]):
        saved = ckpt.RunFolder(out / run).save_checkpoint(name=ckpt.RunFolder.checkpoint_name(epoch, epoch),
                                                          state_dict={"w": torch.ones(1)}, meta={},
                                                          training_state={"run": {"epoch": epoch}})
        for f in saved.iterdir():  # written in this order, a second apart
            os.utime(f, (1_000_000 + t, 1_000_000 + t))
    state = out / "b" / "checkpoints" / ckpt.RunFolder.checkpoint_name(2, 2) / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    resumed = ckpt.RunFolder.resolve_resume("auto", out)
    assert resumed.path == out / "b" / "checkpoints" / ckpt.RunFolder.checkpoint_name(1, 1)

    # nothing in the chosen run reads: an error naming its newest checkpoint, not the other run
    older = out / "b" / "checkpoints" / ckpt.RunFolder.checkpoint_name(1, 1) / ckpt.WEIGHTS_FILE
    older.write_bytes(b"\x00" * 10)
    with pytest.raises(ckpt.CheckpointError, match=f"^{state}: unreadable training state .*older checkpoint"):
        ckpt.RunFolder.resolve_resume("auto", out)


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_files_and_folders_are_as_readable_as_any_other_output(tmp_path, umask):
    """Whatever the umask: a written file gets 0o666 and a checkpoint folder 0o777, less the
    umask, as open() and mkdir() give, not the private 0o600/0o700 of tempfile's."""
    previous = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain").mkdir()
        fileio.atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
        fileio.write_json_atomic(tmp_path / "b.json", {"x": 1})
        run = ckpt.RunFolder(tmp_path / "run")
        run.start({"seed": 0}, ["a"])
        saved = run.save(epoch=1, step=1, files={"last.safetensors": ({"w": torch.ones(1)}, {"epoch": 1})},
                         training_state={"run": {"epoch": 1}}, records=[{"epoch": 1}])
        folder = fileio.temporary_folder(tmp_path, "timm")  # what the timm export is built in
    finally:
        os.umask(previous)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "plain.txt") == 0o666 & ~umask and mode(tmp_path / "plain") == 0o777 & ~umask
    files = [tmp_path / "a.txt", tmp_path / "b.json", run.path / "config.json", run.path / "classes.json",
             run.path / "metrics.jsonl", run.path / "last.safetensors", saved / ckpt.WEIGHTS_FILE, saved / ckpt.STATE_FILE]
    assert {str(f): mode(f) for f in files} == {str(f): 0o666 & ~umask for f in files}
    assert {mode(saved), mode(saved.parent), mode(run.path), mode(folder)} == {0o777 & ~umask}


def umask_calls_of_imports() -> subprocess.CompletedProcess:
    """A new interpreter that imports fixres.fileio and fixres.checkpoint and prints the os.umask calls made."""
    code = ("import os, sys, torch, safetensors.torch\n"
            "calls = []\n"
            "real = os.umask\n"
            "os.umask = lambda mask: calls.append(mask) or real(mask)\n"
            "import fixres.fileio, fixres.checkpoint\n"
            "print(calls)\n")
    return subprocess.run(niced([sys.executable, "-c", code]), capture_output=True, text=True, cwd=ROOT,
                          env={**environ(), "OMP_NUM_THREADS": "1"}, timeout=120)


def start_early(started, fixtures: set[str], tmp_path_factory, tiny_csv) -> None:
    """conftest's early_runs calls this as the session starts: the new interpreter of
    umask_calls_of_imports, in a thread, on a core this process leaves idle."""
    if "umask_calls" in fixtures:
        started.call("umask_calls", umask_calls_of_imports, real_runs=True)


@pytest.fixture
def umask_calls(early_runs) -> subprocess.CompletedProcess:
    return early_runs["umask_calls"]


@pytest.mark.late
def test_importing_leaves_the_umask_alone(umask_calls):
    """Reading the umask means setting it (os.umask), for the whole process and its threads:
    neither fixres.fileio nor fixres.checkpoint calls it when imported."""
    done = umask_calls
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_temporary_name_already_taken_is_passed_over(tmp_path, monkeypatch):
    (tmp_path / ".x.aaaaaaaa.tmp").write_text("another writer's")
    letters = iter("a" * 8 + "b" * 8)
    monkeypatch.setattr(fileio.secrets, "choice", lambda chars: next(letters))
    assert fileio.temporary_file(tmp_path, "x") == tmp_path / ".x.bbbbbbbb.tmp"
    assert (tmp_path / ".x.aaaaaaaa.tmp").read_text() == "another writer's"
