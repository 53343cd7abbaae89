"""Where a run is, and that state captured into a checkpoint and restored from one.

:class:`Progress` is the run's position (epoch, batch, steps done) and its epoch records.
:func:`capture` turns the live run (networks, optimizers, position, every process's RNGs, batch-norm
buffers, loss sums and data loader state) into the checkpoint dict, gathered on rank 0;
:func:`find_checkpoint` is what ``--resume`` takes, agreed by every process; :func:`check_same_run`
refuses a checkpoint of another run; :func:`restore` puts a checkpoint back. None of them writes
a file: the file format, durable writes and verified reads are :mod:`afd_fast.checkpoint`'s.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from afd_fast import checkpoint
from afd_fast.config import resume_differences


@dataclass
class Progress:
    """Where the run is: the epoch in progress (the next one when batch is 0), the batches done in
    it, the training steps done, the epoch records, and this process's running loss sums of the epoch."""

    epoch: int = 0
    batch: int = 0
    steps_done: int = 0  # the checkpoint's "step"
    best: float = -1.0
    history: list = field(default_factory=list)
    loss_sums: dict = field(default_factory=dict)
    summed: int = 0  # batches in loss_sums

    def count(self, losses: dict) -> None:
        for key in ("ce", "kl", "g_loss", "d_loss"):
            if key in losses:
                self.loss_sums[key] = self.loss_sums.get(key, 0) + losses[key].detach().double()
        self.batch, self.steps_done, self.summed = self.batch + 1, self.steps_done + 1, self.summed + 1

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.loss_sums, self.summed = self.epoch + 1, 0, {}, 0


def capture(reason: str, run: Progress, model, dual_step, loaders, config, rank: int, world: int) -> dict | None:
    """The checkpoint of this moment, in host memory, on rank 0 (None elsewhere): the shared state
    plus every process's own (RNGs, batch-norm buffers, loss sums, data loader state)."""
    state, ema = model.state_dict(), dual_step.ema
    own = checkpoint.host_copy({
        "rng": checkpoint.rng_state(), "loss_sums": run.loss_sums, "summed": run.summed,
        "buffers": _buffers(model), "loader": loaders.train_state() if run.batch else None,
        **({"ema_buffers": _buffers(ema.model)} if ema is not None else {})})
    ranks = [own]
    if world > 1:
        ranks = [None] * world if rank == 0 else None
        dist.gather_object(own, ranks, dst=0)
    if rank != 0:
        return None
    return checkpoint.host_copy({
        "model": state, "optimizers": dual_step.state_dict(),
        "epoch": run.epoch, "batch": run.batch, "step": run.steps_done, "world_size": world,
        "batch_size": config.batch_per_process, "steps_per_epoch": loaders.steps_per_epoch,
        "loader_backend": loaders.backend, "best": run.best, "history": run.history, "ranks": ranks,
        "config": config.settings(), "reason": reason, **({"ema": ema.state_dict()} if ema is not None else {})})


def _buffers(model) -> dict:
    """A process's own batch-norm statistics (and other persistent buffers): they differ by process."""
    state = model.state_dict()
    return {n: b for n, b in model.named_buffers() if n in state}  # not the non-persistent ones


@torch.no_grad()
def _load_buffers(model, saved: dict) -> None:
    """This process's own buffers (:func:`_buffers`) back, in place."""
    buffers = dict(model.named_buffers())
    for name, value in saved.items():
        buffers[name].copy_(value)


def find_checkpoint(config, rank: int, world: int) -> tuple[str, dict, list[tuple[str, str]]] | None:
    """What --resume takes (:func:`afd_fast.checkpoint.resolve_resume`): rank 0 picks the file (or
    fails), every process reads that one. None: start fresh."""
    found, error = None, None
    if rank == 0:
        try:
            found = checkpoint.resolve_resume(config.resume, config.output)
        except checkpoint.CheckpointError as e:
            error = e
    if world > 1:
        box = [found[0] if found else None, error is not None]
        dist.broadcast_object_list(box, src=0)
        if rank != 0 and box[1]:
            raise checkpoint.CheckpointError(f"rank {rank}: rank 0 cannot resume (its message says why)")
        if rank != 0 and box[0] is not None:
            found = (box[0], checkpoint.load(box[0]), [])
    if error is not None:
        raise error
    return found


def check_same_run(path: str, ckpt: dict, config, loaders, is_main: bool) -> None:
    """--resume continues the checkpoint's run: one of another run (networks, method, topology, data,
    global batch, image size, loader, steps per epoch) is refused; other changed settings are named."""
    saved = ckpt.get("config")
    if saved is None:  # a checkpoint of an earlier afd_fast
        if is_main:
            print(f"afd_fast: {path} does not record its configuration: the settings are not compared",
                  file=sys.stderr)
        return
    refuse, warn = resume_differences(saved, config)
    for what, old, new in (("loader", ckpt.get("loader_backend"), loaders.backend),
                           ("steps per epoch", ckpt.get("steps_per_epoch"), loaders.steps_per_epoch)):
        if old is not None and old != new:
            refuse.append(f"{what} {old} -> {new}")
    if refuse:
        raise checkpoint.CheckpointError(
            f"--resume: {path} is another run: {'; '.join(refuse)}. Resume with its settings (see "
            f"{os.path.join(config.output, 'config.yaml')}: --config that file --resume) or start a new run "
            "in another --output")
    if warn and is_main:
        print(f"afd_fast: resuming with changed settings: {'; '.join(warn)}", file=sys.stderr)


def restore(ckpt: dict, run: Progress, model, dual_step, rates, loaders, config, rank: int, world: int,
            device: torch.device):
    """The checkpoint's state into the live run; returns the data loader state that resumes the
    epoch in progress (None: the position suffices). With another layout (processes x batch) the
    epoch continues at the same share, not with exactly the same batches."""
    spe, loader_state = loaders.steps_per_epoch, None
    model.load_state_dict(ckpt["model"])
    dual_step.load_state_dict(ckpt["optimizers"])
    ema = dual_step.ema
    if ema is not None:  # (the run defines whether it has one: a checkpoint of the same run has it)
        ema.load_state_dict(ckpt["ema"])
    rates.forget()  # the loaded optimizer state holds the checkpoint's rates
    run.epoch, run.batch, run.steps_done = ckpt["epoch"], ckpt["batch"], ckpt["step"]
    run.best, run.history = ckpt["best"], ckpt["history"]
    ranks = ckpt["ranks"]
    own = ranks[rank] if rank < len(ranks) else ranks[0]
    checkpoint.set_rng_state(own["rng"])
    if ckpt["world_size"] == world and ckpt["batch_size"] == config.batch_per_process:
        _load_buffers(model, own.get("buffers", {}))
        if ema is not None:
            _load_buffers(ema.model, own["ema_buffers"])
        run.loss_sums = {k: v.to(device) for k, v in own.get("loss_sums", {}).items()}
        run.summed = own.get("summed", run.batch)
        loader_state = own.get("loader")
    elif run.batch:  # another layout: the same share of the epoch, not the same batches
        done = run.batch * ckpt["batch_size"] * ckpt["world_size"]
        run.batch = min(done // (config.batch_per_process * world), spe)
        run.steps_done = run.epoch * spe + run.batch
        if rank == 0:
            print(f"afd_fast: the checkpoint stopped inside an epoch with {ckpt['world_size']} process(es) x "
                  f"batch {ckpt['batch_size']}; with {world} x {config.batch_per_process} the epoch continues at "
                  f"batch {run.batch}, not with exactly the same batches (resume with the same layout for that)",
                  file=sys.stderr)
    return loader_state
