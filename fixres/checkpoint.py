"""The one run-folder format, and the one place that writes it.

    runs/<name>/
      config.json          resolved config of the job that made the run
      classes.json         class names, in the classifier's order
      metrics.jsonl        one JSON record per epoch
      last.safetensors     newest weights; the preprocessing they expect is in the
      best.safetensors     file's metadata (key "fixres"): model, classes, train_res,
                           test_res, crop_pct, interpolation, mean, std; after sweep.py
                           --write-best also test_crop_pct (the crop ratio to test at)
      ema.safetensors      with --model-ema: the weights' moving average (metadata "ema": true);
                           best.safetensors is then the raw or the EMA weights of the best
                           epoch, whichever scored higher (its "ema" says which)
      timm/                the best weights in timm's Hub layout (fixres/export.py):
                           timm.create_model("local-dir:runs/<name>/timm", pretrained=True)
      checkpoints/epoch-0003-step-000120/
        model.safetensors  weights + metadata, as above
        state.pt           optimizer, epoch, batch, step, best score, records and the EMA
                           (tensors and plain values only, read with torch.load(weights_only=True));
                           no RNG state: the data order and augmentation are functions of
                           (seed, epoch, sample), see fixres/training.py
        best-so-far.safetensors
                           when an earlier epoch is the best: best.safetensors as it was (a hard
                           link where the file system allows), so that a resume from here can put
                           it back after a later epoch, which the resume discards, replaced it

Every file is written to a temporary name and renamed, and a checkpoint folder is
built under a temporary name and renamed, so a crash at any moment leaves the
previous complete checkpoint readable (fixres/fileio.py writes the files). `RunFolder` is
the one owner of that layout: its paths, whether a folder holds a run, finding runs,
checkpoints and weights, every write, pruning, and putting files back on a resume.

    from fixres.checkpoint import RunFolder
    from fixres.fileio import load_weights
    state_dict, meta = load_weights("runs/shapes-resnet18/best.safetensors")
    RunFolder.holding("runs/shapes-resnet18/checkpoints/epoch-0003-step-000120/model.safetensors")
    RunFolder.newest("runs", trained_only=True)          # train.py's run written last
    RunFolder.find_weights("runs/shapes-resnet18")       # its best.safetensors (--checkpoint)
    RunFolder.resolve_resume("auto", "runs", name="shapes-resnet18")   # its newest checkpoint, read
    RunFolder("runs/shapes-resnet18").checkpoints()      # complete checkpoints, oldest first
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fixres import fileio
from fixres.fileio import CheckpointError, WriteError

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
BEST_SO_FAR_FILE = "best-so-far.safetensors"


@dataclass
class Checkpoint:
    """A checkpoint as read for resuming: read once, when it is chosen, and handed over."""
    path: Path
    weights: dict          # the model's state dict
    meta: dict             # the weights' fixres metadata
    training_state: dict   # optimizer, "run" (fixres.training.RunState's fields), "ema"

    @property
    def run_folder(self) -> RunFolder:
        return RunFolder(self.path.parent.parent)


class RunFolder:
    """runs/<name>/, the layout at the top of this module: its paths, whether it holds a run,
    finding runs and checkpoints, and every write to it (as timm's CheckpointSaver owns its files)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    # finding: a run, a checkpoint or a weights file from what a user gave

    @classmethod
    def holding(cls, weights: Path | str) -> RunFolder | None:
        """The run folder of a weights file: beside it, or above checkpoints/<name>/."""
        weights = Path(weights)
        for folder in (weights.parent, weights.parent.parent.parent):
            if (folder / "config.json").is_file():
                return cls(folder)
        return None

    @classmethod
    def newest(cls, folder: Path | str, *, trained_only: bool = False) -> RunFolder:
        """The run folder under `folder` (one holding config.json and best.safetensors or
        last.safetensors) whose weights were written last; with trained_only, train.py's runs
        only (a fine-tuning run's config names the --checkpoint it came from)."""
        folder = Path(folder)
        written = {}
        for run in sorted(folder.iterdir()) if folder.is_dir() else ():
            weights = [run / f"{which}.safetensors" for which in ("best", "last")
                       if (run / f"{which}.safetensors").is_file()]
            if not weights or not (run / "config.json").is_file():
                continue
            if trained_only:
                try:
                    if json.loads((run / "config.json").read_text()).get("checkpoint"):
                        continue
                except (OSError, ValueError):
                    continue  # not a run this job can read
            written[run] = max(w.stat().st_mtime for w in weights)
        if not written:
            kind = "train.py run" if trained_only else "run"
            raise CheckpointError(f"--checkpoint not given, and {folder}/ holds no {kind} (a folder with config.json and "
                                  f"best.safetensors or last.safetensors): give --checkpoint")
        return cls(max(written, key=written.get))

    @classmethod
    def resolve_resume(cls, resume: str, output: Path | str, name: str | None = None) -> Checkpoint | None:
        """--resume: 'auto', a run folder, or a checkpoint folder, read. 'auto' is the newest
        checkpoint of the run called `name` under output when a name is given (what a requeued
        SLURM job needs: its own run, not another job's), else of the run under output that wrote
        a checkpoint last; None when there is none. A run's newest checkpoint that cannot be read
        (truncated, corrupted) is passed over for the one before in the same run, with a warning;
        a checkpoint folder given is taken as is."""
        if resume == "auto":
            folder = cls(Path(output) / name) if name else cls._last_checkpointed(Path(output))
            return folder.newest_checkpoint() if folder else None
        path = Path(resume)
        if (path / STATE_FILE).is_file():
            return cls.read_checkpoint(path)
        if path.is_dir():
            found = cls(path).newest_checkpoint()
            if found:
                return found
            raise CheckpointError(f"--resume {path}: the run folder holds no complete checkpoint")
        raise CheckpointError(f"--resume {path}: no such run folder or checkpoint")

    @classmethod
    def _last_checkpointed(cls, output: Path) -> RunFolder | None:
        """The run under `output` that wrote a checkpoint last, chosen from the files' times
        alone: a newest checkpoint that cannot be read is passed over (newest_checkpoint) only
        for an older one of the same run, never for another run's."""
        runs = [cls(run) for run in output.iterdir() if run.is_dir()] if output.is_dir() else []
        runs = [run for run in runs if run.checkpoints()]
        if not runs:
            return None
        return max(runs, key=lambda run: max((c / STATE_FILE).stat().st_mtime for c in run.checkpoints()))

    @staticmethod
    def find_weights(path: Path | str, which: str = "best") -> Path:
        """A weights file from a run folder (best, else last; or ema, which has no stand-in), a
        checkpoint folder, or the file itself."""
        path = Path(path)
        if path.is_file():
            return path
        if which == "ema" and path.is_dir():
            if not (path / "ema.safetensors").is_file():
                raise CheckpointError(f"{path}: holds no ema.safetensors (a run trained with --model-ema has one)")
            return path / "ema.safetensors"
        for candidate in (path / f"{which}.safetensors", path / "last.safetensors", path / WEIGHTS_FILE):
            if candidate.is_file():
                return candidate
        if path.is_dir():
            raise CheckpointError(f"{path}: holds no weights (best.safetensors, last.safetensors or {WEIGHTS_FILE})")
        raise CheckpointError(f"{path}: no such checkpoint folder or file")

    @classmethod
    def classifier_metadata(cls, path: Path | str) -> dict:
        """The fixres metadata of the weights a path names (find_weights), for a job that needs a
        fixres classifier; a one-line error when they cannot be read or are not one."""
        weights = cls.find_weights(Path(path))
        meta = fileio.read_metadata(weights, strict=True)
        if not (meta.get("model") and meta.get("classes") and meta.get("train_res")):
            raise CheckpointError(f"--checkpoint {weights}: not a classifier trained by fixres (its metadata names no "
                                  f"model, classes and train_res); give a run folder written by train.py")
        return meta

    # reading

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints of the run, oldest first (names sort by epoch, then step)."""
        root = self.path / "checkpoints"
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / STATE_FILE).is_file()
                      and (p / WEIGHTS_FILE).is_file())

    def newest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint that reads, saying on stderr which newer ones were passed over
        and why; None when there is none, an error when none reads."""
        skipped = []
        for candidate in reversed(self.checkpoints()):
            try:
                checkpoint = self.read_checkpoint(candidate)
            except CheckpointError as err:
                skipped.append(str(err))
                continue
            if skipped:
                print(f"warning: --resume: passed over the newer checkpoint(s) that cannot be read "
                      f"({'; '.join(skipped)}); resuming from {candidate}", file=sys.stderr, flush=True)
            return checkpoint
        if len(skipped) > 1:
            raise CheckpointError(f"{skipped[0]} (the {len(skipped) - 1} older checkpoint(s) cannot be read either)")
        if skipped:
            raise CheckpointError(skipped[0])
        return None

    @classmethod
    def read_checkpoint(cls, path: Path | str) -> Checkpoint:
        """Weights and training state of a checkpoint folder; a one-line CheckpointError naming
        the file when either cannot be read (truncated, corrupted, a refused pickle)."""
        path = Path(path)
        weights, meta = fileio.load_weights(path / WEIGHTS_FILE)
        return Checkpoint(path, weights, meta, cls.read_training_state(path))

    @staticmethod
    def read_training_state(checkpoint: Path | str) -> dict:
        """The optimizer and loop state, unpickled with weights_only=True: tensors, numbers,
        strings and containers only, so a tampered file cannot run code when it is read."""
        path = Path(checkpoint) / STATE_FILE
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            reason = fileio.refused_pickle(err) or f"unreadable training state ({fileio.failure_reason(err)})"
            raise CheckpointError(f"{path}: {reason}") from None

    def read_config(self) -> dict:
        path = self.path / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: cannot read ({err})") from None

    def refuse_if_taken(self) -> RunFolder:
        """A folder that holds a run (a checkpoint, or shipped weights) is never written over."""
        if self.checkpoints():
            raise CheckpointError(f"{self.path} already holds a run; continue it with --resume {self.path} "
                                  f"or choose another --name")
        if (self.path / "best.safetensors").exists():
            raise CheckpointError(f"{self.path} already holds a run; choose another --name")
        return self

    # writing

    @staticmethod
    def checkpoint_name(epoch: int, step: int) -> str:
        return f"epoch-{epoch:04d}-step-{step:06d}"

    @staticmethod
    def epoch_weights_files(meta: dict, weights: dict, ema_weights: dict | None, record: dict | None,
                            best: str | None) -> dict[str, tuple[dict, dict]]:
        """{file name: (state dict, metadata)} that a save writes beside the checkpoint:
        last.safetensors (the raw weights), ema.safetensors (with --model-ema) and, when `best`
        says which of the two ("raw", "ema") is the run's best so far, best.safetensors.
        `record`: the epoch's, None for a stop in the middle of an epoch."""
        at = {"epoch": record["epoch"], "val_acc": record["val_acc"]} if record else {}
        files = {"last.safetensors": (weights, {**meta, **at, **({"ema": False} if ema_weights is not None else {})})}
        if ema_weights is not None:
            files["ema.safetensors"] = (ema_weights, {**meta, **at, "ema": True,
                                                      **({"val_acc": record["ema_val_acc"]} if record else {})})
        if best:
            files["best.safetensors"] = files["ema.safetensors" if best == "ema" else "last.safetensors"]
        return files

    def start(self, config: dict, classes: list[str]) -> None:
        """Before a job writes anything else: the folder, rid of what a killed writer left,
        with the job's config and class names."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.remove_temporaries()
        self.write_config(config)
        fileio.write_json_atomic(self.path / "classes.json", classes)

    def remove_temporaries(self) -> None:
        """Delete the temporary files and folders a killed writer left in the run folder (names
        starting with '.' and ending in '.tmp'); call it before anything writes there."""
        for folder in (self.path, self.path / "checkpoints"):
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)

    def write_config(self, config: dict) -> None:
        fileio.write_json_atomic(self.path / "config.json", config)

    def write_metrics(self, records: list[dict]) -> None:
        """metrics.jsonl: one record per epoch (rewritten whole: a resume drops what a crash left past its checkpoint)."""
        text = "".join(json.dumps(r) + "\n" for r in records)
        fileio.atomic_write(self.path / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))

    def write_weights(self, files: dict[str, tuple[dict, dict]]) -> None:
        for name, (state_dict, meta) in files.items():
            fileio.save_weights(self.path / name, state_dict, meta)

    def save(self, *, epoch: int, step: int, files: dict[str, tuple[dict, dict]], training_state: dict,
             records: list[dict]) -> Path:
        """A checkpoint first (the source of truth for resume), then the files derived from it:
        metrics.jsonl and the weights files (epoch_weights_files)."""
        weights, meta = files["last.safetensors"]
        best = self.path / "best.safetensors"
        # an earlier epoch's best, kept with the checkpoint (restore_best); this epoch's own is
        # rebuilt from the checkpoint's weights and EMA
        kept = {BEST_SO_FAR_FILE: best} if "best.safetensors" not in files and best.is_file() else {}
        saved = self.save_checkpoint(name=self.checkpoint_name(epoch, step), state_dict=weights, meta=meta,
                                     training_state=training_state, kept_files=kept)
        self.write_metrics(records)
        self.write_weights(files)
        return saved

    def save_checkpoint(self, *, name: str, state_dict: dict, meta: dict, training_state: dict, keep: int = 2,
                        kept_files: dict[str, Path] | None = None) -> Path:
        """Write checkpoints/<name>/ atomically, then drop all but the newest `keep`. A failed
        write leaves the earlier checkpoints as they were; the error names the folder.
        `kept_files`: {name in the checkpoint: file} linked (or copied) into it as they are."""
        root = self.path / "checkpoints"
        final = root / name
        previous = self.checkpoints()
        tmp = None
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = fileio.temporary_folder(root, name)
            fileio.save_weights(tmp / WEIGHTS_FILE, state_dict, meta)
            fileio.atomic_write(tmp / STATE_FILE, lambda p: fileio.torch_save(training_state, p))
            for file_name, source in (kept_files or {}).items():
                fileio.link_or_copy(source, tmp / file_name)
            if final.exists():  # the same step saved again (e.g. a signal right after an epoch end)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException as err:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(err, (OSError, WriteError)):
                raise
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint"
            raise WriteError(final, f"{getattr(err, 'reason', None) or fileio.failure_reason(err)}; {kept}") from None
        self.prune(keep)
        return final

    def prune(self, keep: int) -> None:
        """All but the newest `keep` checkpoints deleted, each hidden first, so that a delete cut
        short leaves nothing that looks like a checkpoint; one that cannot be is left (housekeeping)."""
        for old in self.checkpoints()[:-keep]:
            trash = old.with_name(f".{old.name}.old.tmp")
            try:
                if trash.exists():
                    shutil.rmtree(trash)
                os.replace(old, trash)
            except OSError:
                continue  # pruning is housekeeping: the new checkpoint is saved
            shutil.rmtree(trash, ignore_errors=True)

    # putting back, on a resume, what a crash after the checkpoint left behind

    def restore_weights_files(self, files: dict[str, tuple[dict, dict]], epoch: int | None) -> None:
        """The weights files as the save of an end-of-epoch checkpoint left them, when a crash
        came after the checkpoint and before them (their metadata says which epoch they hold)."""
        if epoch is None:  # a checkpoint from the middle of an epoch
            return
        for name, (state_dict, meta) in files.items():
            if fileio.read_metadata(self.path / name).get("epoch") != epoch:  # None when missing or unreadable
                fileio.save_weights(self.path / name, state_dict, meta)

    def restore_best(self, checkpoint: Path, epoch: int | None) -> None:
        """best.safetensors back to the weights of `epoch` (the best of the resumed records), as
        `checkpoint` kept them, when an epoch after the checkpoint replaced it: a resume that
        passed over a newer checkpoint trains that epoch again and may score lower."""
        best = self.path / "best.safetensors"
        if epoch is None or fileio.read_metadata(best).get("epoch") == epoch:
            return
        kept = Path(checkpoint) / BEST_SO_FAR_FILE
        if fileio.read_metadata(kept).get("epoch") == epoch:
            fileio.atomic_write(best, lambda tmp: shutil.copyfile(kept, tmp))
        else:  # a checkpoint written before fixres kept the best beside it
            print(f"warning: --resume: {best} does not hold epoch {epoch}, the best of the epochs resumed, and "
                  f"{checkpoint} keeps no copy of it; it stays as it is until an epoch scores higher",
                  file=sys.stderr, flush=True)
