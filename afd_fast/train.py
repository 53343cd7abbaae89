"""Train K networks together with online adversarial feature-map distillation (or a baseline).

    python -m afd_fast.train                              # synthetic default data, CPU or GPU
    torchrun --nproc_per_node=8 -m afd_fast.train --arch resnet18,resnet34 --data /imagenet --recipe imagenet-paper

Without --data a small synthetic JPEG folder (generated once, cached) is used, so the command runs
end to end on a fresh machine. Outputs in --output: metrics.jsonl, summary.json, curves.png,
checkpoints (last.pt, best.pt) and each network's plain state_dict (network<k>_<arch>.pt).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist

from afd_fast import afd, ops
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
    p.add_argument("--method", default="afd", choices=afd.METHODS)
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
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--lr", type=float, help="SGD learning rate of the logit losses")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--adv-lr", type=float, help="Adam learning rate of the adversarial losses")
    p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument("--image-size", type=int)
    p.add_argument("--output", default="runs/afd", help="folder for metrics, checkpoints and plots")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="resume from a checkpoint (default: <output>/last.pt)")
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
    p.add_argument("--pretrained", default=None, help="comma-separated local state_dict files, one per network")
    p.add_argument("--print-every", type=int, default=20, help="steps between progress lines")
    p.add_argument("--sync-bn", action="store_true",
                   help="share batch-norm statistics across processes (CUDA; default: per process, as DDP)")
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
    if len(args.archs) < 2 and args.method != "vanilla":
        p.error(f"--method {args.method} distils between networks: give at least 2 in --arch (e.g. resnet20,resnet20)")
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
            if not os.path.isfile(path):
                p.error(f"--pretrained file {path!r} does not exist")
    recipe = args.recipe or ("quick" if args.data is None else
                             "imagenet-paper" if args.archs[0] in IMAGENET_ARCHS else "cifar-paper")
    args.recipe = recipe
    for key, value in RECIPES[recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible; use --device cpu")
    if args.sync_bn and args.device != "cuda":
        p.error("--sync-bn needs --device cuda (torch's SyncBatchNorm runs on GPUs only)")
    if not 0.0 <= args.hw_decoder_load <= 1.0:
        p.error(f"--hw-decoder-load must lie in [0, 1], got {args.hw_decoder_load}")
    if args.prefetch < 1:
        p.error(f"--prefetch must be at least 1, got {args.prefetch}")
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
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


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


# --- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: afd.AFDModel, loader, device: torch.device, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1/top-5 of every network and of the ensemble (mean of the softmaxes), over all processes."""
    model.eval()
    k = len(model.networks)
    correct = torch.zeros(k + 1, 2, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            probs = torch.stack([n(images)[1].float().softmax(-1) for n in model.networks])
        probs = torch.cat([probs, probs.mean(0, keepdim=True)])
        top5 = probs.topk(min(5, probs.shape[-1]), -1).indices
        hit = top5 == target[None, :, None]
        correct[:, 0] += hit[..., 0].sum(-1)
        correct[:, 1] += hit.any(-1).sum(-1)
        count += target.numel()
    if dist.is_initialized():
        dist.all_reduce(correct)
        dist.all_reduce(count)
    model.train()
    acc = (100 * correct / count.clamp(min=1)).tolist()
    names = [f"net{i}" for i in range(k)] + ["ensemble"]
    return {**{f"{n}_top{t}": acc[i][j] for i, n in enumerate(names) for j, t in enumerate((1, 5))},
            "val_images": int(count.item())}


# --- checkpoints -----------------------------------------------------------------------------------

def save_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the run ---------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution algorithms once
    is_main = rank == 0
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    data_root = args.data
    if data_root is None:
        if is_main:
            data_root = synthetic_image_folder(size=args.image_size)
        if dist.is_initialized():
            dist.barrier()
        data_root = synthetic_image_folder(size=args.image_size)
    loaders = build_loaders(data_root, args.image_size, args.batch_size, args.workers, args.seed, rank, world,
                            backend=args.loader, device=device, skip_bad=args.skip_bad_files,
                            hw_decoder_load=args.hw_decoder_load, prefetch=args.prefetch,
                            dtype=torch.float16 if args.amp == "fp16" else torch.float32, verify=args.verify_images)

    networks = [build_network(a, loaders.num_classes) for a in args.archs]
    for net, path in zip(networks, args.pretrained or []):
        net.load_plain_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = afd.AFDModel(networks, args.method, args.topology, args.image_size, args.temperature).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if args.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step = afd.DualStep(model, lr=args.lr, weight_decay=args.weight_decay, adv_lr=args.adv_lr,
                        average_gradients=average_across_processes if world > 1 else None, amp=args.amp,
                        capturable=args.cuda_graph, batched_backward=args.batched_backward)
    train_step = GraphedStep(step) if args.cuda_graph else step
    schedules = {name: torch.optim.lr_scheduler.MultiStepLR(
                     opt, list(args.adv_milestones if name != "logit" else args.milestones), 0.1)
                 for name, opt in step.optimizers.items()}

    os.makedirs(args.output, exist_ok=True)
    metrics_path = os.path.join(args.output, "metrics.jsonl")
    start_epoch, global_step, best, history = 0, 0, -1.0, []
    if args.resume is not None:
        path = args.resume or os.path.join(args.output, "last.pt")
        if not os.path.isfile(path):
            raise SystemExit(f"--resume: no checkpoint at {path!r}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        step.load_state_dict(ckpt["optimizers"])
        for name, schedule in schedules.items():
            schedule.load_state_dict(ckpt["schedules"][name])
        start_epoch, global_step, best, history = ckpt["epoch"], ckpt["step"], ckpt["best"], ckpt["history"]
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if is_main:
            print(f"resumed from {path} at epoch {start_epoch}")
    elif is_main and os.path.exists(metrics_path):
        os.remove(metrics_path)

    if is_main and args.recipe == "imagenet-paper" and not args.pretrained:
        print("note: the paper's ImageNet experiment starts from pre-trained networks (--pretrained a.pt,b.pt)")
    writer = tensorboard_writer(args.output) if is_main else None
    if is_main:
        print(f"afd_fast: {args.method} on {', '.join(args.archs)} ({args.topology}), {world} process(es) on "
              f"{device}, {loaders.train_size} training images in {loaders.num_classes} classes "
              f"({loaders.backend} loader), recipe {args.recipe}, amp {args.amp}, "
              f"channels-last {'on' if args.channels_last else 'off'}, CUDA graph {'on' if args.cuda_graph else 'off'}")
    steps_per_epoch = loaders.steps_per_epoch
    total_steps = steps_per_epoch * args.epochs if args.max_steps is None else min(args.max_steps,
                                                                                   steps_per_epoch * args.epochs)
    run_start, images_seen = time.perf_counter(), 0
    for epoch in range(start_epoch, args.epochs):
        if global_step >= total_steps:
            break
        model.train()
        sums, batches, epoch_start = {}, 0, time.perf_counter()
        for images, target in loaders.train_epoch(epoch):
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            losses = train_step(images, target.to(device, non_blocking=True))
            for key in ("ce", "kl", "g_loss", "d_loss"):
                if key in losses:
                    sums[key] = sums.get(key, 0) + losses[key].detach().double()
            batches += 1
            global_step += 1
            images_seen += images.shape[0] * world
            report = global_step % args.print_every == 0 or global_step == total_steps
            # The running sums carry any NaN/inf; checking them only here avoids a host sync per step.
            if report:
                check_finite(sums, global_step, args.archs)
            if is_main and report:
                elapsed = time.perf_counter() - run_start
                rate = images_seen / max(elapsed, 1e-9)
                eta = (total_steps - global_step) * images.shape[0] * world / max(rate, 1e-9)
                print(f"epoch {epoch + 1}/{args.epochs} step {global_step}/{total_steps} "
                      f"loss {float(losses['logit'].detach()):.4f} {rate:.1f} img/s ETA {eta:.0f}s", flush=True)
            if global_step >= total_steps or batches == steps_per_epoch:
                break
        train_seconds = time.perf_counter() - epoch_start
        check_finite(sums, global_step, args.archs)
        if dist.is_initialized():  # training-loss means over all processes
            for value in sums.values():
                dist.all_reduce(value)
                value /= world
        for s in schedules.values():
            s.step()
        val = evaluate(model, loaders.val, device, step.amp_dtype)
        record = {"epoch": epoch + 1, "step": global_step,
                  "img_per_s": batches * args.batch_size * world / train_seconds,
                  **{f"train_{k}": (v / max(batches, 1)).tolist() for k, v in sums.items()}, **val}
        history.append(record)
        score = max(val[f"net{i}_top1"] for i in range(len(args.archs)))
        improved = score > best
        best = max(best, score)
        all_rng = [rng_state()]
        if dist.is_initialized():
            gathered = [None] * world
            dist.all_gather_object(gathered, all_rng[0])
            all_rng = gathered
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                for key, value in record.items():
                    for i, v in enumerate(value if isinstance(value, list) else [value]):
                        writer.add_scalar(key if not isinstance(value, list) else f"{key}/net{i}", v, epoch + 1)
                writer.flush()
            print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in val.items() if k.endswith("top1")),
                  flush=True)
            ckpt = {"model": model.state_dict(), "optimizers": step.state_dict(),
                    "schedules": {n: s.state_dict() for n, s in schedules.items()}, "epoch": epoch + 1,
                    "step": global_step, "best": best, "history": history, "rng": all_rng, "args": vars(args)}
            save_atomic(ckpt, os.path.join(args.output, "last.pt"))
            if improved:
                save_atomic(ckpt, os.path.join(args.output, "best.pt"))

    summary = {}
    if is_main:
        summary = write_outputs(args, model, history)
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


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
                                "last.pt holds the last good epoch: lower --lr or --adv-lr and --resume")


def write_outputs(args, model: afd.AFDModel, history: list[dict]) -> dict:
    last = history[-1] if history else {}
    k = len(args.archs)
    summary = {"method": args.method, "archs": args.archs, "topology": args.topology,
               "epochs": last.get("epoch", 0), "steps": last.get("step", 0),
               "img_per_s": sum(h["img_per_s"] for h in history) / max(len(history), 1),
               **{key: value for key, value in last.items() if "_top" in key}, "val_images": last.get("val_images"),
               "best_top1": max((max(h[f"net{i}_top1"] for i in range(k)) for h in history), default=None)}
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for i, (arch, net) in enumerate(zip(args.archs, model.networks)):
        save_atomic({n: t.cpu() for n, t in net.plain_state_dict().items()},
                    os.path.join(args.output, f"network{i}_{arch}.pt"))
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
