"""Files written whole or not at all, and weights files with their preprocessing metadata.

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))   # a temporary name, then a rename
    write_json_atomic(path, obj)
    save_weights(path, state_dict, meta)                        # safetensors, meta under the key "fixres"
    state_dict, meta = load_weights(path)
    meta = read_metadata(path)                                  # without reading the tensors

A temporary file or folder is created in the target's folder under a hidden name
(".<name>.<random>.tmp", what RunFolder.remove_temporaries clears) with the mode of any other
output: 0o666 for a file and 0o777 for a folder, less the process's umask, which the
system applies; nothing here reads or sets the umask. Failed writes raise WriteError with
the OS's reason ("No space left on device").
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

import torch

from fixres.runtime import error_reason

META_KEY = "fixres"
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # tempfile's


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be used; the message names the path."""


class WriteError(CheckpointError):
    """A file that could not be written (no space, no permission, ...)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = path, reason


def failure_reason(err: BaseException) -> str:
    """The OS's words for a failed write ("No space left on device"), wherever a library put them."""
    if getattr(err, "strerror", None):
        return err.strerror
    text = error_reason(err)
    found = re.search(r"I/O error: (.+?) \(os error \d+\)", text)  # safetensors' wording
    return found.group(1) if found else re.split(r"(?<=[a-z])\. ", text)[0]  # the first sentence


def _create_hidden(folder: Path, name: str, create) -> Path:
    """`create(path)` on a new name ".<name>.<8 random characters>.tmp" in `folder`, as
    tempfile names them; a name already taken is passed over."""
    for _ in range(10000):
        path = Path(folder) / f".{name}.{''.join(secrets.choice(_NAME_CHARS) for _ in range(8))}.tmp"
        try:
            create(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name in {folder}")


def temporary_file(folder: Path, name: str) -> Path:
    """A new empty file beside `name`, as readable as any other output (0o666 less the umask)."""
    return _create_hidden(folder, name, lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def temporary_folder(folder: Path, name: str) -> Path:
    """A new empty folder beside `name`, as readable as any other output (0o777 less the umask)."""
    return _create_hidden(folder, name, lambda p: os.mkdir(p, 0o777))


class _KeepWriteError:
    """A file that remembers why a write failed: torch.save reports a full disk as
    "unexpected pos 704 vs 598", whether it writes to a path or to a file object."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        self.f.flush()


def torch_save(obj, path) -> None:
    """torch.save(obj, path), a full disk reported as the OSError it is."""
    with open(path, "wb") as raw:
        f = _KeepWriteError(raw)
        try:
            torch.save(obj, f)
        except Exception:
            if f.error is not None:
                raise f.error from None
            raise


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` to a temporary file beside `path`, then renamed to `path`: a crash leaves
    the previous file as it was. Any error but an interrupt becomes a WriteError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_file(path.parent, path.name)
        mode = tmp.stat().st_mode & 0o777  # what the umask left; kept should `write` create the file anew
    except OSError as err:
        raise WriteError(path, failure_reason(err)) from None
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # torch.save and safetensors report a full disk as RuntimeError or SafetensorError
        if isinstance(err, Exception):
            raise WriteError(path, failure_reason(err)) from None
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
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        reason = "no such weights file" if not path.is_file() else f"unreadable weights ({error_reason(err)})"
        raise CheckpointError(f"{path}: {reason}") from None
    return state, meta


def read_metadata(path: Path, *, strict: bool = False) -> dict:
    """The fixres metadata of a weights file, without reading its tensors; {} for a file
    without it (plain safetensors). A file that cannot be read (a .pth, a truncated file) gives
    {} too, or with `strict` a one-line CheckpointError."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except Exception as err:
        if strict:
            raise CheckpointError(f"{path}: unreadable weights ({failure_reason(err)})") from None
        return {}


def update_metadata(path: Path, **changes) -> dict:
    """Rewrite a weights file's metadata with `changes` (the tensors unchanged, the file
    replaced atomically); returns the new metadata."""
    state, meta = load_weights(path)
    meta = {**meta, **changes}
    save_weights(Path(path), state, meta)
    return meta


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # no copy: the file is replaced by rename, never written in place
    except OSError:
        shutil.copyfile(source, target)  # a file system without hard links


def refused_pickle(err: Exception) -> str | None:
    """What torch.load(weights_only=True) refused, in one line; None for other errors."""
    if "Weights only load failed" not in str(err):
        return None
    found = re.search(r"GLOBAL (\S+)", str(err))
    return (f"refused: it holds pickled Python objects{f' (it would call {found.group(1)})' if found else ''}, "
            f"not only tensors and plain values; nothing was loaded or run")
