"""Images/s of the AFD training update, a ladder of variants measured in one run.

    python benchmarks/step.py                  # CUDA when present: (resnet18, resnet34) 224 px batch 256,
                                               # (resnet32, resnet32) 32 px batch 128
    python benchmarks/step.py --device cpu     # the same ladder at small sizes
    python benchmarks/step.py --quick          # a smoke run (what CI runs)

On in-memory synthetic input (random tensors already on the device, common.RandomBatches):
  1. eager float32 with the plain-PyTorch reference losses (what public code does)
  2. + AMP (bf16 autocast)
  3. + channels-last
  4. + fused ops (afd_fast.ops losses, fused SGD/Adam with device learning rates)
  5. + CUDA graph of the whole dual step (CUDA only; on the CPU: float32 + fused ops instead)
  6. + the batched dual backward (the logit and adversarial gradient sets through the shared
     extractors in one backward with two stacked gradient outputs; an experiment, off in the trainer)
then the vanilla pair (two networks trained independently) with the settings of the fastest AFD
variant, for AFD's overhead ratio, and end to end from JPEG through the trainer's data path (DALI when installed) on
../shared/data/imagenette-mini. Prints a table with ratios to the first row, writes
benchmarks/results/step-<device>.json naming the machine and a bar chart next to it.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from afd_fast import ops  # noqa: E402
from afd_fast.model import AFDModel  # noqa: E402
from afd_fast.step import DualStep  # noqa: E402
from afd_fast.data import build_loaders  # noqa: E402
from afd_fast.graph import GraphedStep  # noqa: E402
from afd_fast.models import build_network  # noqa: E402
from afd_fast.plotting import pyplot  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GRAPH_WARMUP = 4  # GraphedStep: 3 eager steps, then the capture (replayed from the 4th call)
IMAGENETTE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "imagenette-mini")


@dataclass(frozen=True)
class Config:
    name: str
    archs: tuple[str, ...]
    image_size: int
    batch_size: int
    num_classes: int


CONFIGS = {  # (full GPU sizes, small CPU sizes, smoke sizes)
    "cuda": [Config("imagenet", ("resnet18", "resnet34"), 224, 256, 1000),
             Config("cifar", ("resnet32", "resnet32"), 32, 128, 100)],
    "cpu": [Config("imagenet", ("resnet18", "resnet34"), 64, 16, 1000),
            Config("cifar", ("resnet32", "resnet32"), 32, 32, 100)],
    "quick": [Config("imagenet", ("resnet18", "resnet18"), 32, 4, 10),
              Config("cifar", ("resnet20", "resnet20"), 32, 4, 10)],
}


@dataclass(frozen=True)
class Variant:
    label: str
    amp: str = "off"
    channels_last: bool = False
    fused: bool = False
    graph: bool = False
    method: str = "afd"
    batched_backward: bool = False


def ladder(cuda: bool) -> list[Variant]:
    """The AFD variants, each adding one thing to the one before."""
    steps = [Variant("eager fp32, reference losses"),
             Variant("+ AMP bf16", amp="bf16"),
             Variant("+ channels-last", amp="bf16", channels_last=True),
             Variant("+ fused ops", amp="bf16", channels_last=True, fused=True)]
    if cuda and ops.HAS_EXTENSION:  # without _C the losses read weights on the host: no capture
        steps.append(Variant("+ CUDA graph", amp="bf16", channels_last=True, fused=True, graph=True))
    else:  # CPUs without fast bf16 lose with autocast: show the fused ops on float32 too
        steps.append(Variant("fp32 + fused ops (no AMP)", fused=True))
    # the experiment: logit and generator sets through the extractors in one batched backward
    steps.append(replace(steps[-1], label="+ batched dual backward", batched_backward=True))
    return steps


def build_step(config: Config, variant: Variant, device: torch.device):
    torch.manual_seed(0)
    networks = [build_network(a, config.num_classes) for a in config.archs]
    model = AFDModel(networks, variant.method, "pair", config.image_size, fused_losses=variant.fused).to(device)
    model = model.to(memory_format=torch.channels_last if variant.channels_last else torch.contiguous_format)
    step = DualStep(model, lr=0.01, adv_lr=2e-5, amp=variant.amp, fused=variant.fused, capturable=variant.graph,
                        batched_backward=variant.batched_backward)
    return GraphedStep(step) if variant.graph else step


def time_step(config: Config, variant: Variant, device: torch.device, warmup: int, iters: int) -> dict:
    step = build_step(config, variant, device)
    source = iter(common.RandomBatches(config.batch_size, config.image_size, config.num_classes, warmup + iters, device,
                                       channels_last=variant.channels_last))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = common.median_ms(lambda: step(*next(source)), device, warmup, iters)
    result = {"ms": ms, "img_per_s": config.batch_size / (ms * 1e-3)}
    if isinstance(step, GraphedStep):
        result.update(cuda_graph_captures=step.captures, cuda_graph_failed=step.disabled)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def time_end_to_end(config: Config, variant: Variant, device: torch.device, data: str, steps: int) -> dict:
    """The trainer's data path (DALI when installed) feeding the step of ``variant``, from JPEG files."""
    loaders = build_loaders(data, config.image_size, config.batch_size, workers=min(os.cpu_count() or 1, 8), seed=0,
                            device=device)
    config = Config(config.name, config.archs, config.image_size, config.batch_size, loaders.num_classes)
    step = build_step(config, variant, device)
    layout = torch.channels_last if variant.channels_last else torch.contiguous_format

    def train(batch) -> int:
        images, target = batch
        step(images.to(device, non_blocking=True).contiguous(memory_format=layout), target.to(device, non_blocking=True))
        return images.shape[0]

    rate = common.epoch_throughput(loaders.train_epoch, train, device, steps, warmup=GRAPH_WARMUP if variant.graph else 1)
    return {"img_per_s": rate, "ms": 1e3 * config.batch_size / rate, "loader": loaders.backend}


def draw(results: list[dict], title: str, path: str) -> None:
    plt = pyplot("bar chart")
    if plt is None:
        return
    configs = sorted({r["config"] for r in results}, key=[r["config"] for r in results].index)
    fig, axes = plt.subplots(1, len(configs), figsize=(7 * len(configs), 4.5), squeeze=False)
    for ax, name in zip(axes[0], configs):
        rows = [r for r in results if r["config"] == name]
        bars = ax.barh([r["variant"] for r in rows][::-1], [r["img_per_s"] for r in rows][::-1], color="tab:blue")
        for bar, r in zip(bars, rows[::-1]):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['vs_first']:.2f}x", va="center")
        ax.set_xlabel("images/s")
        ax.set_title(f"{name}: {rows[0]['setting']}", fontsize=10)
        ax.margins(x=0.2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny networks and sizes, 2 timed steps (a smoke run)")
    parser.add_argument("--configs", default="imagenet,cifar", help="comma-separated: imagenet, cifar")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per variant (median)")
    parser.add_argument("--data", default=IMAGENETTE, help="JPEG folder for the end-to-end row ('' to skip)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/step-<device>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    iters = args.iters or (2 if args.quick else 20 if cuda else 5)
    warmup = 1 if args.quick else 5 if cuda else 2
    wanted = args.configs.split(",")
    configs = [c for c in CONFIGS["quick" if args.quick else device.type] if c.name in wanted]
    info = common.machine(device)
    print(f"afd_fast step benchmark on {common.machine_name(info)}, torch {torch.__version__}")

    results, rows = [], []
    for config in configs:
        setting = f"({', '.join(config.archs)}) {config.image_size} px, batch {config.batch_size}"
        measured = []
        for variant in ladder(cuda):
            warm = max(warmup, GRAPH_WARMUP) if variant.graph else warmup
            measured.append((variant, time_step(config, variant, device, warm, iters)))
        # the vanilla pair and the end-to-end run use the settings of the fastest AFD variant
        best = min(measured, key=lambda m: m[1]["ms"])
        vanilla = replace(best[0], method="vanilla", label=f"vanilla pair (as '{best[0].label}')")
        measured.append((vanilla, time_step(config, vanilla, device,
                                            max(warmup, GRAPH_WARMUP) if vanilla.graph else warmup, iters)))
        overhead = best[1]["ms"] / measured[-1][1]["ms"]
        if config.name == "imagenet" and args.data and os.path.isdir(args.data):
            e2e = time_end_to_end(config, best[0], device, args.data, steps=max(iters, 3))
            measured.append((replace(best[0], label=f"end to end from JPEG ({e2e['loader']})"), e2e))
        first = measured[0][1]["img_per_s"]
        for variant, m in measured:
            entry = {"config": config.name, "setting": setting, "variant": variant.label, **m,
                     "vs_first": m["img_per_s"] / first, "afd_over_vanilla": overhead,
                     "settings": {"amp": variant.amp, "channels_last": variant.channels_last, "fused": variant.fused,
                                  "cuda_graph": variant.graph, "method": variant.method,
                                  "batched_backward": variant.batched_backward}}
            results.append(entry)
            label = variant.label + (" (capture failed: eager)" if m.get("cuda_graph_failed") else "")
            rows.append([config.name, label, f"{m['ms']:.1f}", f"{m['img_per_s']:.0f}", f"{entry['vs_first']:.2f}x"]
                        + ([f"{m['peak_memory_gib']:.1f}" if "peak_memory_gib" in m else ""] if cuda else []))
        print(f"{setting}: fastest AFD step ({best[0].label}) / vanilla pair step = {overhead:.2f}x")
    headers = ["config", "variant", "ms/step", "img/s", "vs first"] + (["peak GiB"] if cuda else [])
    common.print_table(headers, rows)

    out = args.output or os.path.join(HERE, "results", f"step-{device.type}.json")
    payload = {"benchmark": "step", "device": device.type, "machine": info, "iters": iters, "results": results}
    common.write_json(out, payload)
    draw(results, f"AFD update on {common.machine_name(info)}", os.path.splitext(out)[0] + ".png")
    print(f"wrote {out} and {os.path.splitext(out)[0]}.png")
    return payload


if __name__ == "__main__":
    main()
