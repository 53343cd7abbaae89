"""Run under torchrun by tests/test_distributed.py: a few dual steps on this rank's shard of a fixed
batch, gradients averaged across processes; rank 0 saves the parameters."""
import sys

import torch
import torch.distributed as dist

from afd_fast import train
from afd_fast.model import AFDModel
from afd_fast.step import DualStep
from afd_fast.models import build_network


def make_model():
    # float64: Adam's first steps are about lr * sign(g), so float32 rounding of near-zero gradients
    # (all-reduce order vs a plain mean) would decide the comparison.
    torch.manual_seed(0)
    return AFDModel([build_network("resnet20", 5) for _ in range(2)], method="afd", topology="pair").double()


def batches(steps, per_rank, world):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(per_rank * world, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 5, (per_rank * world,), generator=g))
            for _ in range(steps)]


if __name__ == "__main__":
    out, steps, per_rank = sys.argv[1], 3, 4
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    step = DualStep(model, adv_lr=1e-3, average_gradients=train.average_across_processes)
    for images, target in batches(steps, per_rank, world):
        shard = slice(rank * per_rank, (rank + 1) * per_rank)
        step(images[shard], target[shard])
    if rank == 0:
        torch.save({n: p.detach() for n, p in model.named_parameters()}, out)
    dist.destroy_process_group()
