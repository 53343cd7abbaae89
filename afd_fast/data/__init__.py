"""Data for the trainer: ImageNet-layout folders (``train/<class>/``, ``val/<class>/``) through
NVIDIA DALI when it is installed (GPU decode on a GPU, CPU-only pipelines without one), else a
torchvision ``DataLoader`` with the same augmentations; and the embedded synthetic default."""
from __future__ import annotations

import atexit
import itertools
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets, transforms

from afd_fast.data.cifar import CifarLoader, find_cifar, load_cifar
from afd_fast.data.dali import DALILoader, dali_available
from afd_fast.data.folder import BadDataError, FileList, list_image_folder, read_file_list
from afd_fast.data.synthetic import RandomBatches, synthetic_image_folder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BACKENDS = ("auto", "dali", "torch")


@dataclass
class Loaders:
    """``train_epoch(e, start_batch=0, state=None)``: this process's batches of epoch e from batch
    ``start_batch`` on, the same batches (images, order, augmentation) as the uninterrupted epoch
    from that batch, whether or not the run was resumed; ``state`` is what ``train_state()`` returned
    at that position (DALI's pipeline checkpoint; None for the loaders whose position alone fixes the
    rest). ``val``: this process's share of the validation set, every image once overall."""

    train_epoch: Callable[..., Iterable]
    val: Iterable
    steps_per_epoch: int
    train_size: int
    classes: list[str]
    backend: str
    train_state: Callable[[], object] = lambda: None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_loaders(root: str, image_size: int, batch_size: int, workers: int, seed: int, rank: int = 0,
                  world_size: int = 1, backend: str = "auto", device: torch.device = torch.device("cpu"),
                  skip_bad: bool = False, hw_decoder_load: float = 0.65, prefetch: int = 2,
                  dtype: torch.dtype = torch.float32, verify: bool = False) -> Loaders:
    """Loaders for an ImageNet-layout folder (``train/<class>/``, ``val/<class>/``), for the file
    lists ``train.txt`` and ``val.txt`` in root when it has both, or for CIFAR's python format.
    ``hw_decoder_load``, ``prefetch`` and ``dtype`` (float32, float16: DALI's own output type) apply
    to DALI; ``workers`` is DALI's thread count or the DataLoader's process count (and the decode
    check's with ``verify``, see :func:`list_image_folder`)."""
    if not os.path.isdir(root):
        raise BadDataError(f"data folder {root!r} does not exist")
    cifar = find_cifar(root)
    if cifar is not None:
        return _cifar_loaders(cifar, batch_size, seed, rank, world_size, device)
    device_id = None
    if device.type == "cuda":  # a plain "cuda" device has no index: the current one
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    checks = dict(skip_bad=skip_bad, verify=verify, workers=max(workers, 1))
    if all(os.path.isfile(os.path.join(root, f"{split}.txt")) for split in ("train", "val")):
        train_list = read_file_list(os.path.join(root, "train.txt"), **checks)
        val_list = read_file_list(os.path.join(root, "val.txt"), **checks)
        classes = max(train_list.classes, val_list.classes, key=len)
        train_list.classes = val_list.classes = classes
    else:
        train_list = list_image_folder(os.path.join(root, "train"), **checks)
        val_list = list_image_folder(os.path.join(root, "val"), **checks)
    if val_list.classes != train_list.classes:
        raise BadDataError(f"train/ and val/ of {root!r} have different class folders")
    skipped = len(train_list.skipped) + len(val_list.skipped)
    if skipped and rank == 0:
        print(f"skipped {skipped} unreadable or non-image files under {root!r}", file=sys.stderr)
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
        if backend == "torch" and rank == 0:
            print("NVIDIA DALI is not installed: using the torchvision DataLoader "
                  "(pip install nvidia-dali-cuda130 is faster)", file=sys.stderr)
    if backend == "dali":
        options = dict(threads=max(workers, 1), device_id=device_id, prefetch=prefetch,
                       hw_decoder_load=hw_decoder_load, dtype=dtype)
        return _dali_loaders(train_list, val_list, image_size, batch_size, seed, rank, world_size, options)
    return _torch_loaders(train_list, val_list, image_size, batch_size, workers, seed, rank, world_size)


def _dali_loaders(train_list: FileList, val_list: FileList, image_size, batch_size, seed, rank, world,
                  options: dict) -> Loaders:
    current: list[DALILoader] = []

    def train_epoch(epoch: int, start_batch: int = 0, state: bytes | None = None):
        """With ``state`` (a pipeline checkpoint) DALI restores the reader position and every random
        generator. Without one (e.g. a checkpoint of another loader), the pipeline runs forward
        ``start_batch`` batches that are dropped: the same batches follow, at the cost of decoding them."""
        loader = DALILoader(train_list, image_size, batch_size, train=True, seed=seed, epoch=epoch, shard_id=rank,
                            num_shards=world, checkpoint=state, **options)
        current[:] = [loader]
        return loader if state is not None or not start_batch else itertools.islice(loader, start_batch, None)

    val = DALILoader(val_list, image_size, batch_size, train=False, shard_id=rank, num_shards=world, **options)
    # every shard runs the same number of steps: the smallest shard's count of full batches
    steps = (len(train_list.files) // world) // batch_size
    return Loaders(train_epoch, val, steps, len(train_list.files), train_list.classes, "dali",
                   train_state=lambda: current[0].checkpoint() if current else None)


def _cifar_loaders(folder: str, batch_size, seed, rank, world, device) -> Loaders:
    train_x, train_y, test_x, test_y, classes = load_cifar(folder)
    train = CifarLoader(train_x, train_y, batch_size, True, device, seed, rank, world, len(classes))
    val = CifarLoader(test_x, test_y, batch_size, False, device, seed, rank, world, len(classes))
    return Loaders(train.for_epoch, val, len(train), len(train_y), classes, "cifar")


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


def _torch_loaders(train_list: FileList, val_list: FileList, image_size, batch_size, workers, seed, rank,
                   world) -> Loaders:
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_set = _ListDataset(train_list, transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
    val_set = _ListDataset(val_list, transforms.Compose([
        transforms.Resize(int(round(image_size / 0.875))), transforms.CenterCrop(image_size), transforms.ToTensor(),
        normalize]))
    # Order and augmentation depend on (seed, epoch, sample) only, which makes resuming exact.
    sampler = EpochSampler(len(train_set), world, rank, seed)
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                  worker_init_fn=_WorkerSignals() if workers > 0 else None)
    # Own generators: each iterator draws its workers' base seed from one, and drawing it from torch's
    # global generator would move the stream that a resumed run restores.
    train = DataLoader(train_set, batch_size, sampler=sampler, drop_last=True,
                       generator=torch.Generator().manual_seed(seed), **common)
    # Validation: every image exactly once across processes (a DistributedSampler would pad).
    val = DataLoader(Subset(val_set, range(rank, len(val_set), world)), batch_size, shuffle=False,
                     generator=torch.Generator().manual_seed(seed), **common)

    def train_epoch(epoch: int, start_batch: int = 0, state=None):
        sampler.set_epoch(epoch, start_batch * batch_size)
        return train

    return Loaders(train_epoch, val, len(sampler) // batch_size, len(train_set), train_list.classes, "torch")


__all__ = ["BACKENDS", "BadDataError", "Loaders", "RandomBatches", "build_loaders", "list_image_folder",
           "synthetic_image_folder"]
