"""Train K networks together with online adversarial feature-map distillation (or a baseline).

    python -m afd_fast.train                              # synthetic default data, CPU or GPU
    torchrun --nproc_per_node=8 -m afd_fast.train --arch resnet18,resnet34 --data /imagenet --recipe imagenet-paper

Without --data a small synthetic JPEG folder (generated once, cached) is used, so the command runs
end to end on a fresh machine. Outputs in --output: metrics.jsonl, summary.json, curves.png,
checkpoints (last.pt, previous.pt, best.pt), each network's plain state_dict (network<k>_<arch>.pt) and
with --save-samples N a grid of the first N augmented (and mixed) training images (samples.png).

Preemption: on SIGTERM or SIGUSR1 every process finishes its step, they agree on the last one,
last.pt gets the exact position inside the epoch, the command that resumes is printed and every
process exits with 128 + the signal number. --resume continues exactly (the same batches, the same
augmentation, every RNG); --resume auto resumes when --output has a checkpoint and starts fresh
otherwise (for torchrun --max-restarts and requeued jobs).
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist

from afd_fast import checkpoint, metrics, preemption, run_dir, run_state
from afd_fast.calibration import recalibrated
from afd_fast.config import Config, parse as parse_config
from afd_fast.model import AFDModel
from afd_fast.step import DualStep
from afd_fast.data import build_loaders, synthetic_image_folder
from afd_fast.errors import AfdFastError, NonFiniteLoss, exit_with
from afd_fast.graph import GraphedStep
from afd_fast.schedule import LearningRates
from afd_fast.models import build_network
from afd_fast.models.base import refuse_one_pixel_strided_convs

def parse_args(argv=None) -> Config:
    """The command line resolved into the run's frozen :class:`afd_fast.config.Config`; a bad setting
    exits (status 2) with a message that names it."""
    config = parse_config(argv, description=__doc__)
    for note in config.notes:
        print(f"afd_fast: {note}", file=sys.stderr)
    return config


# --- distributed -----------------------------------------------------------------------------------

def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, torch.device(device)
    # torchrun --max-restarts restarts the workers against the same (agent's) store: the keys of an
    # earlier attempt (the dead workers' addresses) must not be read, so each attempt has its own prefix
    store, rank, world = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"afd_fast/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if device == "cuda":  # before the process group: NCCL's communicator goes on this process's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    return rank, world, torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def average_across_processes(tensors: list[torch.Tensor]) -> None:
    """Mean over processes, in place: autograd.grad bypasses DDP, so the trainer does it."""
    if not dist.is_initialized():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


# --- the run ---------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(argv)
    if config.print_config:
        print(config.to_yaml(), end="")
        return {}
    rank, world, device = setup_distributed(config.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution algorithms once
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    resume_hint = preemption.resume_command(argv)
    writer = checkpoint.CheckpointWriter(config.output, resume_hint) if rank == 0 else None
    # the handlers go in first: a signal during start-up (data listing, resume) must not kill the run
    control = preemption.StopControl(rank, world, device, config.signal_check_every, config.checkpoint_every,
                                     config.checkpoint_minutes,
                                     write_failed=lambda: writer is not None and writer.failed)
    with control:
        found = run_state.find_checkpoint(config, rank, world)
        trainer = Trainer(config, rank, world, device, control, writer, resume_hint, resume_from=found)
        if rank == 0:
            run_dir.prepare(config, writer, found)
            print_start(config, world, device, trainer.loaders)
            if config.save_samples:
                run_dir.save_samples(config, trainer.loaders)
        try:
            trainer.fit()
        finally:
            trainer.close()
        with trainer.recalibrated():  # the exports' statistics (--bn-recalibrate: every process takes part)
            summary = run_dir.write_outputs(config, trainer.evaluated_models(), trainer.run.history,
                                            trainer.loaders) if rank == 0 else {}
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


class Trainer:
    """One run: data, networks and the update that trains them, schedules, where the run is
    (:class:`afd_fast.run_state.Progress`), its checkpoints (written by rank 0's ``writer``) and the
    stop agreement (``control``, :mod:`afd_fast.preemption`). :meth:`fit` is the training loop.
    Building one writes nothing in --output: ``resume_from`` is a checkpoint already read
    (:func:`afd_fast.run_state.find_checkpoint`), and :func:`afd_fast.run_dir.prepare` sets the folder up."""

    def __init__(self, config, rank: int, world: int, device: torch.device, control: preemption.StopControl,
                 writer: checkpoint.CheckpointWriter | None, resume_hint: str, resume_from=None):
        self.config, self.rank, self.world, self.device, self.control = config, rank, world, device, control
        self.is_main, self.writer, self.resume_hint = rank == 0, writer, resume_hint
        self.loaders = build_data(config, rank, world, device)
        spe = self.loaders.steps_per_epoch
        # dual_step: the DualStep (optimizers, loss scale); update: the callable that does one training
        # step (alternating DML: one iteration of K batches), the DualStep itself or its CUDA graph
        self.model, self.dual_step, self.update, self.rates = build_training(
            config, self.loaders.num_classes, world, device, spe)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.total_steps = spe * config.epochs if config.max_steps is None else min(config.max_steps, spe * config.epochs)
        self.run, self.loader_state = run_state.Progress(), None
        if resume_from is not None:
            path, ckpt, _ = resume_from
            run_state.check_same_run(path, ckpt, config, self.loaders, self.is_main)
            self.loader_state = run_state.restore(ckpt, self.run, self.model, self.dual_step, self.rates, self.loaders,
                                                  config, rank, world, device)
        self.saved_at_step = self.run.steps_done  # the newest checkpoint's: nothing to save on a stop before the next
        self.log = run_dir.EpochLog(config.output) if self.is_main else None
        self.meter = Meter()

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self) -> None:
        run = self.run
        for epoch in range(run.epoch, self.config.epochs):
            if self.finished() and run.batch == 0:  # (a stop after the last step: its epoch ends)
                break
            run.epoch = epoch
            self.model.train()
            self.meter.start_epoch()
            for images, target in self.batches(epoch):
                self.rates.apply(run.steps_done)
                losses = self.update(images, target)
                run.count(losses)
                self.report(losses, images.shape[0])
                self.act(self.control.after_step(run.steps_done))  # a signal? a checkpoint due?
                if self.finished() or run.batch == self.loaders.steps_per_epoch:
                    break
            self.end_epoch()

    def finished(self) -> bool:
        return self.run.steps_done >= self.total_steps

    def batches(self, epoch: int):
        """The epoch's remaining training batches, on the device, one per step; after a resume, from
        the checkpoint's position with its data loader state. Alternating DML's step takes K batches,
        concatenated: its epoch is K passes of the loader (pass p of epoch e is the loader's epoch
        e·K + p), so that each network gets one epoch of updates; ``run.batch`` counts steps."""
        run, loaders, per_step = self.run, self.loaders, self.dual_step.batches_per_call
        state, self.loader_state = self.loader_state, None  # for the resumed epoch only
        if run.batch >= loaders.steps_per_epoch or self.finished():
            return
        first_pass, start = divmod(run.batch * per_step, loaders.steps_per_epoch)  # where the epoch goes on
        group = []
        for p in range(first_pass, per_step):
            # a saved loader state belongs to the pass it was saved in: none at a pass's start
            for batch in loaders.train_epoch(epoch * per_step + p, start, state if start else None):
                group.append(batch)
                if len(group) == per_step:
                    yield self.on_device(group)
                    group = []
            start = 0

    def on_device(self, group: list) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's batch (or batches, concatenated) on the training device."""
        images, target = group[0] if len(group) == 1 else (torch.cat([x for x, _ in group]),
                                                           torch.cat([y for _, y in group]))
        return (images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format),
                target.to(self.device, non_blocking=True))

    def end_epoch(self) -> None:
        """Evaluation, the epoch's record and checkpoint; then, with every process here, a stop that a
        signal during evaluation asked for."""
        run = self.run
        record = self.epoch_record()
        run.history.append(record)
        score = max(record[f"net{i}_top1"] for i in range(len(self.model.trained_networks())))  # not a frozen teacher
        improved, run.best = score > run.best, max(run.best, score)
        run.next_epoch()
        if self.log is not None:
            self.log.write(record)
        self.save("epoch", best=improved)
        self.act(replace(self.control.agree(), save=False))  # (the epoch's checkpoint is written)

    def epoch_record(self) -> dict:
        """The epoch's metrics: training speed, the training losses' means over every process, the
        learning rates and the validation accuracies."""
        run, config = self.run, self.config
        rate = self.meter.epoch_rate()  # training alone, before evaluation
        check_finite(run.loss_sums, run.steps_done, config.archs)
        means = {k: v.clone() for k, v in run.loss_sums.items()}
        if dist.is_initialized():  # training-loss means over all processes
            for value in means.values():
                dist.all_reduce(value)
                value /= self.world
        val = self.evaluate()
        rates = self.rates.rates(max(run.steps_done - 1, 0))  # the epoch's last step's (a cosine moves every step)
        return {"epoch": run.epoch + 1, "step": run.steps_done, "img_per_s": rate, "lr": rates["logit"],
                **({"adv_lr": rates["generator"]} if "generator" in rates else {}),
                **{f"train_{k}": (v / max(run.summed, 1)).tolist() for k, v in means.items()}, **val}

    # --- evaluation --------------------------------------------------------------------------------
    def evaluated_models(self) -> dict[str, torch.nn.Module]:
        """What is evaluated and exported, by metric prefix: the networks, and their weight EMA."""
        ema = self.dual_step.ema
        return {"": self.model, **({"ema_": ema.model} if ema is not None else {})}

    def evaluate(self) -> dict:
        """Validation metrics of the networks and of their EMA (keys ema_*), with batch-norm statistics
        recomputed first under --bn-recalibrate (the training ones are put back after)."""
        out = {}
        with self.recalibrated():
            for prefix, model in self.evaluated_models().items():
                val = metrics.evaluate(model, self.loaders.val, self.device, self.dual_step.amp_dtype)
                out.update({f"{prefix}{k}": v for k, v in val.items() if not (prefix and k == "val_images")})
        return out

    def recalibrated(self):
        """--bn-recalibrate N: the batch-norm statistics of every evaluated model (networks and EMA, in
        one pass over N batches of training images without augmentation) recomputed for the time of the
        with-block; else nothing changes."""
        if not self.config.bn_recalibrate:
            return contextlib.nullcontext()
        return recalibrated(list(self.evaluated_models().values()),
                            self.loaders.calibration_batches(self.config.bn_recalibrate), self.device,
                            self.dual_step.amp_dtype, self.memory_format)

    # --- stops and checkpoints ---------------------------------------------------------------------
    def act(self, decision: preemption.Decision) -> None:
        """What the processes agreed on: fail on rank 0's failed checkpoint write, stop on a signal,
        or write a checkpoint that is due (inside an epoch: at its end the epoch's follows)."""
        if decision.write_failed:
            self.fail_on_write_error()
        if decision.stop:
            self.stop(decision.stop)
        if decision.save and self.run.batch < self.loaders.steps_per_epoch and not self.finished():
            self.save("step")

    def save(self, reason: str, best: bool = False, wait: bool = False) -> None:
        """Every process hands its own state to rank 0, whose writer thread writes it durably."""
        self.refuse_non_finite_state()
        state = run_state.capture(reason, self.run, self.model, self.dual_step, self.loaders, self.config,
                                  self.rank, self.world)
        if self.is_main:
            self.writer.submit(state, best=best, wait=wait)
        self.saved_at_step = self.run.steps_done
        self.control.saved()

    def stop(self, signum: int) -> None:
        """After the step the processes agreed on: last.pt with this position (unless the newest
        checkpoint already has it), every process waits for it, then exits with 128 + signum."""
        error = None
        try:
            if self.run.steps_done != self.saved_at_step:
                self.save("signal", wait=True)
            elif self.is_main:
                self.writer.wait()
        except checkpoint.CheckpointWriteError as e:
            error = e
        if dist.is_initialized():
            dist.barrier()  # no process exits (and makes torchrun kill the others) before last.pt is whole
        run, name = self.run, preemption.signal_name(signum)
        stopped = f"rank {self.rank}: {name}: stopped after step {run.steps_done}"
        if error is not None:
            print(f"afd_fast: {stopped}", file=sys.stderr, flush=True)
            raise error
        if self.is_main:
            where = (f"epoch {run.epoch + 1}, batch {run.batch} of {self.loaders.steps_per_epoch}" if run.batch
                     else f"end of epoch {run.epoch}")
            print(f"afd_fast: {name}: every process stopped after step {run.steps_done} ({where}); "
                  f"checkpoint {self.writer.path}\nafd_fast: resume with: {self.resume_hint}", file=sys.stderr,
                  flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise preemption.TrainingInterrupted(signum, stopped)

    def refuse_non_finite_state(self) -> None:
        """A blown-up state must not replace the good checkpoints: the processes check their loss sums
        and weights together (a save is rare: one collective), and all stop if any is not finite."""
        run = self.run
        tensors = [*run.loss_sums.values(), *(p.detach() for p in self.model.parameters())]
        bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any().to(torch.int32)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            check_finite(run.loss_sums, run.steps_done, self.config.archs)  # names the network if this process saw it
            raise NonFiniteLoss(f"non-finite loss or weights by step {run.steps_done} (on this or another process): "
                                "nothing saved, the checkpoints keep the last finite state: lower --lr or "
                                "--adv-lr and --resume")

    def fail_on_write_error(self) -> None:
        if self.is_main:
            self.writer.wait()  # raises CheckpointWriteError with rank 0's message
        raise checkpoint.CheckpointWriteError(f"rank {self.rank}: stopping: rank 0 could not write a "
                                              "checkpoint (its message says why)")

    def close(self) -> None:
        """At the end, or on any error: the write in flight completes (and reports its failure)."""
        if self.writer is not None:
            self.writer.wait()

    # --- reporting ---------------------------------------------------------------------------------
    def report(self, losses: dict, batch: int) -> None:
        """Progress line (rank 0) and the NaN/inf check at the print cadence: no host sync per step."""
        run = self.run
        self.meter.count(batch * self.world)
        if run.steps_done % self.config.print_every == 0 or run.steps_done == self.total_steps:
            check_finite(run.loss_sums, run.steps_done, self.config.archs)
            if self.is_main:
                rate = self.meter.rate()
                eta = (self.total_steps - run.steps_done) * batch * self.world / max(rate, 1e-9)
                print(f"epoch {run.epoch + 1}/{self.config.epochs} step {run.steps_done}/{self.total_steps} "
                      f"loss {float(losses['logit'].detach()):.4f} lr {self.rates.rates(run.steps_done - 1)['logit']:.4g} "
                      f"{rate:.1f} img/s ETA {eta:.0f}s", flush=True)


class Meter:
    """Images per second (of every process) over the run and over each epoch's training."""

    def __init__(self):
        self.start, self.images = time.perf_counter(), 0
        self.epoch_start, self.epoch_images = self.start, 0

    def start_epoch(self) -> None:
        self.epoch_start, self.epoch_images = time.perf_counter(), 0

    def count(self, images: int) -> None:
        self.images += images
        self.epoch_images += images

    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def epoch_rate(self) -> float:
        return self.epoch_images / max(time.perf_counter() - self.epoch_start, 1e-9)


# --- building --------------------------------------------------------------------------------------

def build_data(config, rank: int, world: int, device: torch.device):
    data_root = config.data or synthetic_data(config.image_size, rank)
    return build_loaders(data_root, config.preparation, config.batch_per_process, config.workers, config.seed, rank,
                         world, backend=config.loader, device=device, skip_bad=config.skip_bad_files,
                         hw_decoder_load=config.hw_decoder_load, prefetch=config.prefetch,
                         dtype=torch.float16 if config.amp == "fp16" else torch.float32, verify=config.verify_images)


def synthetic_data(image_size: int, rank: int) -> str:
    """The embedded synthetic set (no --data): rank 0 generates it once, the others wait and find it."""
    if rank == 0:
        synthetic_image_folder(size=image_size)
    if dist.is_initialized():
        dist.barrier()
    return synthetic_image_folder(size=image_size)


def build_training(config, num_classes: int, world: int, device: torch.device, steps_per_epoch: int):
    """(model, its DualStep, the update to call (the DualStep's CUDA graph or the DualStep itself),
    the learning rates of each step)."""
    pretrained = config.pretrained or [None] * len(config.archs)  # library weights, a file, or "" (fresh)
    prep = config.preparation  # the networks take the training crop (evaluation: the validation crop)
    networks = [build_network(a, num_classes, p) for a, p in zip(config.archs, pretrained)]
    if device.type == "cpu" and config.amp == "bf16":  # a torch bug on some CPUs, in weight gradients only
        refuse_one_pixel_strided_convs(networks, config.network_image_sizes or [prep.train_crop] * len(networks),
                                       "--network-image-sizes" if config.network_image_sizes else
                                       "--train-crop-size" if config.train_crop_size else "--image-size")
    model = AFDModel(networks, config.method, config.topology, config.network_image_sizes or prep.train_crop,
                     config.temperature,
                     label_smoothing=config.label_smoothing).to(device)
    model = model.to(memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    if config.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    dual_step = DualStep(model, lr=config.effective_lr, momentum=config.momentum, nesterov=config.nesterov,
                         weight_decay=config.weight_decay, adv_lr=config.adv_lr,
                         adv_weight_decay=config.adv_weight_decay,
                         average_gradients=average_across_processes if world > 1 else None, amp=config.amp,
                         capturable=config.cuda_graph, batched_backward=config.batched_backward,
                         dml_update=config.dml_update, norm_weight_decay=config.norm_weight_decay,
                         bias_weight_decay=config.bias_weight_decay, model_ema=config.model_ema,
                         model_ema_every=config.model_ema_every, mixing=config.mixing)
    update = GraphedStep(dual_step) if config.cuda_graph else dual_step
    rates = LearningRates(dual_step.optimizers, config.schedules(), steps_per_epoch)
    return model, dual_step, update, rates


def print_start(config, world: int, device: torch.device, loaders) -> None:
    print(f"afd_fast: {config.method} on {', '.join(config.archs)} ({config.topology}), {world} process(es) on "
          f"{device}, {loaders.train_size} training images in {loaders.num_classes} classes "
          f"({loaders.backend} loader), amp {config.amp}, "
          f"channels-last {'on' if config.channels_last else 'off'}, CUDA graph {'on' if config.cuda_graph else 'off'}")
    sizes = (f" (networks: {', '.join(f'{a} {s}' for a, s in zip(config.archs, config.network_image_sizes))})"
             if config.network_image_sizes else "")
    print(f"afd_fast: recipe {config.recipe} ({config.recipe_reason}); global batch {config.batch_size} "
          f"({config.batch_per_process} per process x {world}), T {config.temperature:g}"
          f"{f', {config.dml_update} DML updates' if config.method == 'dml' else ''}, "
          f"images {describe_preparation(config.preparation)}{sizes}"
          f"{f', {config.mixing.describe()}' if config.mixing else ''}")
    print(f"afd_fast: schedule: {config.describe_schedule()}")


def describe_preparation(prep) -> str:
    """'176 px (validation 232 -> 224 px), trivialaugment, random erasing 0.1'."""
    extras = [prep.auto_augment] if prep.policy else []
    extras += [f"random erasing {prep.random_erasing:g}"] if prep.random_erasing else []
    return f"{prep.train_crop} px (validation {prep.val_resize} -> {prep.val_crop} px)" + "".join(", " + e for e in extras)


def check_finite(loss_sums: dict, step: int, archs: list[str]) -> None:
    """Stop on NaN/inf in the epoch's running loss sums, naming the network and the step."""
    for key, value in loss_sums.items():
        bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
        if bad:
            k = bad[0]
            raise NonFiniteLoss(f"non-finite {key} by step {step} for network {k} ({archs[k]}); "
                                "the checkpoints keep the last finite state: lower --lr or --adv-lr and --resume")


if __name__ == "__main__":
    try:
        main()
    except AfdFastError as e:
        exit_with(e)
