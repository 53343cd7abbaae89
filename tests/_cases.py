"""Shared input generators of the op tests (CPU and CUDA)."""
import torch

import afd_fast.ops as ops

# (rows M, students K, batch B, classes C, topology); M = K + 1 for the ensemble topology.
SHAPES = [
    (2, 2, 5, 1, "pair"),
    (2, 2, 9, 7, "pair"),
    (2, 2, 16, 100, "pair"),
    (2, 2, 8, 1000, "pair"),
    (2, 2, 3, 1001, "pair"),
    (2, 2, 2, 32000, "pair"),
    (3, 2, 6, 100, "ensemble"),
    (4, 3, 4, 1001, "ensemble"),
    (3, 3, 7, 1000, "cyclic"),
    (5, 5, 3, 17, "cyclic"),
    (4, 4, 5, 100, "dml"),
    (8, 8, 2, 33, "dml"),
]


def make_case(M, K, B, C, topology, dtype=torch.float64, device="cpu", scale=3.0, generator=None):
    logits = (torch.randn(M, B, C, dtype=torch.float64, generator=generator) * scale).to(device=device, dtype=dtype)
    target = torch.randint(0, C, (B,), generator=generator).to(device)
    weights = ops.peer_weights(topology, K, device=device)
    if topology == "ensemble":  # the teacher row holds the students' mean logits
        logits[K:] = logits[:K].mean(0, keepdim=True)
    return logits, target, weights
