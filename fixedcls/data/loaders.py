"""Loaders: how a `DataBundle`'s samples reach the model, reproducibly.

Every training sample's augmentation is seeded from (seed, epoch, index) and every epoch's order
from (seed, epoch), so a run resumed in the middle of an epoch sees exactly the batches and the
augmented images that an uninterrupted run would have seen, whatever the number of workers.  The
training sampler hands each index over together with its epoch (`EpochIndex`), so loader workers that
persist across epochs (they hold a copy of the dataset made when they started) still augment for the
right epoch.
"""
from __future__ import annotations

import math
import random
from typing import Iterator, NamedTuple, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import DataBundle, targets_of


class EpochIndex(NamedTuple):
    """A training sample's key as the sampler hands it to the dataset: which sample, in which epoch.

    The epoch travels with the index because a DataLoader worker keeps the copy of the dataset it started
    with: with persistent workers, an epoch set on the dataset in the main process would never reach it."""

    epoch: int
    index: int


class SeededAugmentation(Dataset):
    """Applies a random transform whose randomness depends only on (seed, epoch, index).

    torchvision and timm transforms draw from the global torch and Python RNGs; we fork both
    around each sample so the transform is reproducible and the caller's RNG state is untouched.
    Indexed by an `EpochIndex` (what `EpochSampler(carry_epoch=True)` yields) the sample gets that epoch's
    augmentation; a plain integer index gets the epoch of `set_epoch` (0 until set), in this process only.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain integer indices. A DataLoader's workers never see it: the training loader's
        sampler hands each index over with its epoch instead."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Union[EpochIndex, int]):
        epoch, index = (key.epoch, key.index) if isinstance(key, EpochIndex) else (self.epoch, key)
        sample_seed = hash((self.seed, int(epoch), int(index))) & 0x7FFF_FFFF_FFFF_FFFF
        python_state = random.getstate()
        random.seed(sample_seed)
        try:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only (what the transforms draw from): torch.manual_seed would also queue a
                # lazy reseed of every CUDA/XPU/MTIA generator per sample (a stack capture each, ~15% of a CPU
                # epoch) and, with CUDA up, reseed the GPU generators that fork_rng(devices=[]) does not restore.
                torch.default_generator.manual_seed(sample_seed)
                return self.dataset[index]
        finally:
            random.setstate(python_state)

    @property
    def targets(self):
        return targets_of(self.dataset)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded across processes, that can start mid-epoch.

    Like torch's DistributedSampler (pads to equal shards so every rank runs the same number of
    steps), plus `start`: the number of this rank's samples already consumed, for exact resume.
    `carry_epoch`: yield `EpochIndex(epoch, index)` keys instead of plain indices, for a `SeededAugmentation`
    read by persistent workers (`epoch_indices` stays plain).
    """

    def __init__(self, length: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: Optional[int] = None, carry_epoch: bool = False):
        self.length, self.shuffle, self.seed, self.carry_epoch = length, shuffle, seed, carry_epoch
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        # Training pads shards to equal length (every rank must run the same number of steps);
        # evaluation shards are disjoint and unpadded so each sample is measured exactly once.
        self.pad = shuffle
        self.num_samples = math.ceil(length / world_size) if self.pad else len(range(rank, length, world_size))
        # A training batch of one sample stops BatchNorm ("Expected more than 1 value per channel"): that
        # epoch's last sample is left out instead (a new permutation every epoch, so never the same one).
        if self.pad and batch_size and self.num_samples > 1 and self.num_samples % batch_size == 1:
            self.num_samples -= 1

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        if self.pad:
            total = self.num_samples * self.world_size
            order = (order + order[: max(0, total - self.length)])[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Union[int, EpochIndex]]:
        indices = self.epoch_indices()[self.start :]
        if self.carry_epoch:
            return (EpochIndex(self.epoch, index) for index in indices)
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


def create_loaders(
    bundle: DataBundle, *, batch_size: int, eval_batch_size: int, num_workers: int = 0, seed: int = 0,
    rank: int = 0, world_size: int = 1, pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train loader (seeded order and augmentation per epoch), train-eval and test loaders (sharded in DDP).

    Worker processes (num_workers > 0) persist across epochs: the train sampler hands every index over with its
    epoch, so a worker started in epoch 1 still augments epoch 7's samples as epoch 7."""
    train_set = SeededAugmentation(bundle.train, seed)
    # Each loader gets a private generator: without one, every `iter(loader)` draws its workers' base
    # seed from the global torch RNG, so a run resumed mid-epoch (one extra iter) would see other dropout masks.
    train = DataLoader(
        train_set, batch_size=batch_size, drop_last=False,
        sampler=EpochSampler(len(train_set), shuffle=True, seed=seed, rank=rank, world_size=world_size,
                             batch_size=batch_size, carry_epoch=True),
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )

    def eval_loader(dataset):
        return create_eval_loader(dataset, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
                                  rank=rank, world_size=world_size, pin_memory=pin_memory)

    return train, eval_loader(bundle.train_eval), eval_loader(bundle.test)


def stop_workers(*loaders: Optional[DataLoader]) -> None:
    """End the worker processes that persistent loaders keep; iterating such a loader again starts new ones.

    torch ends them only when the loader's iterator is garbage collected, and a finished run's objects can wait
    for the cycle collector: a sweep of runs in one process would pile up idle workers meanwhile."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # torch keeps a persistent loader's one iterator there
        if iterator is not None:
            iterator._shutdown_workers()
            loader._iterator = None


def create_eval_loader(dataset: Dataset, *, eval_batch_size: int, num_workers: int = 0, seed: int = 0, rank: int = 0,
                       world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """An evaluation loader (fixed order; sharded without padding in DDP): train-eval, validation, test.
    Its workers persist across epochs (the evaluation views hold no per-epoch state)."""
    sampler = EpochSampler(len(dataset), shuffle=False, rank=rank, world_size=world_size) if world_size > 1 else None
    return DataLoader(dataset, batch_size=eval_batch_size, shuffle=False, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))
