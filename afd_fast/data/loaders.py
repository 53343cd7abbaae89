"""What every data backend hands the trainer: :class:`Loaders`, one subclass per backend
(:class:`~afd_fast.data.dali.DALILoaders`, :class:`~afd_fast.data.torchvision_loader.TorchLoaders`,
:class:`~afd_fast.data.cifar.CifarLoaders`)."""
from __future__ import annotations

from typing import Iterable

import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Loaders:
    """One process's training and validation data.

    ``train_epoch(e, start_batch=0, state=None)``: this process's batches of epoch e from batch
    ``start_batch`` on, the same batches (images, order, augmentation) as the uninterrupted epoch
    from that batch, whether or not the run was resumed; ``state`` is what :meth:`train_state`
    returned at that position (DALI's pipeline checkpoint; None for the loaders whose position
    alone fixes the rest). ``val``: this process's share of the validation set, every image once
    overall. ``steps_per_epoch``: training batches per epoch, the same on every process."""

    backend = ""
    normalisation = (IMAGENET_MEAN, IMAGENET_STD)  # (mean, std) per channel of the images in [0, 1]

    def __init__(self, val: Iterable, steps_per_epoch: int, train_size: int, classes: list[str]):
        self.val, self.steps_per_epoch, self.train_size, self.classes = val, steps_per_epoch, train_size, classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_epoch(self, epoch: int, start_batch: int = 0, state=None) -> Iterable:
        raise NotImplementedError

    def train_state(self):
        """What resumes the epoch in progress exactly at the current batch (None: the position suffices)."""
        return None

    def sample_images(self, n: int, mix=None) -> torch.Tensor:
        """The first ``n`` training images of epoch 0 (this process's, augmented as the training loop
        gets them; fewer if the epoch is shorter), un-normalised: [n, 3, H, W] float in [0, 1] on the
        CPU, for ``--save-samples``. ``mix(images, target) -> images``: applied to each whole batch
        (mixup/CutMix pair images of one batch) before un-normalising, which is right for a linear mix."""
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in self.normalisation)
        got, count = [], 0
        for images, target in self.train_epoch(0):
            images = images.float().cpu()
            if mix is not None:
                images = mix(images, target.cpu())
            got.append(images[:n - count])
            count += len(got[-1])
            if count >= n:
                break
        return (torch.cat(got) * std + mean).clamp(0, 1)

    def calibration_batches(self, n: int) -> Iterable:
        """Up to ``n`` batches ``(images, labels)`` of this process's share of the training images,
        prepared as the validation images are (no random crop or flip), at the training batch size,
        in one fixed order (:func:`calibration_indices`): the same batches every call, the same
        number on every process. The training loader's state and every global RNG are left alone,
        so an exact resume stays exact. For batch-norm recalibration (:mod:`afd_fast.calibration`)."""
        raise NotImplementedError


def calibration_indices(size: int, n: int, batch_size: int, seed: int, rank: int, world: int) -> list[int]:
    """This process's training-set indices for :meth:`Loaders.calibration_batches`, in order: a
    permutation of the ``size`` images drawn from ``seed`` alone (the same on every process and every
    call), split into ``world`` equal contiguous shares; of its share, the first ``n`` full batches
    (fewer if the share is smaller), the same count on every process."""
    share = size // world
    batches = min(n, share // batch_size)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))  # own generator: global RNGs untouched
    return order[rank * share:rank * share + batches * batch_size].tolist()
