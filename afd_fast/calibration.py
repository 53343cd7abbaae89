"""Batch-norm recalibration: running statistics recomputed for the weights as they are, before an
evaluation or an export.

Running statistics are an exponential average over the training steps, so they lag the weights
(by ~1/momentum steps: torchvision's MobileNet v3 with momentum 0.01 stays near chance after a short
run although its weights have learnt) and they mix in the augmentation's images. :func:`recalibrated`
recomputes them over a fixed set of training batches prepared as the validation images are
(:meth:`afd_fast.data.Loaders.calibration_batches`) and puts the training statistics back afterwards,
so that checkpoints, and an exact resume, keep them."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from afd_fast.errors import ConfigError


def _trained_norms(model: nn.Module) -> list[_BatchNorm]:
    """Of a model in training mode, the batch norms with running statistics that its forward updates
    (not an offline run's frozen teacher, which AFDModel.train leaves in eval mode: its own statistics)."""
    return [m for m in model.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None and m.training]


@contextlib.contextmanager
def recalibrated(models: nn.Module | Sequence[nn.Module], batches: Iterable, device: torch.device,
                 amp_dtype: torch.dtype | None = None, memory_format: torch.memory_format = torch.contiguous_format):
    """Inside the ``with``, every batch norm with running statistics of ``models`` (an AFDModel, its
    EMA copy, any module) holds statistics recomputed over ``batches`` (``(images, labels)`` pairs);
    on exit the training statistics (running mean, variance, ``num_batches_tracked``) and momenta are
    restored exactly, in place (a CUDA graph's buffers stay the same tensors).

    How: the running statistics are reset and the momentum set to None (PyTorch's cumulative
    average), then one training-mode forward per batch without gradients (an AFDModel through
    ``predict``, so that each network gets its own input size; under autocast when ``amp_dtype`` is
    given; the global RNGs, which dropout or stochastic depth draw from, are left as they were). The
    result is, per batch norm, the mean over the batches of the per-batch means and the mean of the
    per-batch (unbiased) variances. Under torch.distributed these are averaged over the processes:
    every process has the same number of batches (calibration_batches' contract), so the average of
    the processes' means of per-batch statistics is the mean over all processes' batches, what one
    process with all the batches would compute. The modules' train/eval modes are restored before
    the body runs. Batch norms the forward does not reach (an AFDModel's discriminators and
    transfer layers) keep their statistics. Models without batch norms with running statistics:
    nothing runs, ``batches`` is not read."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    modes = [(m, m.training) for model in models for m in model.modules()]
    norms, saved = [], []
    try:
        for model in models:
            model.train()
        norms_of = [(model, _trained_norms(model)) for model in models]
        norms = list({id(n): n for _, ns in norms_of for n in ns}.values())  # modules shared by models: once
        saved = [(n.running_mean.clone(), n.running_var.clone(), n.num_batches_tracked.clone(), n.momentum)
                 for n in norms]
        if norms:
            _recompute([model for model, ns in norms_of if ns], norms, batches, device, amp_dtype, memory_format)
            # what prediction does not reach (discriminators, transfer layers) keeps its statistics
            _put_back([(n, s) for n, s in zip(norms, saved) if int(n.num_batches_tracked) == 0])
        _set_modes(modes)
        yield
    finally:
        _set_modes(modes)
        _put_back(zip(norms, saved))


def _put_back(saved) -> None:
    """Running statistics and momenta as they were, copied into the same tensors."""
    with torch.no_grad():
        for n, (mean, var, count, momentum) in saved:
            n.running_mean.copy_(mean)
            n.running_var.copy_(var)
            n.num_batches_tracked.copy_(count)
            n.momentum = momentum


def _set_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _recompute(models: list[nn.Module], norms: list[_BatchNorm], batches: Iterable, device: torch.device,
               amp_dtype: torch.dtype | None, memory_format: torch.memory_format) -> None:
    for n in norms:
        n.reset_running_stats()
        n.momentum = None  # cumulative average: the mean of the per-batch statistics
    seen = 0
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        for images, _ in batches:
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                for model in models:
                    if hasattr(model, "predict"):  # AFDModel: each network at its own input size
                        model.predict(images)
                    else:
                        model(images)
            seen += 1
    if not seen:
        raise ConfigError("batch-norm recalibration got no batch: the training set has fewer images than one "
                          "batch per process")
    if dist.is_initialized():  # one collective per statistic: once per evaluation, no hot path
        for n in norms:
            for stat in (n.running_mean, n.running_var):
                dist.all_reduce(stat)
                stat /= dist.get_world_size()
