"""ONE, On-the-fly Native Ensemble (Lan et al., NeurIPS 2018): the online baseline of the AFD
paper's Tables 3 and 5.

K branches on shared low layers: every network keeps its own last stage and head (a branch) and
uses the low layers of network 0, so each network is still a whole classifier (``net(x)``, its
``plain_state_dict``) and the K networks together hold ONE's multi-branch model once. The gate reads
the shared map and weights the branches' logits into the gated ensemble, the teacher of every branch
(see ``afd_fast.model``: its loss is CE of every branch and of the ensemble, plus T² KL from the
detached ensemble to each branch, T = 3 as in ONE's code).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from afd_fast.models.base import SplitNetwork


def share_low_layers(networks: list[SplitNetwork]) -> None:
    """Makes networks 1..K-1 use network 0's low layers (the same modules, trained once by the sum
    of every branch's loss). The networks must be one CIFAR architecture K times."""
    first = networks[0]
    if not first.low_level_modules:
        raise ValueError(f"ONE branches the last stage of a CIFAR ResNet or WRN; {type(first).__name__} has no "
                         "such split")
    shapes = [[tuple(p.shape) for p in n.parameters()] for n in networks]
    if any(type(n) is not type(first) or s != shapes[0] for n, s in zip(networks, shapes)):
        raise ValueError("ONE shares the low layers of its branches: give the same network K times "
                         "(e.g. resnet32,resnet32)")
    for network in networks[1:]:
        for name in first.low_level_modules:
            setattr(network, name, getattr(first, name))


class Gate(nn.Module):
    """ONE's gate: global average pool of the shared map, FC to one score per branch, BN, ReLU, softmax
    over the branches (as ONE's code: ``control_v1``, ``bn_v1``)."""

    def __init__(self, channels: int, branches: int):
        super().__init__()
        self.fc = nn.Linear(channels, branches)
        self.bn = nn.BatchNorm1d(branches)

    def forward(self, shared_map: torch.Tensor) -> torch.Tensor:
        scores = self.fc(torch.flatten(F.adaptive_avg_pool2d(shared_map, 1), 1))
        return F.relu(self.bn(scores)).softmax(-1)  # [B, K], rows sum to 1


def gated_ensemble(gate: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ_k g_k z_k: ``gate`` [B, K], ``logits`` [K, B, C] -> [B, C]."""
    return (gate.t().unsqueeze(-1) * logits).sum(0)
