"""The one run-folder format, and the one place that writes it.

    runs/<name>/
      config.json          resolved config of the job that made the run
      classes.json         class names, in the classifier's order
      metrics.jsonl        one JSON record per epoch
      last.safetensors     newest weights; the preprocessing they expect is in the
      best.safetensors     file's metadata (key "fixres"): model, classes, train_res,
                           test_res, crop_pct, interpolation, mean, std
      checkpoints/epoch-0003-step-000120/
        model.safetensors  weights + metadata, as above
        state.pt           optimizer, epoch, step and RNG states (tensors and plain
                           Python values only, read with torch.load(weights_only=True))

Every file is written to a temporary name and renamed, and a checkpoint folder is
built under a temporary name and renamed, so a crash at any moment leaves the
previous complete checkpoint readable.

    from fixres.checkpoint import load_weights
    state_dict, meta = load_weights("runs/shapes-resnet18/best.safetensors")
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# mkstemp/mkdtemp create private files; a run folder should be as readable as any other output
_UMASK = os.umask(0)
os.umask(_UMASK)
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_KEY = "fixres"


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be used; the message names the path."""


def atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None
        raise


def write_json_atomic(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def save_weights(path: Path, state_dict: dict, meta: dict) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)}))


def load_weights(path: Path) -> tuple[dict, dict]:
    """(state_dict, preprocessing metadata) from a .safetensors file written by save_weights;
    plain safetensors files without metadata give an empty dict."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable weights ({str(err).splitlines()[0][:160]})") from None
    return state, meta


def checkpoint_name(epoch: int, step: int) -> str:
    return f"epoch-{epoch:04d}-step-{step:06d}"


def save_checkpoint(run_dir: Path, *, name: str, state_dict: dict, meta: dict,
                    training_state: dict, keep: int = 2) -> Path:
    """Write checkpoints/<name>/ atomically, then drop all but the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        save_weights(tmp / WEIGHTS_FILE, state_dict, meta)
        atomic_write(tmp / STATE_FILE, lambda p: torch.save(training_state, p))
        os.chmod(tmp, 0o777 & ~_UMASK)
        if final.exists():  # the same step saved again (e.g. a signal right after an epoch end)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (names sort by epoch, then step)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / STATE_FILE).is_file()
                  and (p / WEIGHTS_FILE).is_file())


def newest_checkpoint(output: Path) -> Path | None:
    """The most recently written complete checkpoint of any run under `output`."""
    output = Path(output)
    if not output.is_dir():
        return None
    found = [c for run in output.iterdir() if run.is_dir() for c in list_checkpoints(run)]
    return max(found, key=lambda c: (c / STATE_FILE).stat().st_mtime, default=None)


def resolve_resume(resume: str, output: Path) -> Path | None:
    """--resume: 'auto' (newest under output, or None), a run folder, or a checkpoint folder."""
    if resume == "auto":
        return newest_checkpoint(output)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1]
        raise CheckpointError(f"--resume {path}: the run folder holds no complete checkpoint")
    raise CheckpointError(f"--resume {path}: no such run folder or checkpoint")


def load_training_state(checkpoint: Path) -> dict:
    try:
        return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{checkpoint / STATE_FILE}: unreadable training state "
                              f"({str(err).splitlines()[0][:160]})") from None


def find_weights(path: Path, which: str = "best") -> Path:
    """A weights file from a run folder (best, else last), a checkpoint folder, or the file itself."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / f"{which}.safetensors", path / "last.safetensors", path / WEIGHTS_FILE):
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise CheckpointError(f"{path}: holds no weights (best.safetensors, last.safetensors or {WEIGHTS_FILE})")
    raise CheckpointError(f"{path}: no such checkpoint folder or file")
