"""The torchvision backend: a ``DataLoader`` over an image folder or file list, decoded by PIL in
worker processes, with the same augmentations as the DALI pipelines (random resized crop and flip
for training, then :mod:`~afd_fast.data.augment`'s policy and random erasing; resize and centre crop
for validation). Order and augmentation depend on (seed,
epoch, sample) alone, so an epoch resumed at any batch continues exactly."""
from __future__ import annotations

import atexit
import itertools
import multiprocessing
import os
import signal

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets, transforms

from afd_fast.data.augment import Preparation, torch_train_ops
from afd_fast.data.folder import BadDataError, FileList
from afd_fast.data.loaders import IMAGENET_MEAN, IMAGENET_STD, Loaders, calibration_indices


class _ListDataset(torch.utils.data.Dataset):
    """Item ``i``, or ``(i, seed)``: the random transforms of that sample draw from ``seed`` (torch's
    CPU generator seeded for this sample alone), whichever worker process decodes it."""

    def __init__(self, file_list: FileList, transform):
        self.file_list, self.transform = file_list, transform

    def __len__(self):
        return len(self.file_list.files)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        path = self.file_list.files[i]
        try:
            image = datasets.folder.default_loader(path)
        except OSError as e:  # PIL: truncated or undecodable
            raise BadDataError(f"{path!r} cannot be decoded ({e}); leave such files out with "
                               "--verify-images --skip-bad-files") from None
        if seed is None:
            return self.transform(image), self.file_list.labels[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), self.file_list.labels[i]


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of a training epoch as ``(index, augmentation seed)`` items, from
    sample ``start`` on. The order is DistributedSampler's (a permutation drawn from seed + epoch,
    split by stride, the remainder dropped); a sample's augmentation seed depends on (seed, epoch,
    index) alone. So the epoch resumed at any batch, with any number of loader workers, continues
    with the same images in the same order with the same crops and flips."""

    def __init__(self, size: int, world: int, rank: int, seed: int):
        self.order = DistributedSampler(range(size), world, rank, shuffle=True, seed=seed, drop_last=True)
        self.seed, self.epoch, self.start = seed, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return max(self.order.num_samples - self.start, 0)

    def __iter__(self):
        for i in itertools.islice(iter(self.order), self.start, None):
            yield i, ((self.seed * 1_000_003 + self.epoch) * 100_000_007 + i) % 2**63


class _WorkerSignals:
    """``worker_init_fn``: loader workers leave SIGTERM and SIGUSR1 to the training process (a
    scheduler may signal every process of the job; the trainer finishes its step and saves, which
    needs its workers alive). A SIGTERM once the training process is exiting (multiprocessing's
    clean-up terminates daemonic workers at exit) ends the worker."""

    def __init__(self):
        self.exiting = multiprocessing.Event()
        atexit.register(self.exiting.set)  # runs before multiprocessing's own clean-up (registered earlier)

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if self.exiting.is_set():
            os._exit(0)


class TorchLoaders(Loaders):
    """One training DataLoader whose sampler is set to each epoch and its first sample."""

    backend = "torch"

    def __init__(self, train_list: FileList, val_list: FileList, prep: Preparation, batch_size: int, workers: int,
                 seed: int, rank: int, world: int):
        normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        policy, erasing = torch_train_ops(prep)  # drawn from the sample's seed too, as the crop and flip
        train_set = _ListDataset(train_list, transforms.Compose([
            transforms.RandomResizedCrop(prep.train_crop), transforms.RandomHorizontalFlip(), *policy,
            transforms.ToTensor(), normalize, *erasing]))
        self.val_transform = transforms.Compose([
            transforms.Resize(prep.val_resize), transforms.CenterCrop(prep.val_crop),
            transforms.ToTensor(), normalize])
        val_set = _ListDataset(val_list, self.val_transform)
        # Order and augmentation depend on (seed, epoch, sample) only, which makes resuming exact.
        self.sampler = EpochSampler(len(train_set), world, rank, seed)
        self.train_list, self.batch_size, self.seed, self.rank, self.world = train_list, batch_size, seed, rank, world
        self.common = common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(),
                                    persistent_workers=workers > 0,
                                    worker_init_fn=_WorkerSignals() if workers > 0 else None)
        # Own generators: each iterator draws its workers' base seed from one, and drawing it from torch's
        # global generator would move the stream that a resumed run restores.
        self.train = DataLoader(train_set, batch_size, sampler=self.sampler, drop_last=True,
                                generator=torch.Generator().manual_seed(seed), **common)
        # Validation: every image exactly once across processes (a DistributedSampler would pad).
        val = DataLoader(Subset(val_set, range(rank, len(val_set), world)), batch_size, shuffle=False,
                         generator=torch.Generator().manual_seed(seed), **common)
        super().__init__(val, len(self.sampler) // batch_size, len(train_set), train_list.classes)

    def train_epoch(self, epoch: int, start_batch: int = 0, state=None) -> DataLoader:
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)
        return self.train

    def calibration_batches(self, n: int) -> DataLoader:
        indices = calibration_indices(len(self.train_list.files), n, self.batch_size, self.seed, self.rank,
                                      self.world)
        calibration = Subset(_ListDataset(self.train_list, self.val_transform), indices)
        # its own generator: the workers' base seed must not come from torch's global one (exact resume)
        return DataLoader(calibration, self.batch_size, shuffle=False,
                          generator=torch.Generator().manual_seed(self.seed),
                          **{**self.common, "persistent_workers": False})
