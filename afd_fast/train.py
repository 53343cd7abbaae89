"""Train K networks together with online adversarial feature-map distillation (or a baseline).

    python -m afd_fast.train                              # synthetic default data, CPU or GPU
    torchrun --nproc_per_node=8 -m afd_fast.train --arch resnet18,resnet34 --data /imagenet --recipe imagenet-paper

Without --data a small synthetic JPEG folder (generated once, cached) is used, so the command runs
end to end on a fresh machine. Outputs in --output: metrics.jsonl, summary.json, curves.png,
checkpoints (last.pt, previous.pt, best.pt) and each network's plain state_dict (network<k>_<arch>.pt).

Preemption: on SIGTERM or SIGUSR1 every process finishes its step, they agree on the last one,
last.pt gets the exact position inside the epoch, the command that resumes is printed and every
process exits with 128 + the signal number. --resume continues exactly (the same batches, the same
augmentation, every RNG); --resume auto resumes when --output has a checkpoint and starts fresh
otherwise (for torchrun --max-restarts and requeued jobs).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from afd_fast import afd, checkpoint, metrics, ops, preemption
from afd_fast.data import BACKENDS, BadDataError, build_loaders, synthetic_image_folder
from afd_fast.graph import GraphedStep
from afd_fast.plotting import pyplot
from afd_fast.models import NETWORKS, build_network

IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50")

RECIPES = {
    # the paper's CIFAR schedule (§4): SGD 0.1 x0.1 at 150/225 of 300; Adam 2e-5 x0.1 at 75/150
    "cifar-paper": dict(epochs=300, batch_size=128, lr=0.1, weight_decay=1e-4, milestones=(150, 225),
                        adv_lr=2e-5, adv_milestones=(75, 150), image_size=32),
    # the paper's ImageNet run (§4.6): pre-trained ResNet-18/34 (--pretrained), 30 epochs; the
    # paper gives no learning rates for it, these are a fine-tuning schedule
    "imagenet-paper": dict(epochs=30, batch_size=256, lr=0.01, weight_decay=1e-4, milestones=(10, 20),
                           adv_lr=2e-5, adv_milestones=(10, 20), image_size=224),
    # the embedded default: a few minutes on a CPU
    "quick": dict(epochs=4, batch_size=32, lr=0.05, weight_decay=5e-4, milestones=(3,),
                  adv_lr=2e-4, adv_milestones=(3,), image_size=32),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m afd_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20,resnet20",
                   help=f"comma-separated networks, one per peer; known: {', '.join(sorted(NETWORKS))}")
    p.add_argument("--method", default="afd", choices=afd.METHODS,
                   help="afd; the paper's baselines: dml (sequential, as its authors), one (branches on shared low "
                        "layers, gated-ensemble teacher; identical CIFAR networks), kd (online, mean-ensemble "
                        "teacher), vanilla, l1, l1kd, l1kd-offline (--arch STUDENT,TEACHER with --pretrained "
                        ",TEACHER.pt: the teacher frozen); ablations adv-only, kd-only (AFD without the adversary: "
                        "one synchronous KD step)")
    p.add_argument("--topology", default=None, choices=("pair", "cyclic"),
                   help="who learns from whom (default: pair for 2 networks, cyclic for more)")
    p.add_argument("--data", default=None, help="ImageNet-layout folder (train/<class>/, val/<class>/), a folder "
                                                "with file lists train.txt and val.txt ('<path> <label>' lines, "
                                                "paths relative to it) or CIFAR-10/100 in the python format "
                                                "(cifar-10-batches-py, cifar-100-python); default: the embedded "
                                                "synthetic set")
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="hyper-parameters of a schedule (default: quick without --data, cifar-paper or "
                        "imagenet-paper by architecture otherwise); flags override it")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int,
                   help="the global batch, split evenly over the processes (default: the recipe's)")
    p.add_argument("--lr-scaling", default="none", choices=("none", "linear"),
                   help="linear: the SGD learning rate times --batch-size / the recipe's batch (the recipes' rates "
                        "are for their own global batch; Adam's adversarial rate is never scaled)")
    p.add_argument("--lr", type=float, help="SGD learning rate of the logit losses")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--adv-lr", type=float, help="Adam learning rate of the adversarial losses")
    p.add_argument("--temperature", type=float, default=None,
                   help="KD temperature T (default: 1 for dml, as the DML paper; 3 otherwise, as the AFD paper)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--output", default="runs/afd", help="folder for metrics, checkpoints and plots")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--workers", type=int, default=2,
                   help="data-loading processes (DataLoader) or threads (DALI) per training process")
    p.add_argument("--loader", default="auto", choices=BACKENDS,
                   help="auto: NVIDIA DALI when installed (GPU decode on CUDA), else the torchvision DataLoader")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="leave out non-image, truncated or (with --verify-images) undecodable files (reported) "
                        "instead of stopping")
    p.add_argument("--verify-images", action="store_true",
                   help="decode every image once at start-up to find corrupt files (a pass over the data set)")
    p.add_argument("--pretrained", default=None,
                   help="comma-separated local state_dict files, one per network; an empty entry starts that "
                        "network fresh (e.g. ',teacher.pt')")
    p.add_argument("--print-every", type=int, default=20, help="steps between progress lines")
    p.add_argument("--sync-bn", action="store_true",
                   help="share batch-norm statistics across processes (CUDA; default: per process, as DDP)")
    ckpt = p.add_argument_group(
        "checkpoints and preemption",
        "last.pt is written at every epoch end, every --checkpoint-every steps / --checkpoint-minutes (by a\n"
        "background thread: training pauses only to copy the state to host memory) and on SIGTERM or SIGUSR1,\n"
        "after which every process exits with status 128 + the signal number and the log names the command\n"
        "that resumes. Writes are atomic and fsynced; previous.pt keeps the checkpoint before last.pt.")
    ckpt.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH|auto",
                      help="continue exactly where a checkpoint stopped, mid-epoch included (same batches, same "
                           "augmentation, every RNG); alone: the newest complete checkpoint in --output; 'auto': "
                           "that when --output has a checkpoint, else start fresh (torchrun --max-restarts, "
                           "requeued jobs)")
    ckpt.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                      help="also write last.pt every STEPS training steps")
    ckpt.add_argument("--checkpoint-minutes", type=float, default=None, metavar="MINUTES",
                      help="also write last.pt when MINUTES have passed since the last one (with several "
                           "processes checked every --signal-check-every steps)")
    ckpt.add_argument("--signal-check-every", type=int, default=None, metavar="STEPS",
                      help="with several processes: steps between the checks (one small all-reduce) that make every "
                           "process stop after the same step on a signal (default: --print-every); one process "
                           "checks after every step at no cost")
    fast = p.add_argument_group("speed", "--amp, --channels-last and --cuda-graph are on by default with "
                                         "--device cuda and off on the CPU")
    fast.add_argument("--amp", choices=afd.AMP_DTYPES, default=None,
                      help="autocast the forward in bf16 or fp16 (fp16 adds on-device loss scaling); "
                           "default bf16 on CUDA, off on the CPU")
    fast.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                      help="NHWC memory layout of the networks and the batches")
    fast.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                      help="capture the whole training step (forward, three gradient sets, their averaging, "
                           "three optimizer steps) in one CUDA graph and replay it")
    fast.add_argument("--batched-backward", action="store_true",
                      help="experiment: the logit and adversarial gradient sets through the extractors in one "
                           "batched backward (same values; benchmarks/step.py measures whether it pays)")
    fast.add_argument("--hw-decoder-load", type=float, default=0.65,
                      help="DALI on a GPU: share of JPEG decoding given to the hardware decoder (0..1)")
    fast.add_argument("--prefetch", type=int, default=2, help="DALI: batches prepared ahead (prefetch queue depth)")
    args = p.parse_args(argv)

    args.archs = [a.strip().lower() for a in args.arch.split(",") if a.strip()]
    for a in args.archs:
        if a not in NETWORKS:
            p.error(f"unknown network {a!r}; known networks: {', '.join(sorted(NETWORKS))}")
    problem = afd.architecture_problem(args.method, args.archs)
    if problem:
        p.error(problem)
    args.topology = args.topology or ("pair" if len(args.archs) == 2 else "cyclic")
    if args.topology == "pair" and len(args.archs) != 2:
        p.error("--topology pair is for exactly 2 networks; use cyclic")
    if args.data is not None and not os.path.isdir(args.data):
        p.error(f"--data {args.data!r} is not a folder")
    if args.pretrained:
        args.pretrained = args.pretrained.split(",")
        if len(args.pretrained) != len(args.archs):
            p.error(f"--pretrained needs one file per network ({len(args.archs)}), got {len(args.pretrained)}")
        for path in args.pretrained:
            if path and not os.path.isfile(path):
                p.error(f"--pretrained file {path!r} does not exist")
    if afd.method_spec(args.method).frozen_teacher and not (args.pretrained and args.pretrained[-1]):
        p.error(f"--method {args.method} distils from a pre-trained teacher, the last network of --arch: give its "
                "weights with --pretrained (e.g. ',teacher.pt')")
    recipe = args.recipe or ("quick" if args.data is None else
                             "imagenet-paper" if args.archs[0] in IMAGENET_ARCHS else "cifar-paper")
    args.recipe = recipe
    for key, value in RECIPES[recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    # --batch-size is the global batch; from here on args.batch_size is this process's share of it
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size < 1 or args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} is the global batch: it must split evenly over the {world} processes")
    args.global_batch, args.batch_size = args.batch_size, args.batch_size // world
    args.temperature = afd.method_spec(args.method).temperature if args.temperature is None else args.temperature
    if args.lr_scaling == "linear":
        args.lr *= args.global_batch / RECIPES[recipe]["batch_size"]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible; use --device cpu")
    if args.sync_bn and args.device != "cuda":
        p.error("--sync-bn needs --device cuda (torch's SyncBatchNorm runs on GPUs only)")
    if not 0.0 <= args.hw_decoder_load <= 1.0:
        p.error(f"--hw-decoder-load must lie in [0, 1], got {args.hw_decoder_load}")
    if args.prefetch < 1:
        p.error(f"--prefetch must be at least 1, got {args.prefetch}")
    for flag in ("checkpoint_every", "signal_check_every", "print_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.checkpoint_minutes is not None and not args.checkpoint_minutes > 0:
        p.error(f"--checkpoint-minutes must be positive, got {args.checkpoint_minutes}")
    args.signal_check_every = args.signal_check_every or args.print_every
    cuda = args.device == "cuda"
    args.amp = args.amp or ("bf16" if cuda else "off")
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    if args.cuda_graph and not cuda:
        print("afd_fast: --cuda-graph needs --device cuda: the CPU runs eager steps", file=sys.stderr)
    args.cuda_graph = cuda and args.cuda_graph is not False
    if args.cuda_graph and not ops.HAS_EXTENSION:
        print("afd_fast: no CUDA graph: afd_fast._C is not built and the plain-PyTorch losses read the peer "
              "weights on the host (pip install --no-build-isolation -e .)", file=sys.stderr)
        args.cuda_graph = False
    if args.batched_backward and args.sync_bn:
        p.error("--batched-backward cannot be combined with --sync-bn (SyncBatchNorm's backward all-reduces)")
    return args


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
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution algorithms once
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    # the handlers go in first: a signal during start-up (data listing, resume) must not kill the run
    control = preemption.StopControl(rank, world, device, args.signal_check_every, args.checkpoint_every,
                                     args.checkpoint_minutes, output=args.output)
    with control:
        trainer = Trainer(args, rank, world, device, control, preemption.resume_command(argv))
        try:
            trainer.fit()
        finally:
            trainer.close()
        summary = write_outputs(args, trainer.model, trainer.run.history) if rank == 0 else {}
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


@dataclass
class Progress:
    """Where the run is: the epoch in progress (the next one when batch is 0), the batches done in
    it, the global step, the epoch records, and this process's running loss sums of the epoch."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best: float = -1.0
    history: list = field(default_factory=list)
    loss_sums: dict = field(default_factory=dict)
    summed: int = 0  # batches in loss_sums

    def count(self, losses: dict) -> None:
        for key in ("ce", "kl", "g_loss", "d_loss"):
            if key in losses:
                self.loss_sums[key] = self.loss_sums.get(key, 0) + losses[key].detach().double()
        self.batch, self.step, self.summed = self.batch + 1, self.step + 1, self.summed + 1


class Trainer:
    """One run: data, networks and their dual step, schedules, where the run is (:class:`Progress`),
    checkpoints (:mod:`afd_fast.checkpoint`) and the stop agreement (:mod:`afd_fast.preemption`).
    :meth:`fit` is the training loop."""

    def __init__(self, args, rank: int, world: int, device: torch.device, control: preemption.StopControl,
                 resume_hint: str):
        self.args, self.rank, self.world, self.device, self.control = args, rank, world, device, control
        self.is_main, self.resume_hint = rank == 0, resume_hint
        self.loaders = build_data(args, rank, world, device)
        self.model, self.step, self.train_step, self.schedules = build_training(args, self.loaders.num_classes,
                                                                               world, device)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.buffer_names = set(self.model.state_dict()) - {n for n, _ in self.model.named_parameters()}
        spe = self.loaders.steps_per_epoch
        self.total_steps = spe * args.epochs if args.max_steps is None else min(args.max_steps, spe * args.epochs)
        self.run, self.loader_state = Progress(), None
        os.makedirs(args.output, exist_ok=True)
        self.metrics_path = os.path.join(args.output, "metrics.jsonl")
        self.writer = checkpoint.CheckpointWriter(args.output, resume_hint) if self.is_main else None
        control.write_failed = lambda: self.writer is not None and self.writer.failed
        self.resume_or_start_fresh()
        self.saved_step = self.run.step  # the newest checkpoint's step: nothing to save on a stop before the next
        self.tensorboard = tensorboard_writer(args.output) if self.is_main else None
        self.meter = Meter()
        if self.is_main:
            print_start(args, world, device, self.loaders)

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self) -> None:
        run, loaders = self.run, self.loaders
        for epoch in range(run.epoch, self.args.epochs):
            if run.step >= self.total_steps and run.batch == 0:  # (a stop after the last step: its epoch ends)
                break
            run.epoch = epoch
            self.model.train()
            self.meter.start_epoch()
            if run.batch < loaders.steps_per_epoch and run.step < self.total_steps:
                for images, target in loaders.train_epoch(epoch, run.batch, self.loader_state):
                    images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                    losses = self.train_step(images, target.to(self.device, non_blocking=True))
                    run.count(losses)
                    self.report(losses, images.shape[0])
                    decision = self.control.after_step(run.step)  # a signal? a checkpoint due?
                    if decision:
                        self.act(decision)
                    if run.step >= self.total_steps or run.batch == loaders.steps_per_epoch:
                        break
            self.loader_state = None
            self.end_epoch()

    def end_epoch(self) -> None:
        """Evaluation, schedules, the epoch's record and checkpoint; then, with every process here,
        a stop that a signal during evaluation asked for."""
        run, args = self.run, self.args
        rate = self.meter.epoch_rate(args.batch_size * self.world)  # training alone, before evaluation
        check_finite(run.loss_sums, run.step, args.archs)
        means = {k: v.clone() for k, v in run.loss_sums.items()}
        if dist.is_initialized():  # training-loss means over all processes
            for value in means.values():
                dist.all_reduce(value)
                value /= self.world
        for s in self.schedules.values():
            s.step()
        val = metrics.evaluate(self.model, self.loaders.val, self.device, self.step.amp_dtype)
        record = {"epoch": run.epoch + 1, "step": run.step, "img_per_s": rate,
                  **{f"train_{k}": (v / max(run.summed, 1)).tolist() for k, v in means.items()}, **val}
        run.history.append(record)
        score = max(val[f"net{i}_top1"] for i in range(len(self.model.trained_networks())))  # not a frozen teacher
        improved, run.best = score > run.best, max(run.best, score)
        run.epoch, run.batch, run.loss_sums, run.summed = run.epoch + 1, 0, {}, 0
        if self.is_main:
            log_epoch(record, val, self.metrics_path, self.tensorboard)
        self.save("epoch", best=improved)
        decision = self.control.agree()
        if decision.write_failed or decision.stop:
            self.act(decision)

    # --- stops and checkpoints ---------------------------------------------------------------------
    def act(self, decision: preemption.Decision) -> None:
        if decision.write_failed:
            self.fail_on_write_error()
        if decision.stop:
            self.stop(decision.stop)
        if decision.save and self.run.batch < self.loaders.steps_per_epoch and self.run.step < self.total_steps:
            self.save("step")  # (at the end of an epoch the epoch's checkpoint follows)

    def save(self, reason: str, best: bool = False, wait: bool = False) -> None:
        """Every process hands its own state to rank 0, whose writer thread writes it durably."""
        self.refuse_non_finite_state()
        state = self.snapshot(reason)
        if self.is_main:
            self.writer.submit(state, best=best, wait=wait)
        self.saved_step = self.run.step
        self.control.saved()

    def stop(self, signum: int) -> None:
        """After the step the processes agreed on: last.pt with this position (unless the newest
        checkpoint already has it), every process waits for it, then exits with 128 + signum."""
        error = None
        try:
            if self.run.step != self.saved_step:
                self.save("signal", wait=True)
            elif self.is_main:
                self.writer.wait()
        except checkpoint.CheckpointWriteError as e:
            error = e
        if dist.is_initialized():
            dist.barrier()  # no process exits (and makes torchrun kill the others) before last.pt is whole
        run, name = self.run, preemption.signal_name(signum)
        print(f"afd_fast: rank {self.rank}: {name}: stopped after step {run.step}", file=sys.stderr, flush=True)
        if error is not None:
            raise error
        if self.is_main:
            where = (f"epoch {run.epoch + 1}, batch {run.batch} of {self.loaders.steps_per_epoch}" if run.batch
                     else f"end of epoch {run.epoch}")
            print(f"afd_fast: {name}: every process stopped after step {run.step} ({where}); "
                  f"checkpoint {self.writer.path}\nafd_fast: resume with: {self.resume_hint}", file=sys.stderr,
                  flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise preemption.TrainingInterrupted(signum)

    def refuse_non_finite_state(self) -> None:
        """A blown-up state must not replace the good checkpoints: the processes check their loss sums
        and weights together (a save is rare: one collective), and all stop if any is not finite."""
        run = self.run
        tensors = [*run.loss_sums.values(), *(p.detach() for p in self.model.parameters())]
        bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any().to(torch.int32)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            check_finite(run.loss_sums, run.step, self.args.archs)  # names the network if this process saw it
            raise NonFiniteLoss(f"non-finite loss or weights by step {run.step} (on this or another process): "
                                "nothing saved, the checkpoints keep the last finite state: lower --lr or "
                                "--adv-lr and --resume")

    def fail_on_write_error(self) -> None:
        if self.is_main:
            self.writer.wait()  # raises CheckpointWriteError with rank 0's message
        raise checkpoint.CheckpointWriteError(f"afd_fast: rank {self.rank}: stopping: rank 0 could not write a "
                                              "checkpoint (its message says why)")

    def snapshot(self, reason: str) -> dict | None:
        """The checkpoint of this moment, in host memory, on rank 0 (None elsewhere): the shared
        state plus every process's own (RNGs, batch-norm buffers, loss sums, data loader state)."""
        run, args = self.run, self.args
        own = checkpoint.host_copy({
            "rng": checkpoint.rng_state(), "loss_sums": run.loss_sums, "summed": run.summed,
            "buffers": {n: b for n, b in self.model.named_buffers() if n in self.buffer_names},
            "loader": self.loaders.train_state() if run.batch else None})
        ranks = [own]
        if self.world > 1:
            ranks = [None] * self.world if self.is_main else None
            dist.gather_object(own, ranks, dst=0)
        if not self.is_main:
            return None
        return checkpoint.host_copy({
            "model": self.model.state_dict(), "optimizers": self.step.state_dict(),
            "schedules": {n: s.state_dict() for n, s in self.schedules.items()},
            "epoch": run.epoch, "batch": run.batch, "step": run.step, "world_size": self.world,
            "batch_size": args.batch_size, "steps_per_epoch": self.loaders.steps_per_epoch, "best": run.best,
            "history": run.history, "ranks": ranks, "args": vars(args), "reason": reason})

    def resume_or_start_fresh(self) -> None:
        """--resume: rank 0 picks the checkpoint (or fails), every process reads that file."""
        args, found, error = self.args, None, None
        if self.is_main:
            try:
                found = checkpoint.resolve_resume(args.resume, args.output)
            except checkpoint.CheckpointError as e:
                error = checkpoint.CheckpointError(f"afd_fast: {e}")
        if self.world > 1:
            box = [found[0] if found else None, error is not None]
            dist.broadcast_object_list(box, src=0)
            if not self.is_main and box[1]:
                raise checkpoint.CheckpointError(f"afd_fast: rank {self.rank}: rank 0 cannot resume (its message "
                                                 "says why)")
            if not self.is_main and box[0] is not None:
                found = (box[0], checkpoint.load(box[0]), [])
        if error is not None:
            raise error
        if found is None:
            if self.is_main:
                if args.resume == "auto":
                    print(f"afd_fast: --resume auto: no checkpoint in {args.output}: starting fresh")
                self.writer.start_fresh()
                checkpoint.remove_temporaries(args.output)
                if os.path.exists(self.metrics_path):
                    os.remove(self.metrics_path)
            return
        path, ckpt, damaged = found
        self.restore(ckpt)
        if self.is_main:
            checkpoint.remove_temporaries(args.output)
            for bad, message in damaged:
                print(f"afd_fast: {message}: resuming from {path} instead; the damaged file is kept as "
                      f"{bad}.damaged", file=sys.stderr)
            checkpoint.set_aside([bad for bad, _ in damaged])  # never resumed from, nor rotated into previous.pt
            with open(self.metrics_path, "w") as f:  # the records of the epochs that the checkpoint has
                f.writelines(json.dumps(r) + "\n" for r in self.run.history)
            self.writer.good = checkpoint.describe(ckpt)
            print(f"afd_fast: resumed from {path} ({checkpoint.describe(ckpt)})", flush=True)

    def restore(self, ckpt: dict) -> None:
        run, args, spe = self.run, self.args, self.loaders.steps_per_epoch
        self.model.load_state_dict(ckpt["model"])
        self.step.load_state_dict(ckpt["optimizers"])
        for name, schedule in self.schedules.items():
            schedule.load_state_dict(ckpt["schedules"][name])
        run.epoch, run.batch, run.step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        run.best, run.history = ckpt["best"], ckpt["history"]
        ranks = ckpt["ranks"]
        own = ranks[self.rank] if self.rank < len(ranks) else ranks[0]
        checkpoint.set_rng_state(own["rng"])
        if ckpt["world_size"] == self.world and ckpt["batch_size"] == args.batch_size:
            with torch.no_grad():
                buffers = dict(self.model.named_buffers())
                for name, value in own.get("buffers", {}).items():
                    buffers[name].copy_(value)
            run.loss_sums = {k: v.to(self.device) for k, v in own.get("loss_sums", {}).items()}
            run.summed = own.get("summed", run.batch)
            self.loader_state = own.get("loader")
        elif run.batch:  # another layout: the same share of the epoch, not the same batches
            done = run.batch * ckpt["batch_size"] * ckpt["world_size"]
            run.batch = min(done // (args.batch_size * self.world), spe)
            run.step = run.epoch * spe + run.batch
            if self.is_main:
                print(f"afd_fast: the checkpoint stopped inside an epoch with {ckpt['world_size']} process(es) x "
                      f"batch {ckpt['batch_size']}; with {self.world} x {args.batch_size} the epoch continues at "
                      f"batch {run.batch}, not with exactly the same batches (resume with the same layout for that)",
                      file=sys.stderr)

    def close(self) -> None:
        """At the end, or on any error: the write in flight completes (and reports its failure)."""
        if self.writer is not None:
            self.writer.wait()

    # --- reporting ---------------------------------------------------------------------------------
    def report(self, losses: dict, batch: int) -> None:
        """Progress line (rank 0) and the NaN/inf check at the print cadence: no host sync per step."""
        run = self.run
        self.meter.count(batch * self.world)
        if run.step % self.args.print_every == 0 or run.step == self.total_steps:
            check_finite(run.loss_sums, run.step, self.args.archs)
            if self.is_main:
                rate = self.meter.rate()
                eta = (self.total_steps - run.step) * batch * self.world / max(rate, 1e-9)
                print(f"epoch {run.epoch + 1}/{self.args.epochs} step {run.step}/{self.total_steps} "
                      f"loss {float(losses['logit'].detach()):.4f} {rate:.1f} img/s ETA {eta:.0f}s", flush=True)


class Meter:
    """Images per second over the run and over each epoch's batches trained by this process."""

    def __init__(self):
        self.start, self.images = time.perf_counter(), 0
        self.epoch_start, self.epoch_batches = self.start, 0

    def start_epoch(self) -> None:
        self.epoch_start, self.epoch_batches = time.perf_counter(), 0

    def count(self, images: int) -> None:
        self.images += images
        self.epoch_batches += 1

    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def epoch_rate(self, images_per_batch: int) -> float:
        return self.epoch_batches * images_per_batch / max(time.perf_counter() - self.epoch_start, 1e-9)


# --- building --------------------------------------------------------------------------------------

def build_data(args, rank: int, world: int, device: torch.device):
    data_root = args.data
    if data_root is None:
        if rank == 0:
            data_root = synthetic_image_folder(size=args.image_size)
        if dist.is_initialized():
            dist.barrier()
        data_root = synthetic_image_folder(size=args.image_size)
    return build_loaders(data_root, args.image_size, args.batch_size, args.workers, args.seed, rank, world,
                         backend=args.loader, device=device, skip_bad=args.skip_bad_files,
                         hw_decoder_load=args.hw_decoder_load, prefetch=args.prefetch,
                         dtype=torch.float16 if args.amp == "fp16" else torch.float32, verify=args.verify_images)


def build_training(args, num_classes: int, world: int, device: torch.device):
    """(model, dual step, the step to call (CUDA graph or eager), learning-rate schedules)."""
    networks = [build_network(a, num_classes) for a in args.archs]
    for net, path in zip(networks, args.pretrained or []):
        if path:  # an empty entry: this network starts fresh
            net.load_plain_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = afd.AFDModel(networks, args.method, args.topology, args.image_size, args.temperature).to(device)
    model = model.to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if args.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step = afd.DualStep(model, lr=args.lr, weight_decay=args.weight_decay, adv_lr=args.adv_lr,
                        average_gradients=average_across_processes if world > 1 else None, amp=args.amp,
                        capturable=args.cuda_graph, batched_backward=args.batched_backward)
    train_step = GraphedStep(step) if args.cuda_graph else step
    schedules = {name: torch.optim.lr_scheduler.MultiStepLR(
                     opt, list(args.adv_milestones if name != "logit" else args.milestones), 0.1)
                 for name, opt in step.optimizers.items()}
    return model, step, train_step, schedules


def print_start(args, world: int, device: torch.device, loaders) -> None:
    if args.recipe == "imagenet-paper" and not args.pretrained:
        print("note: the paper's ImageNet experiment starts from pre-trained networks (--pretrained a.pt,b.pt)")
    print(f"afd_fast: {args.method} on {', '.join(args.archs)} ({args.topology}), {world} process(es) on "
          f"{device}, {loaders.train_size} training images in {loaders.num_classes} classes "
          f"({loaders.backend} loader), recipe {args.recipe}, amp {args.amp}, "
          f"channels-last {'on' if args.channels_last else 'off'}, CUDA graph {'on' if args.cuda_graph else 'off'}")
    print(f"afd_fast: global batch {args.global_batch} ({args.batch_size} per process x {world}), SGD lr {args.lr:g}"
          f"{' (linear scaling)' if args.lr_scaling == 'linear' else ''}, Adam lr {args.adv_lr:g}, "
          f"T {args.temperature:g}, {args.epochs} epochs")


def log_epoch(record: dict, val: dict, metrics_path: str, tensorboard) -> None:
    with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if tensorboard is not None:
        for key, value in record.items():
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                tensorboard.add_scalar(key if not isinstance(value, list) else f"{key}/net{i}", v, record["epoch"])
        tensorboard.flush()
    print(f"epoch {record['epoch']}: " + ", ".join(f"{k} {v:.2f}" for k, v in val.items() if k.endswith("top1")),
          flush=True)


def tensorboard_writer(output: str):
    """TensorBoard event files in <output>/tensorboard when tensorboard is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(output, "tensorboard"))


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(loss_sums: dict, step: int, archs: list[str]) -> None:
    """Stop on NaN/inf in the epoch's running loss sums, naming the network and the step."""
    for key, value in loss_sums.items():
        bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
        if bad:
            k = bad[0]
            raise NonFiniteLoss(f"non-finite {key} by step {step} for network {k} ({archs[k]}); "
                                "the checkpoints keep the last finite state: lower --lr or --adv-lr and --resume")


def write_outputs(args, model: afd.AFDModel, history: list[dict]) -> dict:
    last = history[-1] if history else {}
    k = len(args.archs)
    summary = {"method": args.method, "archs": args.archs, "topology": args.topology,
               "epochs": last.get("epoch", 0), "steps": last.get("step", 0), "global_batch": args.global_batch,
               "batch_per_process": args.batch_size, "lr": args.lr, "temperature": args.temperature,
               "img_per_s": sum(h["img_per_s"] for h in history) / max(len(history), 1),
               **metrics.final_accuracy(history, len(model.trained_networks())), "val_images": last.get("val_images")}
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for i, (arch, net) in enumerate(zip(args.archs, model.networks)):
        checkpoint.write_durably({n: t.cpu() for n, t in net.plain_state_dict().items()},
                                 os.path.join(args.output, f"network{i}_{arch}.pt"), rotate=False)
    plot_curves(history, k, os.path.join(args.output, "curves.png"))
    print(json.dumps(summary, indent=2))
    return summary


def plot_curves(history: list[dict], k: int, path: str) -> None:
    plt = pyplot("curves.png")
    if plt is None or not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i in range(k):
        if "train_ce" in history[0]:
            ax_loss.plot(epochs, [h["train_ce"][i] + h.get("train_kl", [0] * k)[i] for h in history],
                         label=f"network {i}")
        ax_acc.plot(epochs, [h[f"net{i}_top1"] for h in history], label=f"network {i}")
    ax_acc.plot(epochs, [h["ensemble_top1"] for h in history], "k--", label="ensemble")
    ax_loss.set(xlabel="epoch", ylabel="training logit loss (CE + KD)", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="validation top-1 (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except (NonFiniteLoss, BadDataError) as e:
        raise SystemExit(f"afd_fast: {e}")
