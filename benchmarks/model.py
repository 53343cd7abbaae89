"""A performance model of the training step from exact counts: a prediction until a GPU measures it.

Counted on the CPU over the real training step (afd_fast.step.DualStep, built as the trainer builds
it for a CUDA graph: fused ops, fused optimizers, bf16 autocast, channels-last) for every method of
`METHODS` and K = 2, 3 networks, for the CIFAR ResNet-32 networks (batch 128, 32 px, 100 classes)
and the ImageNet ResNet-18/34 pair (batch 256, 224 px, 1000 classes; K = 3 adds a second ResNet-18):

* FLOPs per training step (torch.utils.flop_counter.FlopCounterMode), and AFD/vanilla against its
  floor: the vanilla step, plus one backward of each extractor G_k (L_G's gradient), plus the
  transfer layers and discriminators;
* operators dispatched per step, eager (reference losses, for-each optimizers) vs fused; the fused
  step is what the trainer captures in a CUDA graph, so its device operators (aten ops that are not
  views or allocations) are the kernels one replay launches, at one kernel per operator (cuDNN
  convolutions and multi-tensor optimizer ops can launch more): on the CPU, this count is what we
  have;
* bytes the fused loss ops read and write per call, against the minimum (logits read once, the
  gradient written once) and the eager composition (afd_fast.reference, every op reading its inputs
  and writing its outputs);
* a predicted step time and images/s on H100 and H200: every device operator of the step costs
  max(FLOPs / (peak bf16 x COMPUTE_EFFICIENCY), bytes / (HBM bandwidth x MEMORY_EFFICIENCY))
  + KERNEL_OVERHEAD_S, from the published peaks of `GPUS`.

Counts are taken at two small batches and must be exactly affine in the batch (checked), then
extrapolated to the full batch: the CPU never runs a 224 px batch of 256.

  python benchmarks/model.py                    # the full model -> benchmarks/results/model.json
  python benchmarks/model.py --quick            # small networks (what CI runs)
  python benchmarks/model.py --measure          # on a GPU: times each modelled step (captured in a CUDA
                                                # graph) and prints measured against predicted
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from markdown_table import markdown_table  # noqa: E402

from afd_fast import ops, reference  # noqa: E402
from afd_fast.graph import GraphedStep  # noqa: E402
from afd_fast.model import AFDModel  # noqa: E402
from afd_fast.models import build_network  # noqa: E402
from afd_fast.step import DualStep  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("vanilla", "dml", "kd", "afd")
# Published dense bf16 tensor-core peaks and HBM bandwidths of the SXM parts (NVIDIA datasheets).
GPUS = {"H100": {"bf16_flops": 989e12, "hbm_bytes_per_s": 3.35e12},
        "H200": {"bf16_flops": 989e12, "hbm_bytes_per_s": 4.8e12}}
COMPUTE_EFFICIENCY = 0.5  # of the bf16 peak, for convolutions and matrix products
MEMORY_EFFICIENCY = 0.7  # of the HBM bandwidth, for everything else
KERNEL_OVERHEAD_S = 2e-6  # per kernel of a graph replay: launch gap, ramp-up and tail
# Operators that launch no kernel: allocations and aliases (views are found by their schema).
NO_KERNEL = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty", "aten.new_empty_strided",
             "aten.detach", "aten.alias", "aten.lift_fresh", "aten._local_scalar_dense"}


@dataclass(frozen=True)
class Config:
    name: str
    archs: dict  # K -> network names
    image_size: int
    batch_size: int
    num_classes: int
    count_batches: tuple = (2, 4)  # the small batches the counts are taken at


CONFIGS = {
    "full": [Config("cifar", {2: ("resnet32",) * 2, 3: ("resnet32",) * 3}, 32, 128, 100),
             Config("imagenet", {2: ("resnet18", "resnet34"), 3: ("resnet18", "resnet34", "resnet18")}, 224, 256, 1000)],
    # small enough that --measure runs on a CPU (gpu_check.sh --dry-run)
    "quick": [Config("cifar", {2: ("resnet20",) * 2, 3: ("resnet20",) * 3}, 32, 4, 10),
              Config("imagenet", {2: ("resnet18", "resnet18")}, 32, 4, 10)],
}


class OpRecorder(TorchDispatchMode):
    """Every aten op dispatched: name, FLOPs (torch's flop formulas), bytes read and written
    (tensor arguments read once each, outputs written), and whether it launches a kernel."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        view = func.is_view or name in NO_KERNEL
        formula = flop_registry.get(func.overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
        read = _tensor_bytes([args, kwargs])
        written = _tensor_bytes([out])
        self.ops.append({"op": name, "flops": int(flops), "bytes": 0 if view else read + written, "kernel": not view})
        return out


def _tensor_bytes(tree) -> int:
    seen, total = set(), 0
    for t in torch.utils._pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def build(archs, method: str, image_size: int, num_classes: int, device, fused: bool = True, graph: bool = False):
    """The step as the trainer builds it: pair topology for 2 networks, cyclic for more; bf16
    autocast, channels-last; ``fused``: afd_fast.ops and fused optimizers (the captured step),
    else the reference losses and for-each optimizers (eager)."""
    torch.manual_seed(0)
    networks = [build_network(a, num_classes) for a in archs]
    model = AFDModel(networks, method, "pair" if len(archs) == 2 else "cyclic", image_size, fused_losses=fused)
    model = model.to(device).to(memory_format=torch.channels_last)
    step = DualStep(model, lr=0.01, adv_lr=2e-5, amp="bf16", fused=fused, capturable=fused and device.type == "cuda")
    if not fused:  # torch's default on a GPU (on the CPU it would loop over the parameters)
        for optimizer in step.optimizers.values():
            for group in optimizer.param_groups:
                group["foreach"] = True
    return GraphedStep(step) if graph else step


def _batch(batch: int, image_size: int, num_classes: int, device):
    return next(iter(common.RandomBatches(batch, image_size, num_classes, 1, device, distinct=1)))


def count_step(step: DualStep, batch: int, image_size: int, num_classes: int) -> dict:
    """FLOPs and operators of one step, after a step that creates the optimizers' state."""
    device = next(step.model.parameters()).device
    images, target = _batch(batch, image_size, num_classes, device)
    step(images, target)
    with FlopCounterMode(display=False) as counter, OpRecorder() as recorder:
        step(images, target)
    return {"flops": counter.get_total_flops(), "ops": recorder.ops}


def extractor_backward_flops(archs, batch: int, image_size: int, num_classes: int) -> float:
    """FLOPs of one backward of every extractor G_k from its feature map to its parameters (L_G's
    gradient through G): what AFD must add to the vanilla step."""
    total = 0
    for arch in archs:
        torch.manual_seed(0)
        net = build_network(arch, num_classes).to(memory_format=torch.channels_last)
        images, _ = _batch(batch, image_size, num_classes, torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = net.features(images)
        params = [p for p in net.extractor_parameters() if p.requires_grad]
        with FlopCounterMode(display=False) as counter:
            torch.autograd.grad(features, params, torch.ones_like(features))
        total += counter.get_total_flops()
    return total


def adversarial_flops(model: AFDModel, batch: int, image_size: int, num_classes: int) -> float:
    """FLOPs of the transfer layers and discriminators alone, on the networks' feature maps: T_k and
    D_k forward (D_k on its own and on its peer's map), L_G's gradient through D_k and T_k down to
    the map, L_D's gradient to the discriminators."""
    images, _ = _batch(batch, image_size, num_classes, torch.device("cpu"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        maps = [n.features(images) for n in model.networks]
    leaves = [m.detach().requires_grad_() for m in maps]
    generator = list(model.transfers.parameters()) + leaves
    maps = [m * 1 for m in leaves]  # modules get non-leaf inputs (FlopCounterMode's module hooks need it)
    with FlopCounterMode(display=False) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        t = [tr(m) for tr, m in zip(model.transfers, maps)]
        own = [d(t[i]) for i, d in enumerate(model.discriminators)]
        peer = [d(t[model.teachers[i]].detach()) for i, d in enumerate(model.discriminators)]
        g_loss = sum((1 - o.float().sigmoid()).square().mean() for o in own)
        d_loss = sum((1 - p.float().sigmoid()).square().mean() + o.float().sigmoid().square().mean()
                     for o, p in zip(own, peer))
        torch.autograd.grad(g_loss, [p for p in generator if p.requires_grad], retain_graph=True, allow_unused=True)
        torch.autograd.grad(d_loss, list(model.discriminators.parameters()))
    return counter.get_total_flops()


def _affine(a: float, b: float, n1: int, n2: int, n: int) -> float:
    return a + (b - a) / (n2 - n1) * (n - n1)


def extrapolate(small: dict, large: dict, n1: int, n2: int, n: int) -> dict:
    """Counts at batch n from those at n1 and n2: FLOPs must be proportional to the batch, and both
    runs must dispatch the same operators; bytes are affine (activations scale, weights do not)."""
    if small["flops"] * n2 != large["flops"] * n1:
        raise RuntimeError(f"FLOPs not proportional to the batch: {small['flops']} at {n1}, {large['flops']} at {n2}")
    if [o["op"] for o in small["ops"]] != [o["op"] for o in large["ops"]]:
        raise RuntimeError("the step dispatched different operators at two batch sizes: the counts cannot be scaled")
    ops = [{"op": a["op"], "kernel": a["kernel"], "flops": a["flops"] * n / n1,
            "bytes": max(0.0, _affine(a["bytes"], b["bytes"], n1, n2, n))} for a, b in zip(small["ops"], large["ops"])]
    return {"flops": small["flops"] * n / n1, "ops": ops}


def predict(ops: list[dict]) -> dict:
    """Predicted seconds per step on each GPU of GPUS (ops: those of one step)."""
    out = {}
    for gpu, peak in GPUS.items():
        t = sum(max(o["flops"] / (peak["bf16_flops"] * COMPUTE_EFFICIENCY),
                    o["bytes"] / (peak["hbm_bytes_per_s"] * MEMORY_EFFICIENCY)) + KERNEL_OVERHEAD_S
                for o in ops if o["kernel"])
        out[gpu] = t
    return out


def model_row(config: Config, k: int, method: str, vanilla_gflops: float | None = None) -> dict:
    """The counts and predictions of one (config, K, method); ``vanilla_gflops``: the vanilla step
    of the same networks (from its own row), for the ratios and AFD's floor."""
    archs = config.archs[k]
    cpu = torch.device("cpu")
    n1, n2 = config.count_batches
    fused = build(archs, method, config.image_size, config.num_classes, cpu)
    small = count_step(fused, n1, config.image_size, config.num_classes)
    large = count_step(fused, n2, config.image_size, config.num_classes)
    full = extrapolate(small, large, n1, n2, config.batch_size)
    eager = build(archs, method, config.image_size, config.num_classes, cpu, fused=False)
    eager_ops = count_step(eager, n1, config.image_size, config.num_classes)["ops"]
    kernels = sum(o["kernel"] for o in full["ops"])
    seconds = predict(full["ops"])
    row = {"config": config.name, "archs": list(archs), "K": k, "method": method, "batch": config.batch_size,
           "image_size": config.image_size, "gflops_per_step": full["flops"] / 1e9,
           "gbytes_per_step": sum(o["bytes"] for o in full["ops"]) / 1e9,
           "ops_per_step_eager": len(eager_ops), "ops_per_step_fused": len(full["ops"]),
           "kernels_per_replay": kernels,
           "predicted": {gpu: {"ms": s * 1e3, "img_per_s": config.batch_size / s} for gpu, s in seconds.items()}}
    vanilla_gflops = row["gflops_per_step"] if method == "vanilla" else vanilla_gflops
    if vanilla_gflops is not None:
        row["flops_vs_vanilla"] = row["gflops_per_step"] / vanilla_gflops
    if method == "afd":  # the floor: the vanilla step, L_G's backward through every G_k, T_k and D_k
        n = config.batch_size / n1
        row["floor_gflops"] = vanilla_gflops + (
            extractor_backward_flops(archs, n1, config.image_size, config.num_classes)
            + adversarial_flops(fused.model, n1, config.image_size, config.num_classes)) * n / 1e9
        row["floor_vs_vanilla"] = row["floor_gflops"] / vanilla_gflops
    return row


def run_model(configs: list[Config]) -> list[dict]:
    rows = []
    for config in configs:
        for k in sorted(config.archs):
            vanilla = None
            for method in ("vanilla",) + tuple(m for m in METHODS if m != "vanilla"):
                row = model_row(config, k, method, vanilla)
                vanilla = row["gflops_per_step"] if method == "vanilla" else vanilla
                rows.append(row)
                print(f"{config.name} K={k} {method}: {row['gflops_per_step']:.1f} GFLOP/step "
                      f"({row['flops_vs_vanilla']:.3f}x vanilla), {row['kernels_per_replay']:.0f} kernels/replay, "
                      f"predicted H100 {row['predicted']['H100']['img_per_s']:.0f} img/s, "
                      f"H200 {row['predicted']['H200']['img_per_s']:.0f} img/s", flush=True)
    return rows


def loss_bytes(cases=((2, 128, 100), (3, 128, 100), (2, 256, 1000), (2, 4096, 32000)), dtype=torch.bfloat16) -> list[dict]:
    """Bytes per call of the fused logit loss (forward with its gradient, then the backward that
    scales it), against the minimum and the eager composition (afd_fast.reference, counted)."""
    size = torch.finfo(dtype).bits // 8
    rows = []
    for k, b, c in cases:
        m = s = k  # pair / cyclic: every row is a student
        logits = m * b * c * size
        # ops_cuda.cu: pass 1 reads the rows, pass 2 reads them again (from L2 when they fit) and
        # writes the students' gradients; the backward reads them and writes the rows' gradients.
        fused_l2 = logits + s * b * c * size + (s * b * c * size + logits)
        fused_dram = fused_l2 + logits
        minimum = 2 * logits  # logits read once, their gradient written once
        eager = _affine(*(_eager_loss_bytes(k, n, c, dtype) for n in (8, 16)), 8, 16, b)
        eager_ops = len(_eager_loss_ops(k, 8, c, dtype))
        rows.append({"K": k, "B": b, "C": c, "dtype": str(dtype).replace("torch.", ""), "minimum_bytes": minimum,
                     "fused_bytes_l2": fused_l2, "fused_bytes_no_l2": fused_dram, "eager_bytes": int(eager),
                     "eager_ops": eager_ops, "fused_vs_minimum": fused_l2 / minimum,
                     "eager_vs_fused": eager / fused_l2})
    return rows


def _eager_loss_ops(k: int, b: int, c: int, dtype) -> list[dict]:
    """The operators of the reference logit loss's forward and backward (pair / cyclic weights)."""
    z = torch.randn(k, b, c, dtype=dtype, requires_grad=True)
    target = torch.randint(0, c, (b,))
    weights = ops.peer_weights("pair" if k == 2 else "cyclic", k)
    with OpRecorder() as rec:
        loss, _, _ = reference.mutual_distillation_loss(z, target, weights, 3.0)
        loss.sum().backward()
    return rec.ops


def _eager_loss_bytes(k: int, b: int, c: int, dtype) -> int:
    return sum(o["bytes"] for o in _eager_loss_ops(k, b, c, dtype))


def measure(configs: list[Config], device, iters: int, methods=METHODS, ks=None) -> list[dict]:
    """Times the modelled steps on a GPU (captured in a CUDA graph, as the trainer runs them)."""
    rows = []
    for config in configs:
        for k in ks or sorted(config.archs):
            for method in methods:
                step = build(config.archs[k], method, config.image_size, config.num_classes, device,
                             graph=device.type == "cuda")
                warmup = 4 if device.type == "cuda" else 1  # GraphedStep: 3 eager steps and the capture
                source = iter(common.RandomBatches(config.batch_size, config.image_size, config.num_classes,
                                                   warmup + iters, device))
                ms = common.median_ms(lambda: step(*next(source)), device, warmup, iters)
                rows.append({"config": config.name, "archs": list(config.archs[k]), "K": k, "method": method,
                             "batch": config.batch_size, "image_size": config.image_size, "ms": ms,
                             "img_per_s": config.batch_size / (ms * 1e-3),
                             "captured": isinstance(step, GraphedStep) and not step.disabled})
                print(f"measured {config.name} K={k} {method}: {ms:.2f} ms, {rows[-1]['img_per_s']:.0f} img/s", flush=True)
    return rows


def compare(predicted: list[dict], measured: list[dict], gpu: str) -> str:
    key = ("config", "archs", "K", "method", "batch", "image_size")
    rows = []
    for m in measured:
        p = next((r for r in predicted if all(r[x] == m[x] for x in key)), None)
        if p is None:
            continue
        pr = p["predicted"][gpu]
        rows.append([m["config"], m["K"], f"{m['method']}{'' if m['captured'] else ' (not captured)'}", f"{m['ms']:.2f}",
                     f"{pr['ms']:.2f}", f"{m['img_per_s']:.0f}", f"{pr['img_per_s']:.0f}",
                     f"{m['img_per_s'] / pr['img_per_s']:.2f}"])
    return markdown_table(["config", "K", "method", "measured ms", f"predicted ms ({gpu})", "measured img/s",
                           "predicted img/s", "measured / predicted"], rows, "lrlrrrrr")


def tables(payload: dict) -> str:
    """The README tables of a model.json."""
    steps = []
    for r in payload["steps"]:
        h100, h200 = r["predicted"]["H100"], r["predicted"]["H200"]
        steps.append([f"{r['config']} ({', '.join(r['archs'])}), {r['image_size']} px, batch {r['batch']}", r["K"],
                      r["method"], f"{r['gflops_per_step']:.1f}", f"{r['flops_vs_vanilla']:.3f}x",
                      f"{r['floor_vs_vanilla']:.3f}x" if "floor_vs_vanilla" in r else "",
                      f"{r['ops_per_step_eager']:.0f}", f"{r['ops_per_step_fused']:.0f}", f"{r['kernels_per_replay']:.0f}",
                      f"{h100['ms']:.2f}", f"{h100['img_per_s']:,.0f}", f"{h200['ms']:.2f}", f"{h200['img_per_s']:,.0f}"])
    loss_bytes = [[f"({r['K']}, {r['B']}, {r['C']})", f"{r['minimum_bytes']:,}",
                   f"{r['fused_bytes_l2']:,} / {r['fused_bytes_no_l2']:,}", f"{r['fused_vs_minimum']:.2f}x",
                   f"{r['eager_bytes']:,}", r["eager_ops"], f"{r['eager_vs_fused']:.1f}x"] for r in payload["loss_bytes"]]
    return "\n".join([
        markdown_table(["config", "K", "method", "GFLOP/step", "vs vanilla", "floor", "ops/step eager", "ops/step fused",
                        "kernels/replay", "H100 ms", "H100 img/s", "H200 ms", "H200 img/s"], steps, "lrlrrrrrrrrrr"),
        "",
        markdown_table(["(K, B, C) bf16", "minimum bytes", "fused bytes (L2 / no L2 reuse)", "fused vs minimum",
                        "eager bytes", "eager ops", "eager vs fused"], loss_bytes, "lrrrrrr")])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small networks and images (a smoke run, what CI runs)")
    ap.add_argument("--output", default=None, help="model JSON (default benchmarks/results/model.json; "
                    "model-quick.json with --quick)")
    ap.add_argument("--measure", action="store_true", help="time the modelled steps on --device and compare "
                    "with the predictions of --predicted")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--predicted", default=None, help="with --measure: the model's JSON (default "
                    "benchmarks/results/model.json; model-quick.json with --quick)")
    ap.add_argument("--iters", type=int, default=10, help="with --measure: timed steps per row (median)")
    ap.add_argument("--ks", default=None, help="with --measure: comma-separated K values (default all)")
    args = ap.parse_args(argv)
    configs = CONFIGS["quick" if args.quick else "full"]
    if not args.measure:  # counts need no speed; one thread never spin-waits on a busy machine
        torch.set_num_threads(1)

    if args.measure:
        device = torch.device(args.device)
        torch.backends.cudnn.benchmark = True
        predicted_path = args.predicted or os.path.join(HERE, "results", "model-quick.json" if args.quick
                                                        else "model.json")
        with open(predicted_path) as f:
            predicted = json.load(f)
        ks = [int(k) for k in args.ks.split(",")] if args.ks else None
        measured = measure(configs, device, args.iters, ks=ks)
        name = common.machine_name(common.machine(device))
        gpu = "H200" if "H200" in name else "H100"
        table = compare(predicted["steps"], measured, gpu)
        print(f"\nMeasured on {name} against the prediction for {gpu} ({os.path.relpath(predicted_path)}):\n\n{table}")
        out = args.output or os.path.join(HERE, "results", f"model-measured-{device.type}.json")
        common.write_json(out, {"benchmark": "model-measured", "device": device.type,
                                "machine": common.machine(device), "compared_with": gpu, "results": measured})
        return 0

    payload = {"benchmark": "model", "torch": torch.__version__,
               "assumptions": {"gpus": GPUS, "compute_efficiency": COMPUTE_EFFICIENCY,
                               "memory_efficiency": MEMORY_EFFICIENCY, "kernel_overhead_s": KERNEL_OVERHEAD_S,
                               "amp": "bf16", "channels_last": True},
               "steps": run_model(configs), "loss_bytes": loss_bytes(((2, 8, 10),) if args.quick else
                                                                    ((2, 128, 100), (3, 128, 100), (2, 256, 1000),
                                                                     (2, 4096, 32000)))}
    out = args.output or os.path.join(HERE, "results", "model-quick.json" if args.quick else "model.json")
    common.write_json(out, payload)
    print(f"\n{tables(payload)}\n\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
