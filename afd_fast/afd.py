"""Online adversarial feature-map distillation (DESIGN §1), readable next to the paper.

K networks (G_k + head) train together on one mini-batch:

* logit loss, per network:  CE(y, z_k) + T² Σ_j W[k, j] KL(p_j^T || p_k^T)  (afd_fast.ops)
* discriminator D_k (Conv-BN-LeakyReLU-Conv, sigmoid inside the loss) calls its own network's
  (transferred) map fake and the map of the peer p(k) that k learns from real:
      L_D_k = [1 - D_k(T_p(f_p).detach())]² + [D_k(T_k(f_k).detach())]²
      L_G_k = [1 - D_k(T_k(f_k))]²
* single forward, dual step: the gradients of Σ L_logit (all network parameters), Σ L_G
  (extractors and transfer layers) and Σ L_D (discriminators) are all taken at the same parameters
  from the one forward, then SGD, Adam and Adam step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from afd_fast import ops
from afd_fast.models import SplitNetwork

METHODS = ("afd", "dml", "kd", "vanilla", "l1", "l1kd", "adv-only", "kd-only")


@dataclass(frozen=True)
class MethodSpec:
    """What each method of the paper's tables trains with."""

    kd: bool  # logit distillation (KL towards peers)
    adversarial: bool  # discriminators and L_G
    l1: bool  # direct L1 alignment of feature maps
    weights: str  # "topology" (the --topology flag), "dml", "ensemble" or "none"


METHOD_SPECS = {
    "afd": MethodSpec(kd=True, adversarial=True, l1=False, weights="topology"),
    "dml": MethodSpec(kd=True, adversarial=False, l1=False, weights="dml"),
    "kd": MethodSpec(kd=True, adversarial=False, l1=False, weights="ensemble"),  # online KD, ensemble teacher
    "vanilla": MethodSpec(kd=False, adversarial=False, l1=False, weights="none"),
    "l1": MethodSpec(kd=False, adversarial=False, l1=True, weights="topology"),
    "l1kd": MethodSpec(kd=True, adversarial=False, l1=True, weights="topology"),
    "adv-only": MethodSpec(kd=False, adversarial=True, l1=False, weights="topology"),
    "kd-only": MethodSpec(kd=True, adversarial=False, l1=False, weights="topology"),
}


def method_spec(method: str) -> MethodSpec:
    if method not in METHOD_SPECS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHOD_SPECS[method]


def peer_of(k: int, num_networks: int) -> int:
    """The network k learns from: the other one for a pair, k-1 in the cyclic scheme (1->2, ..., K->1)."""
    return (k - 1) % num_networks


class Discriminator(nn.Module):
    """Conv-BN-LeakyReLU-Conv: one score (before the sigmoid) per sample for a C x H x W map.
    The first conv halves channels and space, the last one covers the remaining spatial map."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        hidden = max(channels // 2, 1)
        self.conv1 = nn.Conv2d(channels, hidden, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 1, ((height + 1) // 2, (width + 1) // 2))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.bn(self.conv1(feature_map)), 0.2)
        return self.conv2(x).flatten()


def transfer_layer(cin: int, cout: int) -> nn.Module:
    """Conv1x1-BN-ReLU to the common channel count; identity where the count already matches."""
    if cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False))


def feature_shape(network: SplitNetwork, image_size: int) -> tuple[int, int, int]:
    """C, H, W of a network's feature map for square images of the given size."""
    was_training = network.training
    network.eval()
    with torch.no_grad():
        probe = next(network.parameters()).new_zeros(1, 3, image_size, image_size)
        shape = tuple(network.features(probe).shape[1:])
    network.train(was_training)
    return shape


class AFDModel(nn.Module):
    """The K networks with their transfer layers and discriminators, and the method's losses."""

    def __init__(self, networks: list[SplitNetwork], method: str = "afd", topology: str = "cyclic",
                 image_size: int = 32, temperature: float = 3.0):
        super().__init__()
        self.spec = method_spec(method)
        self.method = method
        k = len(networks)
        if k < 2 and method != "vanilla":
            raise ValueError(f"method {method!r} distils between networks: it needs at least 2, got {k}")
        self.networks = nn.ModuleList(networks)
        self.temperature = temperature
        weights = {"topology": topology, "dml": "dml", "ensemble": "ensemble"}.get(self.spec.weights)
        if weights == "pair" and k != 2:
            raise ValueError(f"topology 'pair' is for exactly 2 networks, got {k}; use 'cyclic'")
        w = ops.peer_weights("cyclic" if weights == "pair" else weights, k) if weights else torch.zeros(k, k)
        self.register_buffer("peer_weights", w, persistent=False)

        self.transfers = nn.ModuleList()
        self.discriminators = nn.ModuleList()
        if self.spec.adversarial or self.spec.l1:
            shapes = [feature_shape(n, image_size) for n in networks]
            if len({s[1:] for s in shapes}) > 1:
                raise ValueError(f"feature maps of the networks differ in spatial size: {shapes}")
            common = max(s[0] for s in shapes)
            self.transfers.extend(transfer_layer(s[0], common) for s in shapes)
            if self.spec.adversarial:
                self.discriminators.extend(Discriminator(common, *shapes[0][1:]) for _ in networks)

    # --- parameter groups of the three gradient sets ---------------------------------------------
    def network_parameters(self) -> list[nn.Parameter]:
        return [p for n in self.networks for p in n.parameters()]

    def generator_parameters(self) -> list[nn.Parameter]:
        """G_k and T_k: what L_G trains (the heads play no part in it)."""
        return [p for n in self.networks for p in n.extractor_parameters()] + list(self.transfers.parameters())

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminators.parameters())

    # --- the losses of one forward ---------------------------------------------------------------
    def forward(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward of every network; returns the summed losses of the three gradient sets
        (``logit``, ``generator``, ``discriminator``) and per-network parts for logging."""
        maps, logits = zip(*(n(images) for n in self.networks))
        z = torch.stack(logits)
        if self.spec.weights == "ensemble":  # the teacher row: mean logits of the K networks
            z = torch.cat([z, z.detach().mean(0, keepdim=True)])
        loss, ce, kl = ops.mutual_distillation_loss(
            z, target, self.peer_weights, self.temperature, kd_weight=1.0 if self.spec.kd else 0.0)
        out = {"ce": ce, "kl": kl}
        logit_loss = loss.sum()

        k = len(self.networks)
        if self.transfers:
            t = [tr(m) for tr, m in zip(self.transfers, maps)]
        if self.spec.l1:
            l1 = torch.stack([F.l1_loss(t[i], t[peer_of(i, k)].detach()) for i in range(k)])
            out["l1"] = l1.detach()
            logit_loss = logit_loss + l1.sum()
        out["logit"] = logit_loss
        if self.spec.adversarial:
            # One D_k forward on the own (not detached) map serves L_G and L_D: each gradient set is
            # taken only w.r.t. its own parameters (DESIGN §4).
            d_own = torch.stack([d(t[i]) for i, d in enumerate(self.discriminators)])
            d_peer = torch.stack([d(t[peer_of(i, k)].detach()) for i, d in enumerate(self.discriminators)])
            g_loss, d_loss = ops.lsgan_loss(d_own, d_peer)
            out.update(generator=g_loss.sum(), discriminator=d_loss.sum(), g_loss=g_loss.detach(),
                       d_loss=d_loss.detach(), d_own=d_own.detach(), d_peer=d_peer.detach())
        return out


def gradient_sets(model: AFDModel, losses: dict[str, torch.Tensor]) -> list[tuple[list[nn.Parameter], list]]:
    """The three gradient sets at the current parameters, each w.r.t. its own parameter group."""
    sets = []
    groups = [("logit", model.network_parameters())]
    if model.spec.adversarial:
        groups += [("generator", model.generator_parameters()), ("discriminator", model.discriminator_parameters())]
    for n, (name, params) in enumerate(groups):
        grads = torch.autograd.grad(losses[name], params, retain_graph=n < len(groups) - 1, allow_unused=True)
        sets.append((params, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]))
    return sets


class DualStep:
    """Single forward, dual (triple) optimizer step: SGD on the logit loss, Adam on L_G, Adam on L_D.

    ``average_gradients`` (e.g. an all-reduce across processes) is applied to every gradient set
    before any optimizer steps, since ``autograd.grad`` bypasses DDP's hooks."""

    def __init__(self, model: AFDModel, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                 adv_lr: float = 2e-5, adv_weight_decay: float = 0.1, average_gradients=None):
        self.model = model
        self.average_gradients = average_gradients
        self.optimizers = {"logit": torch.optim.SGD(model.network_parameters(), lr=lr, momentum=momentum,
                                                    weight_decay=weight_decay)}
        if model.spec.adversarial:
            self.optimizers["generator"] = torch.optim.Adam(model.generator_parameters(), lr=adv_lr,
                                                            weight_decay=adv_weight_decay)
            self.optimizers["discriminator"] = torch.optim.Adam(model.discriminator_parameters(), lr=adv_lr,
                                                                weight_decay=adv_weight_decay)

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = self.model(images, target)
        sets = gradient_sets(self.model, losses)
        # All sets exist before the first step; an extractor parameter is in two sets, so each
        # optimizer gets its own gradients right before it steps.
        for (params, grads), optimizer in zip(sets, self.optimizers.values()):
            if self.average_gradients is not None:
                self.average_gradients(grads)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            for p in params:
                p.grad = None
        return losses
