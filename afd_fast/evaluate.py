"""Top-1 and top-5 of trained networks, on any data the trainer reads, the way the trainer evaluates.

    python -m afd_fast.evaluate runs/afd/last.pt                       # every network, their mean, the ensemble
    python -m afd_fast.evaluate runs/afd/network0_resnet18.pt --data /imagenet --output top1.json
    torchrun --nproc_per_node=8 -m afd_fast.evaluate runs/afd/best.pt --bn-recalibrate 200

WEIGHTS is one checkpoint of a run (last.pt, previous.pt, best.pt: every network, their mean and
their ensemble, and with an EMA in the checkpoint the same for the EMA networks, keys ``ema_...``),
or exported networks (``network<k>_<arch>.pt``, the EMA's ``network<k>_<arch>_ema.pt``; the
architecture comes from the file name, or from --arch for files named otherwise), evaluated
together: each network, their mean and their ensemble (the mean of the softmaxes); EMA exports
form a group of their own (``ema_...``).

A checkpoint brings its run's settings: the networks, the method, image size, batch size, seed and
data (--data defaults to the run's). Exported networks need --data; their image size defaults to
32 px for the paper's CIFAR networks and 224 px for the others. Networks trained for another number
of classes than the data's, or weights that are not the named architecture's, are refused with a
message naming the file and what differs.

The data is read as the trainer reads it (DALI or the torchvision DataLoader, CIFAR on the device),
the validation split by default, or with --split train the training images, each once, prepared
as the validation images are (resize and centre crop, no augmentation). Accuracy is computed as the
trainer's (afd_fast.metrics.evaluate), so a run's last metrics.jsonl record is reproduced for its
final weights. Under torchrun each process scores its share and the counts are summed.

--bn-recalibrate N recomputes every batch-norm layer's running statistics over N training batches
(per process, at the batch size) prepared as the validation images are, before scoring
(afd_fast.calibration). Progress goes to stderr; the results to stdout and, with --output, to a
JSON file.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from afd_fast import checkpoint, metrics
from afd_fast.calibration import recalibrated
from afd_fast.config import AMP_MODES, BACKENDS, DEFAULTS
from afd_fast.data import Preparation, build_loaders
from afd_fast.errors import AfdFastError, CheckpointError, ConfigError, exit_with
from afd_fast.model import AFDModel
from afd_fast.models import build_network, network_problem
from afd_fast.models.cifar import CIFAR_NETWORKS
from afd_fast.step import AMP_DTYPES
from afd_fast.train import setup_distributed, synthetic_data

EXPORT_NAME = re.compile(r"^network(\d+)_(.+?)(_ema)?\.pt$")  # run_dir.write_outputs' names
DEFAULT_BATCH = 256


@dataclass
class Group:
    """Networks scored together: their results' keys start with ``prefix``."""

    prefix: str
    archs: list[str]
    files: list[str]
    states: list[dict] = field(default_factory=list)  # exported networks' plain state_dicts


@dataclass
class Weights:
    """What WEIGHTS named: a checkpoint (its dict) or groups of exported networks."""

    checkpoint: dict | None = None
    path: str | None = None
    groups: list[Group] = field(default_factory=list)

    @property
    def settings(self) -> dict:
        return self.checkpoint["config"] if self.checkpoint is not None else {}

    @property
    def archs(self) -> list[str]:
        if self.checkpoint is not None:
            return list(self.settings["arch"])
        return [a for g in self.groups for a in g.archs]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m afd_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", nargs="+", metavar="WEIGHTS",
                   help="a checkpoint (last.pt, best.pt, previous.pt), or exported networks network<k>_<arch>.pt "
                        "(EMA: network<k>_<arch>_ema.pt)")
    p.add_argument("--arch", help="the architecture of exported networks named otherwise: one, or one per file, "
                                  "comma-separated (as --arch of afd_fast.train)")
    p.add_argument("--data", help="an ImageNet-layout folder, a folder with train.txt and val.txt, or CIFAR's "
                                  "python format (default: a checkpoint's run's data; required for exports)")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="val (default), or train: every training image once, prepared as validation images")
    p.add_argument("--image-size", type=int, help="pixels (default: a checkpoint's; exports: 32 for the paper's "
                                                  "CIFAR networks, else 224)")
    p.add_argument("--network-image-sizes", metavar="S1,S2,...",
                   help="exports: one input size per network (of each group, raw or EMA), each network's "
                        "images resized on the device (default: every network at --image-size)")
    p.add_argument("--batch-size", type=int, help=f"the global batch, split over the processes (default: a "
                                                  f"checkpoint's, else {DEFAULT_BATCH}); also the batch of "
                                                  "--bn-recalibrate")
    p.add_argument("--bn-recalibrate", type=int, default=0, metavar="N",
                   help="recompute the batch-norm running statistics over N training batches per process "
                        "(unaugmented) before scoring (default 0: the stored statistics)")
    p.add_argument("--seed", type=int, help="the order of --bn-recalibrate's batches (default: a checkpoint's, else 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default cuda when a GPU is visible, else cpu")
    p.add_argument("--amp", choices=AMP_MODES, help="autocast the forward (default bf16 on cuda, off on the cpu)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels-last weights (default on with cuda)")
    p.add_argument("--loader", choices=BACKENDS, default=DEFAULTS["loader"],
                   help="DALI or the torchvision DataLoader (auto: DALI when installed)")
    p.add_argument("--workers", type=int, default=DEFAULTS["workers"],
                   help=f"DALI threads or DataLoader processes (default {DEFAULTS['workers']})")
    p.add_argument("--output", metavar="FILE.json", help="also write the results as JSON")
    return p


# --- the weights ---------------------------------------------------------------------------------

def read_weights(paths: list[str], arch: str | None) -> Weights:
    """One checkpoint, or exported networks grouped into raw and EMA; bad paths raise naming the file."""
    for path in paths:
        if not os.path.isfile(path):
            raise CheckpointError(f"{path!r} does not exist or is not a file")
    archs = [a.strip().lower() for a in arch.split(",")] if arch else None
    if archs is not None and len(archs) not in (1, len(paths)):
        raise ConfigError(f"--arch names {len(archs)} architectures for {len(paths)} files: give one, or one per file")
    exports = [EXPORT_NAME.match(os.path.basename(p)) for p in paths]
    if archs is None and not any(exports):
        if len(paths) > 1:
            raise ConfigError(f"{paths[1]!r}: give one checkpoint, or exported networks (network<k>_<arch>.pt)")
        return Weights(checkpoint=read_checkpoint(paths[0]), path=paths[0])
    groups = {"": Group("", [], []), "ema_": Group("ema_", [], [])}
    for i, (path, match) in enumerate(zip(paths, exports)):
        if archs is None and match is None:
            raise ConfigError(f"{path!r} is not named network<k>_<arch>.pt: give its architecture with --arch "
                              "(or evaluate a checkpoint alone)")
        name = archs[i if len(archs) > 1 else 0] if archs is not None else match.group(2).lower()
        problem = network_problem(name)
        if problem:
            raise ConfigError(f"{path!r}: {problem}")
        group = groups["ema_" if match is not None and match.group(3) else ""]
        group.archs.append(name)
        group.files.append(path)
        group.states.append(read_state_dict(path))
    return Weights(groups=[g for g in groups.values() if g.files])


def read_checkpoint(path: str) -> dict:
    try:
        ckpt = checkpoint.load(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (an exported network's weights need its architecture: a file named "
                              "network<k>_<arch>.pt, or --arch)") from None
    if not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"checkpoint {path!r} has no run configuration (written by an earlier afd_fast): "
                              "evaluate its run's exported networks instead")
    return ckpt


def read_state_dict(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001: any unpickling failure means the same to the user
        raise CheckpointError(f"{path!r} cannot be read as a state_dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = "an afd_fast checkpoint" if isinstance(state, dict) and "model" in state else "not a state_dict"
        raise CheckpointError(f"{path!r} is {kind}, not an exported network's plain state_dict")
    return state


def check_weights(path: str, what: str, expected: dict, given: dict, num_classes: int, data: str) -> None:
    """Raise naming the file and what differs when ``given`` does not fit ``expected`` (the rebuilt
    model's state_dict for the data's ``num_classes``): other entries or shapes (CheckpointError),
    or only the classifier's class count (ConfigError)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path!r} does not hold {what}'s weights: {len(missing)} of its entries missing "
                              f"(e.g. {missing[:2]}), {len(unexpected)} not its own (e.g. {unexpected[:2]})")
    differ = [(k, tuple(given[k].shape), tuple(expected[k].shape)) for k in expected
              if given[k].shape != expected[k].shape]
    if not differ:
        return
    # the classifier's rows are the only difference: another number of classes
    if all(want[:1] == (num_classes,) and got[1:] == want[1:] for _, got, want in differ):
        trained = sorted({got[0] for _, got, _ in differ})
        raise ConfigError(f"{path!r}: {what} was trained for {', '.join(map(str, trained))} classes, the data "
                          f"{data!r} has {num_classes}")
    key, got, want = differ[0]
    raise CheckpointError(f"{path!r} does not hold {what}'s weights: {key} has shape {list(got)} in the file, "
                          f"{list(want)} in {what} ({len(differ)} entries differ)")


def build_models(weights: Weights, num_classes: int, image_sizes, data: str) -> list[tuple[str, AFDModel, list]]:
    """(key prefix, model with the weights loaded, a description of each network) per scored group."""
    if weights.checkpoint is not None:
        s, path = weights.settings, weights.path
        networks = [build_network(a, num_classes) for a in s["arch"]]
        # built as the run built it: at its training sizes (a discriminator's shape follows the maps')
        trained_at = s.get("network_image_sizes") or s.get("train_crop_size") or s["image_size"]
        model = AFDModel(networks, s["method"], s["topology"], trained_at, s.get("temperature"))
        described = [{"arch": a, "file": path} for a in s["arch"]]
        out = []
        for prefix, state in (("", weights.checkpoint["model"]), ("ema_", (weights.checkpoint.get("ema") or {}).get("model"))):
            if state is None:
                continue
            what = f"the {'EMA of the ' if prefix else ''}{s['method']} model of {', '.join(s['arch'])}"
            target = copy.deepcopy(model) if prefix else model
            check_weights(path, what, target.state_dict(), state, num_classes, data)
            target.load_state_dict(state)
            out.append((prefix, target, described))
        return out
    out = []
    for group in weights.groups:
        networks = []
        for arch, path, state in zip(group.archs, group.files, group.states):
            network = build_network(arch, num_classes)
            check_weights(path, arch, network.plain_state_dict(), state, num_classes, data)
            network.load_plain_state_dict(state)
            networks.append(network)
        model = AFDModel(networks, "vanilla", "cyclic", image_sizes)
        out.append((group.prefix, model, [{"arch": a, "file": f} for a, f in zip(group.archs, group.files)]))
    return out


# --- the run -------------------------------------------------------------------------------------

class ProgressLine:
    """Images scored (this process's count times the processes) and images/s on stderr, one line
    redrawn on a terminal, printed once at the end otherwise."""

    def __init__(self, what: str, world: int, enabled: bool):
        self.what, self.world, self.enabled = what, world, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.images, self.start, self.shown = 0, time.perf_counter(), 0.0

    def __call__(self, images: int) -> None:
        self.images += images * self.world
        now = time.perf_counter()
        if self.tty and now - self.shown > 0.5:
            self.shown = now
            print(f"\r{self.line()}", end="", file=sys.stderr, flush=True)

    def line(self) -> str:
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        return f"{self.what}: {self.images} images, {rate:.0f} img/s"

    def close(self) -> None:
        if self.enabled:
            print(f"\r{self.line()}" if self.tty else self.line(), file=sys.stderr, flush=True)


def resolve(args: argparse.Namespace, weights: Weights) -> dict:
    """The evaluation's settings: flags, else the checkpoint's run's, else the defaults."""
    s = weights.settings
    cifar = all(a in CIFAR_NETWORKS for a in weights.archs)
    data = args.data or s.get("data")
    if data is None and weights.checkpoint is None:
        raise ConfigError("exported networks need --data (the images to score them on)")
    image_size = _first(args.image_size, s.get("image_size"), 32 if cifar else 224)
    if args.network_image_sizes and weights.checkpoint is not None:
        raise ConfigError("--network-image-sizes is for exported networks: a checkpoint's networks take its run's sizes")
    sizes = args.network_image_sizes or s.get("network_image_sizes")
    if isinstance(sizes, str):
        try:
            sizes = [int(v) for v in sizes.split(",")]
        except ValueError:
            raise ConfigError(f"--network-image-sizes {sizes!r}: expected comma-separated integers") from None
    batch = _first(args.batch_size, s.get("batch_size"), DEFAULT_BATCH)
    for flag, value in (("--image-size", image_size), ("--batch-size", batch)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.bn_recalibrate < 0:
        raise ConfigError(f"--bn-recalibrate must not be negative, got {args.bn_recalibrate}")
    # the run's validation sizes (and training crop, the networks' size), unless --image-size sets them all
    run_sizes = [None if args.image_size else s.get(k) for k in ("train_crop_size", "val_resize_size", "val_crop_size")]
    return {"data": data, "image_size": image_size, "network_image_sizes": list(sizes or []),
            "batch_size": batch, "seed": _first(args.seed, s.get("seed"), 0),
            "preparation": Preparation.of(image_size, *run_sizes)}


def _first(*values):
    return next(v for v in values if v is not None)


def main(argv=None) -> dict:
    """Scores the weights; returns (on every process) and prints (rank 0) the results dict of --output."""
    args = build_parser().parse_args(argv)
    weights = read_weights(args.weights, args.arch)
    settings = resolve(args, weights)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no GPU is visible; use --device cpu")
    rank, world, device = setup_distributed(device_name)
    try:
        return evaluate(args, weights, settings, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def evaluate(args, weights: Weights, settings: dict, rank: int, world: int, device: torch.device) -> dict:
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batch = settings["batch_size"]
    if batch % world:
        raise ConfigError(f"--batch-size {batch} is the global batch: it must split evenly over the {world} processes")
    data = settings["data"] or synthetic_data(settings["image_size"], rank)  # (None: the embedded synthetic set)
    loaders = build_loaders(data, settings["preparation"], batch // world, args.workers, settings["seed"], rank, world,
                            backend=args.loader, device=device,
                            dtype=torch.float16 if amp == "fp16" else torch.float32, val_split=args.split)
    if args.bn_recalibrate and loaders.train_size // world < batch // world:
        raise ConfigError(f"--bn-recalibrate: {loaders.train_size} training images in {data!r} make no batch of "
                          f"{batch // world} per process: give a smaller --batch-size")
    sizes = settings["network_image_sizes"] or settings["preparation"].train_crop
    models = build_models(weights, loaders.num_classes, sizes, data)
    for _, model, _ in models:
        model.to(device, memory_format=memory_format)
    amp_dtype = AMP_DTYPES[amp]
    results: dict = {}
    calibrate = (recalibrated([m for _, m, _ in models], loaders.calibration_batches(args.bn_recalibrate), device,
                              amp_dtype, memory_format) if args.bn_recalibrate else contextlib.nullcontext())
    with calibrate:
        for prefix, model, _ in models:
            progress = ProgressLine(f"{prefix or 'networks'} on {args.split}", world, enabled=rank == 0)
            scores = metrics.evaluate(model, loaders.val, device, amp_dtype, progress=progress)
            progress.close()
            results.update({f"{prefix}{k}": v for k, v in scores.items()})
    out = {"weights": [os.path.abspath(p) for p in args.weights], "data": data, "split": args.split,
           "images": results.pop("val_images"), "classes": loaders.num_classes, "loader": loaders.backend,
           "image_size": settings["image_size"], "network_image_sizes": settings["network_image_sizes"],
           "batch_size": batch, "processes": world, "device": str(device), "amp": amp, "channels_last": channels_last,
           "bn_recalibrate": args.bn_recalibrate,
           "networks": {f"{prefix}net{i}": d for prefix, _, described in models for i, d in enumerate(described)},
           "results": {k: v for k, v in results.items() if not k.endswith("val_images")}}
    if rank == 0:
        report(out)
        if args.output:
            with open(args.output, "w") as f:
                json.dump(out, f, indent=2)
    return out


def report(out: dict) -> None:
    recalibrated_over = (f", batch norms recalibrated over {out['bn_recalibrate']} training batches per process"
                         if out["bn_recalibrate"] else "")
    print(f"afd_fast.evaluate: {out['images']} {out['split']} images of {out['data']} ({out['classes']} classes, "
          f"{out['image_size']} px, {out['loader']} loader, amp {out['amp']}{recalibrated_over})")
    results = out["results"]
    for key in (k[:-5] for k in results if k.endswith("_top1")):
        arch = out["networks"].get(key, {}).get("arch")
        name = f"{key} ({arch})" if arch else key
        print(f"  {name:<32} top-1 {results[key + '_top1']:6.2f}  top-5 {results[key + '_top5']:6.2f}")


if __name__ == "__main__":
    try:
        main()
    except AfdFastError as e:
        exit_with(e)
