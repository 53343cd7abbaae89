"""Is DML as stable as the synchronous KD step? The training cross-entropy of a from-scratch ResNet-20
pair on real JPEGs (imagenette-mini at 32 px), step by step from the same start on the same batches.

    python benchmarks/dml.py                 # 40 batches, the table of benchmarks/README.md
    python benchmarks/dml.py --batches 120   # longer
    python benchmarks/dml.py --quick         # a few batches: checks that the table is produced (CI)

Rows: vanilla; kd-only (one synchronous step of both networks, T = 1 and 3); ``--method dml`` as
afd_fast runs it (the DML authors' code: each step updates one network on its own batch, T = 1 and
3); and, for contrast, the literal reading of the DML paper's algorithm box that afd_fast used
before: on ONE batch, network 1 steps, its prediction is recomputed on that same batch, then network
2 steps towards it (written out here, no longer in the product). The last rows look for the cause
of DML's early rise: the same turn-taking without the KL term; ``--method dml`` at SGD momentum 0.5
and 0 instead of 0.9; and with the optimizer of the authors' code (Adam, lr 1e-3 here) instead of the
SGD that the AFD paper applies to every compared method. Every row sees the same batches in
the same order: ``batches`` is the number of batches (training steps) consumed, so a DML network has
had half as many updates as a vanilla one at the same batch. The CE of every network is measured on
each batch before its update (the training CE the trainer logs). Figures: the mean CE over batches
15-25 and over the last 10, and the largest rise of a 5-batch mean above the first 5 batches' mean.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks.common as common  # noqa: E402
from afd_fast import ops  # noqa: E402
from afd_fast.data import build_loaders  # noqa: E402
from afd_fast.model import AFDModel  # noqa: E402
from afd_fast.models import build_network  # noqa: E402
from afd_fast.step import DualStep, batch_statistics_only  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "imagenette-mini")
# (label, method, temperature, optimizer of the logit parameters: SGD momentum or "adam")
ROWS = (("vanilla", "vanilla", 3.0, 0.9), ("kd-only T=1", "kd-only", 1.0, 0.9), ("kd-only T=3", "kd-only", 3.0, 0.9),
        ("dml T=1", "dml", 1.0, 0.9), ("dml T=3", "dml", 3.0, 0.9), ("same-batch recomputed DML T=1 (old)", "old", 1.0, 0.9),
        ("turns without KL", "turns", 1.0, 0.9), ("dml T=1 momentum 0.5", "dml", 1.0, 0.5),
        ("dml T=1 momentum 0", "dml", 1.0, 0.0), ("dml T=1 Adam 1e-3", "dml", 1.0, "adam"))


def load_batches(data: str, count: int, batch: int, image_size: int, seed: int) -> tuple[list, int]:
    """The first ``count`` training batches of the seeded epoch order (held in memory, so that every
    row sees exactly the same ones), and the number of classes."""
    loaders = build_loaders(data, image_size, batch, workers=0, seed=seed, backend="torch")
    batches, epoch = [], 0
    while len(batches) < count:
        batches += [(x.clone(), y.clone()) for x, y in loaders.train_epoch(epoch, 0, None)]
        epoch += 1
    return batches[:count], loaders.num_classes


def _pair(arch: str, classes: int, seed: int) -> list:
    torch.manual_seed(seed)
    return [build_network(arch, classes) for _ in range(2)]


def _ce_of_every_network(model: AFDModel, images, target) -> list[float]:
    """Each network's CE on this batch at its current weights, in training mode, without touching
    the running statistics (what a DML step's forward sees)."""
    with torch.no_grad():
        out = []
        for network in model.networks:
            with batch_statistics_only(network):
                out.append(float(F.cross_entropy(network(images)[1], target)))
    return out


def _old_same_batch_dml(model: AFDModel, optimizer: torch.optim.Optimizer, images, target, temperature: float):
    """The DML paper's algorithm box read literally, on one batch: network 1 steps towards network
    2's prediction, its prediction is recomputed on the same batch with the new weights, then
    network 2 steps towards that (what afd_fast's --method dml did before)."""
    logits = [n(images)[1] for n in model.networks]
    weights = torch.tensor([[0.0, 1.0]])
    for k, network in enumerate(model.networks):
        z = torch.stack([logits[k], logits[1 - k].detach()])
        loss, _, _ = ops.mutual_distillation_loss(z, target, weights, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        if k == 0:
            with torch.no_grad(), batch_statistics_only(network):
                logits[0] = network(images)[1]


def _turn_without_kl(model: AFDModel, optimizer: torch.optim.Optimizer, images, target, k: int):
    """DML's turn-taking (network k steps on this batch) on the CE alone: vanilla at half the updates."""
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model.networks[k](images)[1], target).backward()
    optimizer.step()


def run_row(method: str, temperature: float, optimizer: float | str, nets: list, batches: list,
            lr: float) -> list[list[float]]:
    """Trains a copy of ``nets`` on the batches; returns each network's CE on each batch before it."""
    product_method = "vanilla" if method in ("old", "turns") else method
    model = AFDModel(copy.deepcopy(nets), product_method, "pair", temperature=temperature)
    step = DualStep(model, lr=lr, weight_decay=5e-4, momentum=0.9 if optimizer == "adam" else optimizer)
    if optimizer == "adam":  # the DML authors' optimizer (their code's L2 regulariser is Adam's weight_decay)
        step.optimizers["logit"] = torch.optim.Adam(model.logit_parameters(), lr=1e-3, weight_decay=5e-4)
    model.train()
    curve = []
    for index, (images, target) in enumerate(batches):
        curve.append(_ce_of_every_network(model, images, target))
        if method == "old":
            _old_same_batch_dml(model, step.optimizers["logit"], images, target, temperature)
        elif method == "turns":
            _turn_without_kl(model, step.optimizers["logit"], images, target, index % 2)
        else:
            step(images, target, step.turn_of(index))
    return curve


def summarise(curve: list[list[float]]) -> dict:
    mean = [sum(c) / len(c) for c in curve]
    n = len(mean)

    def window(a, b):
        part = mean[a:b]
        return sum(part) / max(len(part), 1)
    first = window(0, 5)
    rise = max((window(i, i + 5) - first for i in range(5, max(n - 4, 6))), default=0.0)
    return {"ce_first5": first, "ce_15_25": window(15, 26), "ce_last10": window(max(n - 10, 0), n),
            "max_rise_over_first5": rise, "peak_ce": max(mean)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="ImageNet-layout folder of real JPEGs")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=1, help="starts (network initialisations) averaged over")
    p.add_argument("--rows", default=None,
                   help="comma-separated row labels to run (default: all): " + "; ".join(row[0] for row in ROWS))
    p.add_argument("--quick", action="store_true", help="6 batches of 8 at 16 px: checks that the table is produced")
    p.add_argument("--output", default=None,
                   help="JSON results (default: benchmarks/results/dml-stability.json, none with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.batch_size, args.image_size = 6, 8, 16
    batches, classes = load_batches(args.data, args.batches, args.batch_size, args.image_size, seed=0)
    results = []
    chosen = [r.strip() for r in args.rows.split(",")] if args.rows else [row[0] for row in ROWS]
    unknown = set(chosen) - {row[0] for row in ROWS}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}")
    for label, method, temperature, optimizer in (row for row in ROWS if row[0] in chosen):
        start = time.perf_counter()
        curves = [run_row(method, temperature, optimizer, _pair(args.arch, classes, seed), batches, args.lr)
                  for seed in range(args.seeds)]
        mean_curve = [[sum(c[i][k] for c in curves) / len(curves) for k in range(2)] for i in range(args.batches)]
        row = {"row": label, "method": method, "temperature": temperature, "optimizer": optimizer,
               **summarise(mean_curve),
               "seconds": time.perf_counter() - start, "curve": mean_curve}
        results.append(row)
        print(f"{label:38s} CE first 5 {row['ce_first5']:.3f}  batches 15-25 {row['ce_15_25']:.3f}  "
              f"last 10 {row['ce_last10']:.3f}  max rise {row['max_rise_over_first5']:+.3f}  "
              f"({row['seconds']:.0f} s)", flush=True)
    payload = {"machine": common.machine(torch.device("cpu")), "ln_classes": math.log(classes),
               "settings": {k: v for k, v in vars(args).items() if k != "output"}, "results": results}
    output = args.output or (None if args.quick else os.path.join(ROOT, "benchmarks", "results", "dml-stability.json"))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(payload, f, indent=1)
    return payload


if __name__ == "__main__":
    main()
