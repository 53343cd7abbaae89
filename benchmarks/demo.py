"""A short demo of afd_fast.ops: the fused losses next to the plain-PyTorch reference, and their speed.

    python benchmarks/demo.py [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import afd_fast.ops as ops
from afd_fast import reference


def _median_ms(fn, device, iters=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"afd_fast.ops on {device} (compiled kernels: {ops.HAS_EXTENSION})\n")

    k, b, c = 2, 256, 1000
    logits = torch.randn(k, b, c, device=device, requires_grad=True)
    target = torch.randint(0, c, (b,), device=device)
    w = ops.peer_weights("pair", k, device=device)
    print("mutual_distillation_loss, two networks (pair topology), T = 3, batch 256, 1000 classes")
    for name, fn in (("fused", ops.mutual_distillation_loss), ("reference", reference.mutual_distillation_loss)):
        loss, ce, kl = fn(logits, target, w)
        print(f"  {name:9s} loss {loss.tolist()}  ce {ce.tolist()}  kl {kl.tolist()}")

    own, peer = torch.randn(k, b, device=device), torch.randn(k, b, device=device)
    print("\nlsgan_loss on discriminator scores (own map = fake, peer's map = real)")
    for name, fn in (("fused", ops.lsgan_loss), ("reference", reference.lsgan_loss)):
        g_loss, d_loss = fn(own, peer)
        print(f"  {name:9s} g_loss {g_loss.tolist()}  d_loss {d_loss.tolist()}")

    def step(fn):
        def run():
            loss, _, _ = fn(logits, target, w)
            torch.autograd.grad(loss.sum(), logits)
        return run

    fused = _median_ms(step(ops.mutual_distillation_loss), device)
    eager = _median_ms(step(reference.mutual_distillation_loss), device)
    print(f"\nforward+backward, median of 20: fused {fused:.3f} ms, eager reference {eager:.3f} ms "
          f"-> {eager / fused:.1f}x faster on this machine")
    print("Full comparison (with torch.compile): python benchmarks/ops.py")


if __name__ == "__main__":
    main()
