"""One run's configuration: the flags, a YAML config file (``--config``), a recipe and the world size
resolved once, by :func:`resolve`, into a frozen :class:`Config` that the rest of the trainer reads.

Precedence: command-line flags, then the config file, then the recipe (a YAML file of schedule
settings, ``afd_fast/recipes/<name>.yaml`` or a path), then the built-in defaults. A config file's
keys are the flags' long names (``lr_schedule`` or ``lr-schedule`` for ``--lr-schedule``). The
settings of a Config (:meth:`Config.settings`, what ``<output>/config.yaml`` holds) are the resolved
values of the flags, so that file given to ``--config`` repeats the run; the rest of its fields are
derived (the world size, the batch per process, the applied SGD rate, why the recipe was chosen).

A recipe's milestones are epochs of the recipe's own length: with another ``--epochs`` they move in
proportion, ``m * epochs / recipe_epochs`` rounded to the nearest epoch (halves up: cifar-paper's 150
and 225 of 300 become 15 and 23 for ``--epochs 30``); those that land before epoch 1 or at or after
the end of the run are left out, and two that land on the same epoch become one. Milestones given
as flags or in a config file are epochs as they are.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
from dataclasses import dataclass, field, fields

import yaml

from afd_fast.errors import ConfigError
from afd_fast.methods import METHODS, architecture_problem, method_spec
from afd_fast.models import ARCH_HELP, PRETRAINED_HELP, network_problem, parse_pretrained
from afd_fast.models.cifar import CIFAR_NETWORKS
from afd_fast.schedule import Schedule

RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
BACKENDS = ("auto", "dali", "torch")  # afd_fast.data.BACKENDS (not imported: that pulls in the loaders)
AMP_MODES = ("off", "bf16", "fp16")  # afd_fast.step.AMP_DTYPES
# what a recipe sets; the first six it must set, the rest default to DEFAULTS
RECIPE_REQUIRED = ("epochs", "batch_size", "lr", "weight_decay", "adv_lr", "image_size")
RECIPE_KEYS = RECIPE_REQUIRED + ("lr_scaling", "momentum", "nesterov", "lr_schedule", "milestones", "lr_decay",
                                 "warmup_epochs", "label_smoothing", "adv_milestones", "adv_lr_decay",
                                 "adv_weight_decay", "norm_weight_decay", "bias_weight_decay", "model_ema",
                                 "model_ema_every", "train_crop_size", "val_resize_size", "val_crop_size",
                                 "auto_augment", "random_erasing", "mixup", "cutmix", "mix_prob", "mix_switch_prob")
DEFAULTS = dict(
    arch="resnet20,resnet20", method="afd", output="runs/afd", seed=0, print_every=20, sync_bn=False,
    lr_scaling="none", momentum=0.9, nesterov=False, lr_schedule="step", milestones=(), lr_decay=0.1,
    warmup_epochs=0.0, label_smoothing=0.0, adv_milestones=(), adv_lr_decay=0.1, adv_weight_decay=0.1,
    workers=2, loader="auto", skip_bad_files=False, verify_images=False, batched_backward=False,
    hw_decoder_load=0.65, prefetch=2, norm_weight_decay=None, bias_weight_decay=None, model_ema=None,
    model_ema_every=1, bn_recalibrate=0, train_crop_size=None, val_resize_size=None, val_crop_size=None,
    auto_augment=None, random_erasing=0.0, save_samples=0, mixup=0.0, cutmix=0.0, mix_prob=1.0, mix_switch_prob=0.5)
# settings that define what the run trains: --resume refuses a checkpoint that differs in one
# (the decay by parameter kind shapes the optimizers' groups, the EMA what a checkpoint holds)
RUN_DEFINING = ("arch", "method", "topology", "data", "batch_size", "image_size", "train_crop_size",
                "network_image_sizes",
                "dml_update", "norm_weight_decay", "bias_weight_decay", "model_ema", "model_ema_every")
NOT_SETTINGS = ("config", "print_config", "resume")  # actions of one command, not part of a run


@dataclass(frozen=True)
class Config:
    # what is trained
    arch: tuple[str, ...]
    method: str
    topology: str
    data: str | None
    pretrained: tuple[str, ...] | None
    temperature: float
    dml_update: str  # "sync", or "alternate" (DML only)
    # the schedule (from the recipe unless set)
    recipe: str
    epochs: int
    batch_size: int  # the global batch
    lr_scaling: str
    lr: float  # as set; effective_lr is what SGD uses
    momentum: float
    nesterov: bool
    weight_decay: float
    lr_schedule: str
    milestones: tuple[int, ...]
    lr_decay: float
    warmup_epochs: float
    label_smoothing: float
    adv_lr: float
    adv_milestones: tuple[int, ...]
    adv_lr_decay: float
    adv_weight_decay: float
    norm_weight_decay: float | None  # None: as --weight-decay / --adv-weight-decay
    bias_weight_decay: float | None
    model_ema: float | None  # the EMA's decay; None: no EMA
    model_ema_every: int
    image_size: int
    network_image_sizes: tuple[int, ...]  # () : every network at image_size
    # None: from image_size (see the preparation property)
    train_crop_size: int | None
    val_resize_size: int | None
    val_crop_size: int | None
    auto_augment: str | None  # randaugment[:N:M], trivialaugment, autoaugment
    random_erasing: float
    # mixup/CutMix on the training device (afd_fast.mixing): Beta's alphas (0: off) and probabilities
    mixup: float
    cutmix: float
    mix_prob: float
    mix_switch_prob: float
    # the run
    output: str
    seed: int
    device: str
    max_steps: int | None
    print_every: int
    sync_bn: bool
    workers: int
    loader: str
    skip_bad_files: bool
    verify_images: bool
    checkpoint_every: int | None
    checkpoint_minutes: float | None
    signal_check_every: int
    amp: str
    channels_last: bool
    cuda_graph: bool
    batched_backward: bool
    hw_decoder_load: float
    prefetch: int
    bn_recalibrate: int  # training batches that recompute the batch-norm statistics before evaluation; 0: off
    save_samples: int  # training images in <output>/samples.png at start-up; 0: none
    # derived: not settings, not in config.yaml
    world_size: int = field(default=1, metadata={"derived": True})
    recipe_batch: int = field(default=0, metadata={"derived": True})  # the recipe's global batch (lr scaling)
    recipe_reason: str = field(default="", metadata={"derived": True})
    notes: tuple[str, ...] = field(default=(), metadata={"derived": True})  # to print at start
    resume: str | None = field(default=None, metadata={"derived": True})
    print_config: bool = field(default=False, metadata={"derived": True})

    @property
    def archs(self) -> tuple[str, ...]:
        return self.arch

    @property
    def preparation(self):
        """The loaders' sizes and augmentation (:class:`afd_fast.data.augment.Preparation`); its
        ``train_crop`` is the size the networks are built and probed at."""
        from afd_fast.data.augment import Preparation

        return Preparation.of(self.image_size, self.train_crop_size, self.val_resize_size, self.val_crop_size,
                              self.auto_augment, self.random_erasing)

    @property
    def mixing(self):
        """The run's :class:`afd_fast.mixing.Mixing`, or None when mixup and CutMix are off."""
        from afd_fast.mixing import Mixing

        return Mixing.of(self.mixup, self.cutmix, self.mix_prob, self.mix_switch_prob)

    @property
    def batch_per_process(self) -> int:
        return self.batch_size // self.world_size

    @property
    def effective_lr(self) -> float:
        """The SGD rate before the schedule: ``lr``, times batch_size / the recipe's with linear scaling."""
        return self.lr * self.batch_size / self.recipe_batch if self.lr_scaling == "linear" else self.lr

    def schedules(self) -> dict[str, Schedule]:
        """The schedule of each optimizer of :class:`afd_fast.step.DualStep` (the Adam pair shares one)."""
        common = dict(kind=self.lr_schedule, warmup_epochs=self.warmup_epochs, epochs=self.epochs)
        adam = Schedule(self.adv_lr, milestones=self.adv_milestones, decay=self.adv_lr_decay, **common)
        return {"logit": Schedule(self.effective_lr, milestones=self.milestones, decay=self.lr_decay, **common),
                "generator": adam, "discriminator": adam}

    def settings(self) -> dict:
        """The resolved flags (plain YAML types): what ``config.yaml`` holds."""
        out = {}
        for f in fields(self):
            if not f.metadata.get("derived"):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_yaml(self) -> str:
        return ("# afd_fast.train configuration, resolved: `python -m afd_fast.train --config <this file>` repeats the "
                "run\n" + yaml.safe_dump(self.settings(), sort_keys=False, default_flow_style=None))

    def describe_schedule(self) -> str:
        s = self.schedules()
        scaled = (f" (lr {self.lr:g} x {self.batch_size}/{self.recipe_batch}, linear scaling)"
                  if self.lr_scaling == "linear" else "")
        return (f"{self.epochs} epochs; SGD {s['logit'].describe()}{scaled}, momentum {self.momentum:g}"
                f"{' nesterov' if self.nesterov else ''}, weight decay {self.weight_decay:g}"
                f"{f', label smoothing {self.label_smoothing:g}' if self.label_smoothing else ''}; "
                f"Adam {s['generator'].describe()}, weight decay {self.adv_weight_decay:g}"
                f"{f'; norms decay {self.norm_weight_decay:g}' if self.norm_weight_decay is not None else ''}"
                f"{f'; biases decay {self.bias_weight_decay:g}' if self.bias_weight_decay is not None else ''}"
                f"{f'; weight EMA {self.model_ema:g} every {self.model_ema_every} step(s)' if self.model_ema else ''}")


def recipe_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml"))


# --- the command line --------------------------------------------------------------------------------

def build_parser(prog: str = "python -m afd_fast.train", description: str | None = None) -> argparse.ArgumentParser:
    """The flags; every default is None here (unset: the config file, the recipe or DEFAULTS decide)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("what to train")
    run.add_argument("--arch", help=f"comma-separated networks, one per peer (default {DEFAULTS['arch']}): "
                                    f"{ARCH_HELP}")
    run.add_argument("--method", choices=METHODS,
                     help="afd (default); the paper's baselines: dml (one forward, every network steps on CE + "
                          "KL towards the others; see --dml-update), one (branches on "
                          "shared low layers, gated-ensemble teacher; identical CIFAR networks), kd (online, "
                          "mean-ensemble teacher), vanilla, l1, l1kd, l1kd-offline (--arch STUDENT,TEACHER with "
                          "--pretrained ,TEACHER.pt: the teacher frozen); ablations adv-only, kd-only (AFD without "
                          "the adversary: one synchronous KD step)")
    run.add_argument("--topology", choices=("pair", "cyclic"),
                     help="who learns from whom (default: pair for 2 networks, cyclic for more)")
    run.add_argument("--data", help="ImageNet-layout folder (train/<class>/, val/<class>/), a folder with file lists "
                                    "train.txt and val.txt ('<path> <label>' lines, paths relative to it) or "
                                    "CIFAR-10/100 in the python format (cifar-10-batches-py, cifar-100-python); "
                                    "default: the embedded synthetic set")
    run.add_argument("--pretrained", help=PRETRAINED_HELP)
    run.add_argument("--temperature", type=float,
                     help="KD temperature T (default: 1 for dml, as the DML paper; 3 otherwise, as the AFD paper)")
    run.add_argument("--dml-update", choices=("sync", "alternate"),
                     help="--method dml only. sync (default): one forward of every network on the batch, every "
                          "network steps on it. alternate: the DML authors' released code, each network's update "
                          "on its own batch, in turn; a step is one iteration of K updates on K batches and an "
                          "epoch K passes of the data, so each network gets one epoch of updates per epoch. At "
                          "SGD momentum 0.9 alternate learns far slower than sync (a ResNet-20 pair from scratch on "
                          "imagenette-mini, 248 updates per network: top-1 22.0 against 38.0 for sync and 38.5 for "
                          "vanilla; benchmarks/README.md)")
    run.add_argument("--output", help=f"folder for metrics, checkpoints, plots and config.yaml (default "
                                      f"{DEFAULTS['output']})")
    run.add_argument("--seed", type=int, help="default 0")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default cuda when a GPU is visible, else cpu")
    run.add_argument("--max-steps", type=int, help="stop after this many steps (smoke runs; the schedule still "
                                                   "follows --epochs)")
    run.add_argument("--print-every", type=int, help="steps between progress lines (default 20)")
    run.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                     help="share batch-norm statistics across processes (CUDA; default: per process, as DDP)")

    cfg = p.add_argument_group(
        "configuration",
        "Precedence: flags, then --config, then the recipe, then the defaults. Every run writes its resolved\n"
        "configuration to <output>/config.yaml; --config <output>/config.yaml repeats the run.")
    cfg.add_argument("--config", metavar="FILE.yaml",
                     help="set any flag from a YAML mapping (keys: the flags' long names, e.g. lr_schedule: cosine)")
    cfg.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    cfg.add_argument("--recipe", metavar="NAME|FILE.yaml",
                     help=f"schedule settings: {', '.join(recipe_names())} (afd_fast/recipes/) or a YAML file of "
                          "the same keys (default: quick without --data; cifar-paper for CIFAR or the paper's CIFAR "
                          "networks; for other networks on an image folder imagenet-scratch, imagenet-paper with "
                          "--pretrained)")

    sched = p.add_argument_group(
        "schedule",
        "Default: the recipe's. A recipe's milestones move with --epochs (x epochs/recipe epochs, to the nearest\n"
        "epoch). --lr-schedule and --warmup-epochs apply to both optimizers.")
    sched.add_argument("--epochs", type=int, help="training epochs (a recipe's milestones move with them)")
    sched.add_argument("--batch-size", type=int, help="the global batch, split evenly over the processes")
    sched.add_argument("--lr-scaling", choices=("none", "linear"),
                       help="linear: the SGD rate times --batch-size / the recipe's batch (the recipes' rates are for "
                            "their own global batch; Adam's is never scaled)")
    sched.add_argument("--lr", type=float, help="SGD learning rate of the logit losses")
    sched.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    sched.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="Nesterov momentum (default off)")
    sched.add_argument("--weight-decay", type=float, help="SGD weight decay")
    sched.add_argument("--lr-schedule", choices=("step", "cosine"),
                       help="step: x --lr-decay at each milestone; cosine: to 0 at the end of the run, per step "
                            "(default step)")
    sched.add_argument("--milestones", metavar="E1,E2,...",
                       help="epochs after which the SGD rate is multiplied by --lr-decay (step schedule); '' for none")
    sched.add_argument("--lr-decay", type=float, help="the step schedule's factor (default 0.1)")
    sched.add_argument("--warmup-epochs", type=float,
                       help="linear warm-up of both rates, per step, over this many epochs (default 0)")
    sched.add_argument("--label-smoothing", type=float, help="of the cross-entropy, in [0, 1) (default 0)")
    sched.add_argument("--adv-lr", type=float, help="Adam learning rate of the adversarial losses")
    sched.add_argument("--adv-milestones", metavar="E1,E2,...", help="the same for the Adam rate")
    sched.add_argument("--adv-lr-decay", type=float, help="the Adam step schedule's factor (default 0.1)")
    sched.add_argument("--adv-weight-decay", type=float, help="Adam weight decay (default 0.1, the paper's)")
    sched.add_argument("--norm-weight-decay", type=float,
                       help="weight decay of normalisation layers' parameters (batch/layer/group norms), in SGD and "
                            "the Adam sets alike (default: as the rest, the paper's decay on everything)")
    sched.add_argument("--bias-weight-decay", type=float,
                       help="weight decay of the other layers' biases, in SGD and the Adam sets alike (default: as "
                            "the rest)")
    sched.add_argument("--model-ema", type=float, metavar="DECAY",
                       help="keep an exponential moving average of every network's weights (e.g. 0.9998), updated "
                            "on the device inside the training step (in the CUDA graph), with the decay warmed up "
                            "as min(DECAY, (1+t)/(10+t)) over its first updates; evaluated every epoch beside the "
                            "raw networks (ema_* metrics) and exported as network<k>_<arch>_ema.pt (default off)")
    sched.add_argument("--model-ema-every", type=int, metavar="N",
                       help="update the EMA every N training steps (default 1)")
    sched.add_argument("--network-image-sizes", metavar="S1,S2,...",
                       help="each network's own input size, one per --arch entry (e.g. 299,224): the loader crops at "
                            "--train-crop-size / --val-crop-size and each network's input is resized to its size on "
                            "the device (bilinear, antialiased), in training and evaluation; default: every network at "
                            "the crop size")

    aug = p.add_argument_group(
        "augmentation and resolutions",
        "Default: the recipe's. The sizes, --auto-augment and --random-erasing: image folders only (DALI and\n"
        "torchvision loaders, the same meaning on both); the CIFAR loader keeps 32 px and refuses those two.\n"
        "Mixup and CutMix run on the training device inside the step: the same on every loader.")
    aug.add_argument("--image-size", type=int,
                     help="shorthand: training crop = validation crop = this, validation resize = it / 0.875 (32 for "
                          "CIFAR recipes, 224 for ImageNet's)")
    aug.add_argument("--train-crop-size", type=int, metavar="PX",
                     help="random-resized crop of training (the networks are built at it; default --image-size)")
    aug.add_argument("--val-resize-size", type=int, metavar="PX",
                     help="validation: the shorter side resized to this (default --val-crop-size / 0.875)")
    aug.add_argument("--val-crop-size", type=int, metavar="PX",
                     help="validation: centre crop after the resize (default --image-size)")
    aug.add_argument("--auto-augment", metavar="POLICY",
                     help="after crop and flip: randaugment[:N:M] (N ops of magnitude M of 31 bins, default 2:9), "
                          "trivialaugment (TrivialAugment wide) or autoaugment (the ImageNet policy); torchvision's "
                          "transforms.v2 or DALI's auto_aug (README: where they differ); default none")
    aug.add_argument("--random-erasing", type=float, metavar="P",
                     help="erase one random box (2-33%% of the area, aspect 0.3-3.3) of the normalised training image "
                          "with probability P, filled with 0 (the mean colour) (default 0: off)")
    aug.add_argument("--mixup", type=float, metavar="ALPHA",
                     help="mixup: a mixed batch is lam*x + (1-lam)*x[perm] with lam ~ Beta(ALPHA, ALPHA), one lam per "
                          "batch, and soft targets through the fused loss (e.g. 0.2; default 0: off)")
    aug.add_argument("--cutmix", type=float, metavar="ALPHA",
                     help="CutMix: a box of sqrt(1-lam) of each side, lam ~ Beta(ALPHA, ALPHA), pasted from x[perm]; "
                          "lam becomes 1 - the box's share of the image (e.g. 1.0; default 0: off)")
    aug.add_argument("--mix-prob", type=float, metavar="P",
                     help="the probability that a batch is mixed at all (default 1)")
    aug.add_argument("--mix-switch-prob", type=float, metavar="P",
                     help="with --mixup and --cutmix: the probability of CutMix instead of mixup (default 0.5)")
    aug.add_argument("--save-samples", type=int, metavar="N",
                     help="write the first N training images of epoch 0 (rank 0's, augmented, mixed with the run's "
                          "mixup/CutMix, un-normalised) as a grid to <output>/samples.png at start-up (default 0: "
                          "none)")

    data = p.add_argument_group("data loading")
    data.add_argument("--workers", type=int,
                      help="data-loading processes (DataLoader) or threads (DALI) per training process (default 2)")
    data.add_argument("--loader", choices=BACKENDS,
                      help="auto (default): NVIDIA DALI when installed (GPU decode on CUDA), else the torchvision "
                           "DataLoader")
    data.add_argument("--skip-bad-files", action=argparse.BooleanOptionalAction,
                      help="leave out non-image, truncated or (with --verify-images) undecodable files (reported) "
                           "instead of stopping")
    data.add_argument("--verify-images", action=argparse.BooleanOptionalAction,
                      help="decode every image once at start-up to find corrupt files (a pass over the data set)")
    data.add_argument("--hw-decoder-load", type=float,
                      help="DALI on a GPU: share of JPEG decoding given to the hardware decoder (0..1, default 0.65)")
    data.add_argument("--prefetch", type=int, help="DALI: batches prepared ahead (prefetch queue depth, default 2)")
    data.add_argument("--bn-recalibrate", type=int, metavar="N",
                      help="before each evaluation and the export, recompute every network's (and EMA's) batch-norm "
                           "statistics over N batches of training images prepared as validation images (no "
                           "augmentation), averaged over the processes; checkpoints keep the training statistics "
                           "(default 0: off)")

    ckpt = p.add_argument_group(
        "checkpoints and preemption",
        "last.pt is written at every epoch end, every --checkpoint-every steps / --checkpoint-minutes (by a\n"
        "background thread: training pauses only to copy the state to host memory) and on SIGTERM or SIGUSR1,\n"
        "after which every process exits with status 128 + the signal number and the log names the command\n"
        "that resumes. Writes are atomic and fsynced; previous.pt keeps the checkpoint before last.pt.\n"
        "--resume refuses a checkpoint of another run (architectures, method, topology, data, batch, image\n"
        "size, loader, steps per epoch) and names other changed settings.")
    ckpt.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH|auto",
                      help="continue exactly where a checkpoint stopped, mid-epoch included (same batches, same "
                           "augmentation, every RNG); alone: the newest complete checkpoint in --output; 'auto': "
                           "that when --output has a checkpoint, else start fresh (torchrun --max-restarts, "
                           "requeued jobs)")
    ckpt.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="also write last.pt every STEPS steps")
    ckpt.add_argument("--checkpoint-minutes", type=float, metavar="MINUTES",
                      help="also write last.pt when MINUTES have passed since the last one (with several "
                           "processes checked every --signal-check-every steps)")
    ckpt.add_argument("--signal-check-every", type=int, metavar="STEPS",
                      help="with several processes: steps between the checks (one small all-reduce) that make every "
                           "process stop after the same step on a signal (default: --print-every); one process "
                           "checks after every step at no cost")

    fast = p.add_argument_group("speed", "--amp, --channels-last and --cuda-graph are on by default with "
                                         "--device cuda and off on the CPU")
    fast.add_argument("--amp", choices=AMP_MODES, help="autocast the forward in bf16 or fp16 (fp16 adds on-device "
                                                       "loss scaling); default bf16 on CUDA, off on the CPU")
    fast.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                      help="NHWC memory layout of the networks and the batches")
    fast.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                      help="capture the whole training step (forward, three gradient sets, their averaging, "
                           "three optimizer steps) in one CUDA graph and replay it")
    fast.add_argument("--batched-backward", action=argparse.BooleanOptionalAction,
                      help="experiment: the logit and adversarial gradient sets through the extractors in one "
                           "batched backward (same values; benchmarks/step.py measures whether it pays)")
    return p


def _kinds(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    """setting -> (type, choices) from the parser: what a config file's value must be."""
    kinds = {}
    for action in parser._actions:
        if action.dest in NOT_SETTINGS or action.dest == "help":
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            kind = bool
        elif action.dest in ("arch", "pretrained", "milestones", "adv_milestones", "network_image_sizes"):
            kind = list
        else:
            kind = action.type or str
        kinds[action.dest] = (kind, action.choices)
    return kinds


KINDS = _kinds(build_parser())
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              list: "a list or a comma-separated string"}


def _checked(key: str, value, source: str):
    """A config or recipe file's value, type-checked against its flag."""
    kind, choices = KINDS[key]
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, (list, str)) if kind is list else isinstance(value, str))
    if not ok:
        raise ConfigError(f"{source}: {key}: expected {TYPE_NAMES[kind]}, got {value!r} ({type(value).__name__})")
    if choices and value not in choices:
        raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(map(str, choices))}")
    return float(value) if kind is float else value


def load_yaml(path: str, what: str) -> dict:
    """A YAML mapping from a file, or a ConfigError that says what is wrong with it."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{what} {path!r} cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path!r} is not YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path!r} is not a mapping of settings (it holds a {type(data).__name__}); write "
                          "one 'key: value' per line, e.g. 'epochs: 30'")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def read_config_file(path: str) -> dict:
    """--config: every key a flag, every value of its flag's type (None: unset)."""
    out = {}
    for key, value in load_yaml(path, "config file").items():
        if key not in KINDS:
            near = difflib.get_close_matches(key, KINDS, n=1)
            raise ConfigError(f"config file {path!r}: {key!r} is not a setting of afd_fast.train"
                              f"{f' (did you mean {near[0]!r}?)' if near else ''}; its keys are the flags' long "
                              "names (python -m afd_fast.train --help)")
        if value is not None:
            out[key] = _checked(key, value, f"config file {path!r}")
    return out


def load_recipe(name: str) -> tuple[str, dict]:
    """(name or absolute path, settings) of a shipped recipe or a recipe file."""
    if name in recipe_names():
        path, label = os.path.join(RECIPE_DIR, f"{name}.yaml"), name
    elif name.endswith((".yaml", ".yml")) and os.path.isfile(name):
        path = label = os.path.abspath(name)
    else:
        raise ConfigError(f"unknown recipe {name!r}: give one of {', '.join(recipe_names())} or a recipe's YAML file")
    settings = {}
    for key, value in load_yaml(path, "recipe").items():
        if key == "description":
            continue
        if key not in RECIPE_KEYS:
            raise ConfigError(f"recipe {path!r}: {key!r} is not a recipe setting; a recipe sets "
                              f"{', '.join(RECIPE_KEYS)} (and a description)")
        settings[key] = _checked(key, value, f"recipe {path!r}")
    missing = [k for k in RECIPE_REQUIRED if k not in settings]
    if missing:
        raise ConfigError(f"recipe {path!r} does not set {', '.join(missing)}")
    return label, settings


# --- resolution --------------------------------------------------------------------------------------

def choose_recipe(data: str | None, archs, pretrained) -> tuple[str, str]:
    """(recipe, why) when none is given."""
    from afd_fast.data.cifar import find_cifar

    if data is None:
        return "quick", "no --data: the embedded synthetic set"
    if find_cifar(data) is not None:
        return "cifar-paper", "--data holds CIFAR"
    if all(a in CIFAR_NETWORKS for a in archs):
        return "cifar-paper", "--arch names the paper's CIFAR networks"
    if pretrained and any(pretrained):
        return "imagenet-paper", "an image folder with --pretrained: the paper's fine-tuning of pre-trained networks"
    return "imagenet-scratch", ("an image folder without --pretrained: training from scratch (with --pretrained: "
                                "imagenet-paper, the paper's fine-tuning)")


def _names(value) -> list[str]:
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [a.strip().lower() for a in items if a.strip()]


def _network_image_sizes(value, archs: list[str], flag: str) -> tuple[int, ...]:
    """One input size per network, or () for all at --image-size (what a method allows, e.g. ONE's one
    size, AFDModel checks)."""
    if not value:
        return ()
    parts = [str(v).strip() for v in (value.split(",") if isinstance(value, str) else value)]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ConfigError(f"{flag} {value!r}: give positive whole numbers of pixels, e.g. 299,224")
    if len(parts) != len(archs):
        raise ConfigError(f"{flag} has {len(parts)} sizes for {len(archs)} networks (--arch): give one per network")
    return tuple(int(p) for p in parts)


def _epochs_list(value, flag: str) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            if isinstance(item, bool) or isinstance(item, float) or float(item) != int(item):
                raise ValueError
            out.append(int(item))
        except (TypeError, ValueError):
            raise ConfigError(f"{flag}: {item!r} is not an epoch number (give whole epochs, e.g. 30,60)") from None
    return tuple(out)


def scale_milestones(milestones, recipe_epochs: int, epochs: int) -> tuple[int, ...]:
    """A recipe's milestones moved to a run of ``epochs`` (see the module's docstring for the rounding)."""
    moved = (math.floor(m * epochs / recipe_epochs + 0.5) for m in milestones)
    return tuple(sorted({m for m in moved if 1 <= m < epochs}))


def resolve(flags: dict | argparse.Namespace, config_file: str | None = None, world_size: int = 1,
            cuda_available: bool = False, has_extension: bool = True) -> Config:
    """The run's Config from the flags (unset ones None), the config file, the recipe they name (or
    the one chosen for the data) and the number of processes. Reads the files it is given and
    changes nothing; bad input raises ConfigError naming the setting (and the file it came from)."""
    flags = dict(vars(flags) if isinstance(flags, argparse.Namespace) else flags)
    config_file = config_file if config_file is not None else flags.get("config")
    from_file = read_config_file(config_file) if config_file else {}
    given = {**from_file, **{k: v for k, v in flags.items() if v is not None and k in KINDS}}

    def origin(key: str) -> str:
        flag = "--" + key.replace("_", "-")
        return f"{flag} (from {config_file})" if key in from_file and flags.get(key) is None else flag

    # what is trained
    archs = _names(given.get("arch", DEFAULTS["arch"]))
    for problem in filter(None, map(network_problem, archs)):
        raise ConfigError(problem)
    method = given.get("method", DEFAULTS["method"])
    problem = architecture_problem(method, archs)
    if problem:
        raise ConfigError(problem)
    topology = given.get("topology") or ("pair" if len(archs) == 2 else "cyclic")
    if topology == "pair" and len(archs) != 2:
        raise ConfigError("--topology pair is for exactly 2 networks; use cyclic")
    data = given.get("data")
    if data is not None:
        if not os.path.isdir(data):
            raise ConfigError(f"{origin('data')} {data!r} is not a folder")
        data = os.path.abspath(data)
    pretrained = parse_pretrained(given.get("pretrained"), archs)
    if method_spec(method).frozen_teacher and not (pretrained and pretrained[-1]):
        raise ConfigError(f"--method {method} distils from a pre-trained teacher, the last network of --arch: give "
                          "its weights with --pretrained (e.g. ',teacher.pt')")

    # the schedule
    if given.get("recipe"):
        recipe_name, reason = given["recipe"], "as given"
    else:
        recipe_name, reason = choose_recipe(data, archs, pretrained)
    recipe_name, recipe = load_recipe(recipe_name)
    sched = {k: given.get(k, recipe.get(k, DEFAULTS.get(k))) for k in RECIPE_KEYS}
    epochs = sched["epochs"]
    if epochs < 1:
        raise ConfigError(f"{origin('epochs')} must be at least 1, got {epochs}")
    for key in ("milestones", "adv_milestones"):
        if key in given:
            sched[key] = _epochs_list(given[key], origin(key))
            if sched[key] and sched["lr_schedule"] == "cosine":
                raise ConfigError(f"{origin(key)} is for --lr-schedule step; cosine decays every step "
                                  "(leave the milestones out)")
        elif sched["lr_schedule"] == "cosine":
            sched[key] = ()
        else:
            sched[key] = scale_milestones(_epochs_list(sched[key], f"recipe {recipe_name}: {key}"),
                                          recipe["epochs"], epochs)
        ms = sched[key]
        if any(b <= a for a, b in zip(ms, ms[1:])):
            raise ConfigError(f"{origin(key)} {','.join(map(str, ms))}: the milestones must increase")
        late = [m for m in ms if m >= epochs or m < 1]
        if late:
            raise ConfigError(f"{origin(key)}: milestone {late[0]} is not inside the run (epochs 1..{epochs - 1} of "
                              f"--epochs {epochs}: a decay after epoch m, m < {epochs})")
    batch = sched["batch_size"]
    if batch < 1 or batch % world_size:
        raise ConfigError(f"{origin('batch_size')} {batch} is the global batch: it must split evenly over the "
                          f"{world_size} processes")
    for key in ("lr", "adv_lr"):
        if not sched[key] > 0:
            raise ConfigError(f"{origin(key)} must be positive, got {sched[key]:g}")
    for key in ("lr_decay", "adv_lr_decay"):
        if not sched[key] > 0:
            raise ConfigError(f"{origin(key)} must be positive (the factor at each milestone), got {sched[key]:g}")
    for key in ("momentum", "weight_decay", "adv_weight_decay", "norm_weight_decay", "bias_weight_decay"):
        if sched[key] is not None and sched[key] < 0:
            raise ConfigError(f"{origin(key)} must not be negative, got {sched[key]:g}")
    if sched["nesterov"] and sched["momentum"] <= 0:
        raise ConfigError("--nesterov needs a positive --momentum")
    if not 0 <= sched["warmup_epochs"] < epochs:
        raise ConfigError(f"{origin('warmup_epochs')} {sched['warmup_epochs']:g} must be at least 0 and shorter "
                          f"than the run (--epochs {epochs})")
    if not 0 <= sched["label_smoothing"] < 1:
        raise ConfigError(f"{origin('label_smoothing')} must lie in [0, 1), got {sched['label_smoothing']:g}")
    if sched["model_ema"] is not None and not 0 < sched["model_ema"] < 1:
        raise ConfigError(f"{origin('model_ema')} is the EMA's decay per update, in (0, 1) (e.g. 0.9998), "
                          f"got {sched['model_ema']:g}")
    if sched["model_ema_every"] < 1:
        raise ConfigError(f"{origin('model_ema_every')} must be at least 1, got {sched['model_ema_every']}")
    for key in ("image_size", "train_crop_size", "val_resize_size", "val_crop_size"):
        if sched[key] is not None and sched[key] < 1:
            raise ConfigError(f"{origin(key)} must be at least 1 pixel, got {sched[key]}")
    from afd_fast.data.augment import Preparation  # (afd_fast.data's loaders are not imported here)

    Preparation.of(sched["image_size"], sched["train_crop_size"], sched["val_resize_size"], sched["val_crop_size"],
                   sched["auto_augment"], sched["random_erasing"])  # refuses a bad policy, probability or size
    for key in ("mixup", "cutmix"):
        if not sched[key] >= 0:
            raise ConfigError(f"{origin(key)} is Beta's alpha (0: off), it must not be negative, got {sched[key]:g}")
    for key in ("mix_prob", "mix_switch_prob"):
        if not 0 <= sched[key] <= 1:
            raise ConfigError(f"{origin(key)} is a probability, in [0, 1], got {sched[key]:g}")
    network_image_sizes = _network_image_sizes(given.get("network_image_sizes"), archs, origin("network_image_sizes"))

    # the run
    run = {k: given.get(k, DEFAULTS.get(k)) for k in ("output", "seed", "max_steps", "print_every", "sync_bn",
                                                      "workers", "loader", "skip_bad_files", "verify_images",
                                                      "checkpoint_every", "checkpoint_minutes", "signal_check_every",
                                                      "batched_backward", "hw_decoder_load", "prefetch",
                                                      "bn_recalibrate", "save_samples")}
    device = given.get("device") or ("cuda" if cuda_available else "cpu")
    if device == "cuda" and not cuda_available:
        raise ConfigError("--device cuda but no GPU is visible; use --device cpu")
    if run["sync_bn"] and device != "cuda":
        raise ConfigError("--sync-bn needs --device cuda (torch's SyncBatchNorm runs on GPUs only)")
    if not 0.0 <= run["hw_decoder_load"] <= 1.0:
        raise ConfigError(f"--hw-decoder-load must lie in [0, 1], got {run['hw_decoder_load']}")
    if run["prefetch"] < 1:
        raise ConfigError(f"--prefetch must be at least 1, got {run['prefetch']}")
    for key in ("checkpoint_every", "signal_check_every", "print_every", "max_steps"):
        if run[key] is not None and run[key] < 1:
            raise ConfigError(f"{origin(key)} must be at least 1, got {run[key]}")
    if run["save_samples"] < 0:
        raise ConfigError(f"{origin('save_samples')} is a number of images (0: none), got {run['save_samples']}")
    if run["bn_recalibrate"] < 0:
        raise ConfigError(f"{origin('bn_recalibrate')} is a number of batches (0: off), got {run['bn_recalibrate']}")
    if run["workers"] < 0:
        raise ConfigError(f"{origin('workers')} must not be negative, got {run['workers']}")
    if run["checkpoint_minutes"] is not None and not run["checkpoint_minutes"] > 0:
        raise ConfigError(f"--checkpoint-minutes must be positive, got {run['checkpoint_minutes']}")
    run["signal_check_every"] = run["signal_check_every"] or run["print_every"]
    if run["batched_backward"] and run["sync_bn"]:
        raise ConfigError("--batched-backward cannot be combined with --sync-bn (SyncBatchNorm's backward all-reduces)")
    cuda, notes = device == "cuda", []
    amp = given.get("amp") or ("bf16" if cuda else "off")
    channels_last = given.get("channels_last", cuda)
    cuda_graph = given.get("cuda_graph")
    if cuda_graph and not cuda:
        notes.append("--cuda-graph needs --device cuda: the CPU runs eager steps")
    cuda_graph = cuda and cuda_graph is not False
    if cuda_graph and not has_extension:
        notes.append("no CUDA graph: afd_fast._C is not built and the plain-PyTorch losses read the peer weights on "
                     "the host (pip install --no-build-isolation -e .)")
        cuda_graph = False
    dml_update = given.get("dml_update", "sync")
    if dml_update == "alternate" and method != "dml":
        raise ConfigError(f"{origin('dml_update')} alternate is DML's (--method dml); --method {method} steps every "
                          "network on every batch")
    temperature = given.get("temperature", method_spec(method).temperature)
    if not temperature > 0:
        raise ConfigError(f"{origin('temperature')} must be positive, got {temperature:g}")

    return Config(arch=tuple(archs), method=method, topology=topology, data=data, pretrained=pretrained,
                  temperature=temperature, dml_update=dml_update, recipe=recipe_name, **sched,
                  network_image_sizes=network_image_sizes,
                  device=device, amp=amp, channels_last=channels_last, cuda_graph=cuda_graph, **run, world_size=world_size,
                  recipe_batch=recipe["batch_size"], recipe_reason=reason, notes=tuple(notes),
                  resume=flags.get("resume"), print_config=bool(flags.get("print_config")))


def parse(argv=None, description: str | None = None, world_size: int | None = None) -> Config:
    """The command line's Config; a bad setting exits (status 2) with argparse's usage message."""
    import torch

    from afd_fast import ops

    parser = build_parser(description=description)
    flags = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    try:
        return resolve(flags, world_size=world, cuda_available=torch.cuda.is_available(),
                       has_extension=ops.HAS_EXTENSION)
    except ConfigError as e:
        parser.error(str(e))


def recipe_changes(config: Config) -> list[str]:
    """The schedule settings in which a run departs from its recipe, as 'key value (recipe value)';
    a recipe's milestones count as moved with --epochs (only the epochs are named then)."""
    _, recipe = load_recipe(config.recipe)
    changes = []
    for key in RECIPE_KEYS:
        own, value = recipe.get(key, DEFAULTS.get(key)), getattr(config, key)
        if key in ("milestones", "adv_milestones"):
            if config.lr_schedule != "step" or recipe.get("lr_schedule", "step") != "step":
                continue  # the change of schedule says it
            own = scale_milestones(_epochs_list(own, key), recipe["epochs"], config.epochs)
        value, own = (_show(list(v) if isinstance(v, tuple) else v) for v in (value, own))
        if value != own:
            changes.append(f"{key} {value} (recipe {own})")
    return changes


# --- resume ------------------------------------------------------------------------------------------

def resume_differences(saved: dict, current: Config) -> tuple[list[str], list[str]]:
    """(run-defining settings that differ, other settings that differ) between a checkpoint's config
    (its settings dict) and this run's, each as '--flag old -> new'."""
    refuse, warn = [], []
    now = current.settings()
    for key in now:
        if key not in saved:
            continue
        old, new = saved[key], now[key]
        if isinstance(old, tuple):
            old = list(old)
        if old != new:
            flag = "--" + key.replace("_", "-")
            (refuse if key in RUN_DEFINING else warn).append(f"{flag} {_show(old)} -> {_show(new)}")
    return refuse, warn


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
