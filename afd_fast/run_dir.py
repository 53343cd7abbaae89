"""What a run writes in --output besides its checkpoints (afd_fast/checkpoint.py): the folder's start
(earlier checkpoints set aside, metrics.jsonl, config.yaml), each epoch's record (metrics.jsonl,
TensorBoard, the printed top-1s) and the end of the run (summary.json, each network's plain weights,
curves.png)."""
from __future__ import annotations

import json
import math
import os
import sys

import torch

from afd_fast import checkpoint, metrics
from afd_fast.config import Config, recipe_changes
from afd_fast.plotting import pyplot

METRICS = "metrics.jsonl"
SAMPLES = "samples.png"


def prepare(config: Config, writer: checkpoint.CheckpointWriter, found) -> None:
    """Rank 0's start in --output, once the run is built (a resume refused as another run's writes
    nothing): a fresh run (found None) sets an earlier run's checkpoints aside and starts metrics.jsonl
    anew; a resumed one sets the damaged newer checkpoints aside and rewrites metrics.jsonl with the
    checkpoint's epochs. Then config.yaml."""
    os.makedirs(config.output, exist_ok=True)
    metrics_path = os.path.join(config.output, METRICS)
    checkpoint.remove_temporaries(config.output)
    if found is None:
        if config.resume == "auto":
            print(f"afd_fast: --resume auto: no checkpoint in {config.output}: starting fresh")
        writer.start_fresh()
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
    else:
        path, ckpt, damaged = found
        for bad, message in damaged:
            print(f"afd_fast: {message}: resuming from {path} instead; the damaged file is kept as "
                  f"{bad}.damaged", file=sys.stderr)
        checkpoint.set_aside([bad for bad, _ in damaged])  # never resumed from, nor rotated into previous.pt
        with open(metrics_path, "w") as f:  # the records of the epochs that the checkpoint has
            f.writelines(json.dumps(r) + "\n" for r in ckpt["history"])
        writer.continue_from(ckpt)
        print(f"afd_fast: resumed from {path} ({checkpoint.describe(ckpt)})", flush=True)
    write_config(config)


def write_config(config: Config) -> None:
    """<output>/config.yaml: the resolved configuration (--config that file repeats the run)."""
    path = os.path.join(config.output, "config.yaml")
    with open(path + ".tmp", "w") as f:
        f.write(config.to_yaml())
    os.replace(path + ".tmp", path)


class EpochLog:
    """Rank 0's record of each epoch: a line of metrics.jsonl, TensorBoard scalars in
    <output>/tensorboard when tensorboard is installed (opened with the first record), the top-1s printed."""

    def __init__(self, output: str):
        self.output, self.metrics_path = output, os.path.join(output, METRICS)
        self.tensorboard, self.opened = None, False

    def write(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.opened:
            self.tensorboard, self.opened = tensorboard_writer(self.output), True
        if self.tensorboard is not None:
            for key, value in record.items():
                for i, v in enumerate(value if isinstance(value, list) else [value]):
                    self.tensorboard.add_scalar(key if not isinstance(value, list) else f"{key}/net{i}", v,
                                                record["epoch"])
            self.tensorboard.flush()
        print(f"epoch {record['epoch']}: " + ", ".join(f"{k} {v:.2f}" for k, v in record.items() if k.endswith("top1")),
              flush=True)


def tensorboard_writer(output: str):
    """A TensorBoard writer of event files in <output>/tensorboard; None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(output, "tensorboard"))


def save_samples(config: Config, loaders) -> str:
    """--save-samples N: the first N training images of epoch 0 (rank 0's, augmented, un-normalised)
    as one grid, <output>/samples.png. With mixup/CutMix the batches are mixed as the step mixes them,
    drawn from a generator of their own (seeded with --seed): the run's draws stay untouched."""
    from torchvision.utils import save_image

    images = loaders.sample_images(config.save_samples, sample_mixing(config))
    path = os.path.join(config.output, SAMPLES)
    save_image(images, path, nrow=math.ceil(math.sqrt(len(images))), padding=2)
    mixed = f" ({config.mixing.describe()})" if config.mixing else ""
    print(f"afd_fast: {len(images)} training images of epoch 0{mixed} in {path}")
    return path


def sample_mixing(config: Config):
    """The run's mixing as ``mix(images, target) -> images`` on CPU batches, with its own seeded
    generator; None without mixing."""
    mixing = config.mixing
    if mixing is None:
        return None
    generator = torch.Generator().manual_seed(config.seed)
    return lambda images, target: mixing(images, target, generator)[0]


def write_outputs(config: Config, models: dict, history: list[dict], loaders) -> dict:
    """summary.json, the plain weights of every network (network<k>_<arch>.pt) and of its EMA
    (network<k>_<arch>_ema.pt; ``models``: metric prefix -> AFDModel, "" the trained one, "ema_" its
    EMA) and curves.png."""
    model = models[""]
    last = history[-1] if history else {}
    k = len(config.archs)
    # what the run was (benchmarks/accuracy.py sets a run beside the paper's number only when it matches)
    summary = {"method": config.method, "archs": config.archs, "topology": config.topology,
               "epochs": last.get("epoch", 0), "steps": last.get("step", 0), "global_batch": config.batch_size,
               "batch_per_process": config.batch_per_process, "lr": config.effective_lr, "temperature": config.temperature,
               "recipe": config.recipe, "recipe_changes": recipe_changes(config), "max_steps": config.max_steps,
               "lr_schedule": config.lr_schedule, "image_size": config.image_size,
               "network_image_sizes": list(config.network_image_sizes), "classes": loaders.num_classes,
               "train_images": loaders.train_size, "pretrained": bool(config.pretrained and any(config.pretrained)),
               "img_per_s": sum(h["img_per_s"] for h in history) / max(len(history), 1),
               **metrics.final_accuracy(history, len(model.trained_networks())), "val_images": last.get("val_images")}
    with open(os.path.join(config.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for prefix, exported in models.items():
        suffix = "_" + prefix.rstrip("_") if prefix else ""
        for i, (arch, net) in enumerate(zip(config.archs, exported.networks)):
            checkpoint.write_durably({n: t.cpu() for n, t in net.plain_state_dict().items()},
                                     os.path.join(config.output, f"network{i}_{arch}{suffix}.pt"), rotate=False)
    plot_curves(history, k, os.path.join(config.output, "curves.png"))
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
    if "ema_ensemble_top1" in history[-1]:
        ax_acc.plot(epochs, [h.get("ema_ensemble_top1") for h in history], "k:", label="EMA ensemble")
    ax_loss.set(xlabel="epoch", ylabel="training logit loss (CE + KD)", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="validation top-1 (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
