"""Fused ops vs the eager plain-PyTorch reference vs torch.compile(reference).

    python benchmarks/ops.py                 # CUDA when present, else CPU
    python benchmarks/ops.py --device cpu --quick

Forward (no grad) and forward+backward of the mutual-distillation loss for the shapes of the
issue, with hard targets and with mixup/CutMix soft targets (target_b, lam: the reference mixes
one-hot targets as torchvision's reference does); medians over repeated calls, ratios against the
eager reference measured in the same run, and the fused op's soft/hard time ratio.
On CUDA it also measures the card's copy bandwidth and reports the fused op's effective bandwidth.
Writes benchmarks/results/ops-<cpu|cuda>.json naming the machine.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import afd_fast.ops as ops  # noqa: E402
from afd_fast import reference  # noqa: E402

# (K, B, C); the ensemble-free pair/cyclic topologies give M = K.
FULL_SHAPES = [(2, 256, 1000), (2, 128, 100), (3, 128, 100), (4, 128, 100), (2, 4096, 32000)]
QUICK_SHAPES = [(2, 64, 1000), (3, 32, 100)]
CPU_LARGE_BATCH = 256  # (2, 4096, 32000) in float32 is 1 GiB of logits: too slow for eager on a small CPU


def _topology(k: int) -> str:
    return "pair" if k == 2 else "cyclic"


def _variants(compile_reference: bool):
    variants = {"fused": ops.mutual_distillation_loss, "eager": reference.mutual_distillation_loss}
    if compile_reference:
        variants["compiled"] = torch.compile(reference.mutual_distillation_loss, dynamic=False)
    return variants


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of a large buffer."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = common.median_ms(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32|bfloat16|float16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few iterations (a smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--targets", choices=("hard", "soft", "both"), default="both",
                        help="class indices, mixup/CutMix soft targets, or both (default)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/ops-<device>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    iters = args.iters or (5 if args.quick else 30)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    info = common.machine(device)
    print(f"afd_fast ops benchmark on {common.machine_name(info)}, {dtype}, torch {torch.__version__}")
    bandwidth = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    if bandwidth:
        print(f"measured copy bandwidth: {bandwidth:.0f} GB/s")

    variants = _variants(compile_reference=not args.no_compile)
    rows, results = [], []
    kinds = ("hard", "soft") if args.targets == "both" else (args.targets,)
    for (k, b, c), targets in ((shape, t) for shape in shapes for t in kinds):
        if device.type == "cpu" and c >= 32000:
            b = min(b, CPU_LARGE_BATCH)
        gen = torch.Generator(device=device).manual_seed(0)  # the same logits for hard and soft
        logits = torch.randn(k, b, c, device=device, generator=gen).to(dtype).requires_grad_()
        target = torch.randint(0, c, (b,), device=device, generator=gen)
        weights = ops.peer_weights(_topology(k), k, device=device)
        grad_out = torch.ones(k, device=device)
        # mixup/CutMix: the batch paired with its flip, one λ per sample
        soft = dict(target_b=target.flip(0), lam=torch.rand(b, device=device, generator=gen)) if targets == "soft" else {}
        timings = {}
        for name, fn in variants.items():
            def forward(fn=fn):
                with torch.no_grad():
                    return fn(logits, target, weights, **soft)

            def forward_backward(fn=fn):
                loss, _, _ = fn(logits, target, weights, **soft)
                return torch.autograd.grad(loss, logits, grad_out)

            warmup = 3 if name != "compiled" else 5
            timings[name] = {"fwd_ms": common.median_ms(forward, device, warmup, iters),
                             "fwd_bwd_ms": common.median_ms(forward_backward, device, warmup, iters)}
        entry = {"K": k, "B": b, "C": c, "targets": targets, "dtype": str(dtype).replace("torch.", ""),
                 "timings": timings}
        hard = [r for r in results if (r["K"], r["B"], r["C"], r["targets"]) == (k, b, c, "hard")]
        if targets == "soft" and hard:
            for phase in ("fwd_ms", "fwd_bwd_ms"):
                entry[f"fused_soft_over_hard_{phase[:-3]}"] = timings["fused"][phase] / hard[0]["timings"]["fused"][phase]
        for phase in ("fwd_ms", "fwd_bwd_ms"):
            entry[f"speedup_vs_eager_{phase[:-3]}"] = timings["eager"][phase] / timings["fused"][phase]
            if "compiled" in timings:
                entry[f"speedup_vs_compiled_{phase[:-3]}"] = timings["compiled"][phase] / timings["fused"][phase]
        if bandwidth:
            elem = logits.element_size() * k * b * c
            # forward with grad reads the logits and writes the gradient; backward reads it and writes d logits
            fwd_grad_ms = common.median_ms(
                lambda: torch.ops.afd_fast.mutual_distillation_forward(logits, target, weights, 3.0, 1.0, 1.0, 0.0, True,
                                                                       soft.get("target_b"), soft.get("lam")),
                device, 3, iters)
            entry["fwd_with_grad_ms"] = fwd_grad_ms
            entry["fwd_with_grad_bandwidth_fraction"] = 2 * elem / (fwd_grad_ms * 1e-3) / 1e9 / bandwidth
            entry["fwd_bwd_bandwidth_fraction"] = 4 * elem / (timings["fused"]["fwd_bwd_ms"] * 1e-3) / 1e9 / bandwidth
        results.append(entry)
        for phase, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
            row = [f"({k}, {b}, {c})", targets, label] + [f"{timings[n][phase]:.3f}" for n in variants]
            row.append(f"{timings['eager'][phase] / timings['fused'][phase]:.2f}x")
            if "compiled" in timings:
                row.append(f"{timings['compiled'][phase] / timings['fused'][phase]:.2f}x")
            if bandwidth:
                key = "fwd_with_grad_bandwidth_fraction" if label == "fwd" else "fwd_bwd_bandwidth_fraction"
                row.append(f"{100 * entry[key]:.0f}%")
            rows.append(row)
    headers = ["(K, B, C)", "targets", "pass"] + [f"{n} ms" for n in variants] + ["fused vs eager"]
    if "compiled" in variants:
        headers.append("fused vs compiled")
    if bandwidth:
        headers.append("of copy BW")
    common.print_table(headers, rows)
    for r in results:
        if "fused_soft_over_hard_fwd_bwd" in r:
            print(f"fused op, soft / hard targets, ({r['K']}, {r['B']}, {r['C']}): fwd {r['fused_soft_over_hard_fwd']:.2f}x, "
                  f"fwd+bwd {r['fused_soft_over_hard_fwd_bwd']:.2f}x")

    payload = {"benchmark": "ops", "device": device.type, "machine": info, "dtype": str(dtype),
               "iters": iters, "copy_bandwidth_gbs": bandwidth, "results": results}
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"ops-{device.type}.json")
    common.write_json(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
