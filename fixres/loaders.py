"""Datasets, sampling and loaders: (path, label) samples to batches, on any number of processes.

    train_loader, val_loader = build_loaders(split, cfg, train_tf=..., eval_tf=..., workers=worker_count(),
                                             pin_memory=True)

ImageDataset decodes a sample per item (its random augmentation seeded from (seed, epoch,
index) with EpochSampler), MultiSizeDataset one decode for every size of a sweep;
collate_skipping drops and counts undecodable images. round_batches and shard_indices give
each process its part of an evaluation; worker_count is the loader workers' one rule for
train.py, sweep.py and finetune.py. The samples come from fixres/data.py's split; images
are read by fixres/images.py.
"""
from __future__ import annotations

import math
import os

import torch

from fixres.images import BadImageError, open_image


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) samples -> (tensor, label).

    With `seed`, each sample's random augmentation is seeded from (seed, epoch, index),
    so it does not depend on worker count, process count or where a run was resumed.
    The epoch comes with the index: `dataset[(epoch, i)]`, as EpochSampler yields them, so
    that workers kept from one epoch to the next (persistent_workers) seed each sample from
    the epoch the main process hands them, not from a copy of the dataset made when they
    started. A plain index means epoch 0. With `skip_bad`, an undecodable image yields None,
    which `collate_skipping` drops and counts."""

    def __init__(self, samples, transform, skip_bad: bool = False, seed: int | None = None):
        self.samples = samples
        self.transform = transform
        self.skip_bad = skip_bad
        self.seed = seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        path, label = self.samples[i]
        if self.seed is not None:
            # only the CPU generator: torchvision's transforms and fixres's decoders draw from it
            torch.random.default_generator.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
        try:
            if getattr(self.transform, "takes_path", False):  # decodes the file itself (DecodeRandomResizedCrop)
                return self.transform(path), label
            img = open_image(path)
        except BadImageError:
            if self.skip_bad:
                return None
            raise
        return self.transform(img), label


def collate_skipping(batch):
    """Default collation over the decodable samples, plus how many were skipped. Samples of
    a type with a `collate` (fixres.device_decode.DeviceSample: file bytes to decode on the
    device) collate themselves."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    collate_own = getattr(type(good[0][0]), "collate", None)
    if collate_own is not None:
        return collate_own([image for image, _ in good]), torch.tensor([label for _, label in good]), skipped
    images, labels = torch.utils.data.default_collate(good)
    return images, labels, skipped


class EpochSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): every rank draws the same one
    (Accelerate then gives each rank its own batches), and a resumed run redraws it.
    Yields (epoch, index) pairs for ImageDataset: the epoch travels with each index to the
    loader workers, which may have started in an earlier epoch. `order()` is the bare
    permutation."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in self.order())


# Batches each loader worker keeps ready ahead of the training step (DataLoader's
# prefetch_factor): PyTorch's default; docs/benchmarks.md compares 4
PREFETCH_BATCHES = 2


class MultiSizeDataset(torch.utils.data.Dataset):
    """(path, label) samples -> ([one tensor per transform], label) from a single decode."""

    def __init__(self, samples, transforms):
        self.samples, self.transforms = samples, transforms

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = open_image(path)  # the only decode of this image in a sweep (tests count the calls)
        return [transform(img) for transform in self.transforms], label


def loader_options(workers: int, *, persistent: bool = True, prefetch: int = PREFETCH_BATCHES) -> dict:
    """DataLoader keyword arguments for `workers` worker processes. `persistent`: the workers
    stay from one pass over the loader to the next (each epoch's training and evaluation)
    instead of being started again, which costs a process start and the first batches'
    wait per pass; loaders read once (the sweep) gain nothing from it."""
    if workers == 0:
        return {"num_workers": 0}
    return {"num_workers": workers, "persistent_workers": persistent, "prefetch_factor": prefetch}


def round_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This process's batch of every round over range(n): round k is batches k*world .. k*world +
    world - 1, and batch b goes to process b mod world. No index is repeated or dropped, so
    the last round may leave a process a partial or an empty batch; every process has
    ceil(n / (batch_size * world)) rounds, and a round holds the same images whatever `world`
    is for the same batch_size * world."""
    rounds = math.ceil(n / (batch_size * world))
    starts = ((k * world + rank) * batch_size for k in range(rounds))
    return [list(range(min(start, n), min(start + batch_size, n))) for start in starts]


def shard_indices(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """This process's samples: whole batches b = rank, rank + world, ... of range(n)."""
    return [i for batch in round_batches(n, batch_size, rank, world) for i in batch]


def worker_count(requested: int | None = None) -> int:
    """Loader workers per process, the one rule of train.py, sweep.py and finetune.py:
    `requested` (--workers) when given; else the cores this process may use, shared among the
    processes of this node (torchrun and accelerate set LOCAL_WORLD_SIZE), less one
    core for the process itself, at most 16 (docs/benchmarks.md: the fast decoder's rate up to 16)."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(16, cores // max(1, local_processes) - 1))


def build_loaders(split, cfg, *, train_tf, eval_tf, workers: int, pin_memory: bool,
                  persistent: bool = True, prefetch: int = PREFETCH_BATCHES):
    """The training and validation loaders. Their workers stay from epoch to epoch
    (`persistent`; benchmarks/speed/speed.py --parts epochs measures it against re-created ones):
    the training epoch reaches them with each index (EpochSampler)."""
    common = dict(collate_fn=collate_skipping, pin_memory=pin_memory,
                  **loader_options(workers, persistent=persistent, prefetch=prefetch))
    train_loader = torch.utils.data.DataLoader(
        ImageDataset(split.train, train_tf, cfg.skip_bad_images, seed=cfg.seed), batch_size=cfg.batch_size,
        sampler=EpochSampler(len(split.train), cfg.seed), drop_last=True, **common)
    val_loader = torch.utils.data.DataLoader(
        ImageDataset(split.val, eval_tf, cfg.skip_bad_images), batch_size=2 * cfg.batch_size,
        shuffle=False, **common)
    return train_loader, val_loader
