"""Online adversarial feature-map distillation (docs/design.md §1), readable next to the paper.

K networks (G_k + head) train together on one mini-batch:

* logit loss, per network:  CE(y, z_k) + T² Σ_j W[k, j] KL(p_j^T || p_k^T)  (afd_fast.ops)
* discriminator D_k (Conv-BN-LeakyReLU-Conv, sigmoid inside the loss) calls its own network's
  (transferred) map fake and the map of the peer p(k) that k learns from real:
      L_D_k = [1 - D_k(T_p(f_p).detach())]² + [D_k(T_k(f_k).detach())]²
      L_G_k = [1 - D_k(T_k(f_k))]²

:class:`AFDModel` holds the networks, transfer layers and discriminators and computes these losses
from one forward; :mod:`afd_fast.step` takes the gradient sets and steps the optimizers. The
baselines of the paper's tables (:mod:`afd_fast.methods`) run through the same model: ONE
(branches on shared low layers, gated-ensemble teacher, :mod:`afd_fast.models.one`), online KD
(mean-ensemble teacher), L1 / L1+KD feature alignment online and offline (a frozen pre-trained
teacher), the ablations without KD or without the adversarial term, and DML (whose step differs:
:class:`afd_fast.step.DualStep`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from afd_fast import ops, reference
from afd_fast.errors import ConfigError
from afd_fast.methods import method_spec, peer_of
from afd_fast.mixing import SoftTarget, cross_entropy, loss_targets
from afd_fast.models import SplitNetwork
from afd_fast.models.base import probe_shape
from afd_fast.models.one import Gate, gated_ensemble, share_low_layers

class Discriminator(nn.Module):
    """Conv-BN-LeakyReLU-Conv: one score (before the sigmoid) per sample for a C x H x W map.
    The first conv halves channels and space, the last one covers the remaining spatial map. Along a
    side of 1 pixel the first conv has stride 1: the same result (one output, the kernel's centre
    tap), and it keeps clear of torch's bf16 CPU convolution bug on 1x1 maps with stride 2
    (tests/test_upstream_bugs.py), which the small maps of small images would hit."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        hidden = max(channels // 2, 1)
        stride = (1 if height == 1 else 2, 1 if width == 1 else 2)
        self.conv1 = nn.Conv2d(channels, hidden, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 1, ((height + 1) // 2, (width + 1) // 2))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.bn(self.conv1(feature_map)), 0.2)
        return self.conv2(x).flatten()


def transfer_layer(cin: int, cout: int, size: tuple[int, int] | None = None,
                   common_size: tuple[int, int] | None = None) -> nn.Module:
    """A map of ``cin`` channels and spatial ``size`` to the common shape: adaptive average pooling to
    ``common_size`` where the sizes differ (first: the convolution then runs on the smaller map), then
    Conv1x1-BN-ReLU to ``cout`` channels where the counts differ; identity where both already match."""
    layers = []
    if size is not None and common_size is not None and tuple(size) != tuple(common_size):
        layers.append(nn.AdaptiveAvgPool2d(tuple(common_size)))
    if cin != cout:
        layers += [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)]
    return nn.Sequential(*layers) if layers else nn.Identity()


class AFDModel(nn.Module):
    """The K networks with their transfer layers and discriminators (ONE: its gate), and the
    method's losses. ``temperature``: None for the method's default (:class:`MethodSpec`).
    ``image_size``: the size of the images the networks get, or one size per network: then each
    network's input is resized to its own size (:meth:`network_input`) and the feature maps meet
    through the transfer layers as maps of other shapes do."""

    def __init__(self, networks: list[SplitNetwork], method: str = "afd", topology: str = "cyclic",
                 image_size: int | Sequence[int] = 32, temperature: float | None = None, fused_losses: bool = True,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.spec = spec = method_spec(method)
        self.method = method
        # the fused ops, or their plain-PyTorch reference (the benchmarks' "what public code does")
        self.fused_losses = fused_losses
        k = len(networks)
        if k < 2 and method != "vanilla":
            raise ConfigError(f"method {method!r} distils between networks: it needs at least 2, got {k}")
        per_network = not isinstance(image_size, int)
        sizes = tuple(image_size) if per_network else (image_size,) * k
        if len(sizes) != k:
            raise ConfigError(f"{len(sizes)} image sizes for {k} networks: give one per network")
        self.input_sizes = sizes if per_network else (None,) * k  # None: as the images come
        if spec.shared_low_layers:
            if len(set(sizes)) > 1:
                raise ConfigError(f"method {method!r} shares its low layers between the networks: one image size")
            share_low_layers(networks)
        self.networks = nn.ModuleList(networks)
        self.temperature = spec.temperature if temperature is None else temperature
        self.label_smoothing = label_smoothing  # of the cross-entropy terms (the fused op's)
        weights = {"topology": topology, "dml": "dml", "ensemble": "ensemble", "gated": "ensemble"}.get(spec.weights)
        if weights == "pair" and k != 2:
            raise ConfigError(f"topology 'pair' is for exactly 2 networks, got {k}; use 'cyclic'")
        if spec.weights == "teacher":  # networks 0..K-2 learn from the last one; the teacher from none
            w = torch.zeros(k, k)
            w[:-1, -1] = 1.0
        else:
            w = ops.peer_weights("cyclic" if weights == "pair" else weights, k) if weights else torch.zeros(k, k)
        self.register_buffer("peer_weights", w, persistent=False)
        # whose feature map network i's L1 / adversarial loss reads: the frozen teacher, or its peer
        self.teachers = [k - 1 if spec.frozen_teacher else peer_of(i, k) for i in range(k)]

        self.transfers = nn.ModuleList()
        self.discriminators = nn.ModuleList()
        if spec.adversarial or spec.l1:
            # the shapes the networks really produce (one forward on fake tensors)
            shapes = [probe_shape(n.features, n, size) for n, size in zip(networks, sizes)]
            # online: every map to the largest channel count; offline: the students' maps to the teacher's;
            # space: every map pooled to the smallest height and width (the teacher's too: no parameters)
            common = shapes[-1][0] if spec.frozen_teacher else max(s[0] for s in shapes)
            space = (min(s[1] for s in shapes), min(s[2] for s in shapes))
            self.transfers.extend(transfer_layer(s[0], common, s[1:], space) for s in shapes)
            if spec.adversarial:
                self.discriminators.extend(Discriminator(common, *space) for _ in networks)
        self.gate = Gate(probe_shape(networks[0].low_level, networks[0], sizes[0])[0], k) if spec.weights == "gated" else None
        if spec.frozen_teacher:
            self.networks[-1].requires_grad_(False)
            self.networks[-1].eval()

    @property
    def losses(self):
        """The loss functions of the model and its step: :mod:`afd_fast.ops` or :mod:`afd_fast.reference`."""
        return ops if self.fused_losses else reference

    def train(self, mode: bool = True) -> "AFDModel":
        super().train(mode)
        if self.spec.frozen_teacher:  # the pre-trained teacher normalises with its own statistics, always
            self.networks[-1].eval()
        return self

    # --- parameter groups of the three gradient sets ---------------------------------------------
    def trained_networks(self) -> list[SplitNetwork]:
        """The networks that learn (all but a frozen teacher)."""
        return list(self.networks[:-1]) if self.spec.frozen_teacher else list(self.networks)

    def network_parameters(self) -> list[nn.Parameter]:
        """Parameters of the trained networks, each once (ONE's branches share their low layers)."""
        return _unique(p for n in self.trained_networks() for p in n.parameters())

    def logit_parameters(self) -> list[nn.Parameter]:
        """What the logit loss trains: the networks, ONE's gate, and the transfer layers when it holds
        the L1 feature-map term (with the adversarial methods L_G trains them)."""
        extra = list(self.transfers.parameters()) if self.spec.l1 and not self.spec.adversarial else []
        gate = list(self.gate.parameters()) if self.gate is not None else []
        return self.network_parameters() + extra + gate

    def generator_parameters(self) -> list[nn.Parameter]:
        """G_k and T_k: what L_G trains (the heads play no part in it)."""
        return _unique([p for n in self.networks for p in n.extractor_parameters()] + list(self.transfers.parameters()))

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminators.parameters())

    # --- the losses of one forward ---------------------------------------------------------------
    def forward(self, images: torch.Tensor, target: torch.Tensor | SoftTarget, cut_at_features: bool = False
                ) -> dict[str, torch.Tensor]:
        """One forward of every network; returns the summed losses of the three gradient sets
        (``logit``, ``generator``, ``discriminator``) and per-network parts for logging.

        ``target``: ``[B]`` classes, or the soft targets of a mixed batch (:class:`afd_fast.mixing.SoftTarget`):
        every cross-entropy of the method (the fused op's, ONE's gated ensemble's) takes them.

        ``cut_at_features``: the heads, transfer layers and discriminators read detached copies of
        the feature maps (returned as ``cut``, the attached maps as ``features``), so that the
        gradient sets can be taken down to the maps first and then through the extractors in one
        batched backward (see :func:`gradient_sets`)."""
        losses = self.losses
        spec, k = self.spec, len(self.networks)
        shared = self.networks[0].low_level(self.network_input(0, images)) if spec.shared_low_layers else None
        features = [self._features(i, self.network_input(i, images), shared) for i in range(k)]
        maps = [f.detach().requires_grad_() for f in features] if cut_at_features else features
        logits = [n.head(m) for n, m in zip(self.networks, maps)]
        z = torch.stack(logits)
        out = {}
        if spec.weights == "ensemble":  # the teacher row: mean logits of the K networks
            z = torch.cat([z, z.detach().mean(0, keepdim=True)])
        elif spec.weights == "gated":  # the teacher row: ONE's gated ensemble (the op detaches it)
            ensemble = gated_ensemble(self.gate(shared), z)
            z = torch.cat([z, ensemble.to(z.dtype)[None]])
            ensemble_ce = cross_entropy(ensemble, target)  # trains the gate (and the branches)
            out["ensemble_ce"] = ensemble_ce.detach()
        loss, ce, kl = self.logit_losses(z, target)
        out.update(ce=ce, kl=kl)
        if cut_at_features:
            out.update(features=features, cut=maps)
        # a frozen teacher's row holds its CE (logged), a constant: only the trained networks' losses count
        logit_loss = loss[:-1].sum() if spec.frozen_teacher else loss.sum()
        if spec.weights == "gated":
            logit_loss = logit_loss + ensemble_ce

        teacher = self.teachers  # whose map each network's feature loss reads
        if self.transfers:
            t = [tr(m) for tr, m in zip(self.transfers, maps)]
        if spec.l1:
            l1 = torch.stack([F.l1_loss(t[i], t[teacher[i]].detach()) for i in range(len(self.trained_networks()))])
            out["l1"] = l1.detach()
            logit_loss = logit_loss + l1.sum()
        out["logit"] = logit_loss
        if spec.adversarial:
            # One D_k forward on the own (not detached) map serves L_G and L_D: each gradient set is
            # taken only w.r.t. its own parameters (docs/design.md §2).
            d_own = torch.stack([d(t[i]) for i, d in enumerate(self.discriminators)])
            d_peer = torch.stack([d(t[teacher[i]].detach()) for i, d in enumerate(self.discriminators)])
            g_loss, d_loss = losses.lsgan_loss(d_own, d_peer)
            out.update(generator=g_loss.sum(), discriminator=d_loss.sum(), g_loss=g_loss.detach(),
                       d_loss=d_loss.detach(), d_own=d_own.detach(), d_peer=d_peer.detach())
        return out

    def logit_losses(self, z: torch.Tensor, target: torch.Tensor | SoftTarget):
        """``(loss, ce, kl)`` of the stacked logits ``z`` (``[M, B, C]``: the networks, then any
        teacher-only row) through the fused op, with this model's peers, temperature and label
        smoothing, against hard or soft (mixup/CutMix) targets."""
        hard, soft = loss_targets(target)
        return self.losses.mutual_distillation_loss(
            z, hard, self.peer_weights, self.temperature, kd_weight=1.0 if self.spec.kd else 0.0,
            label_smoothing=self.label_smoothing, **soft)

    def network_input(self, i: int, images: torch.Tensor) -> torch.Tensor:
        """The images as network i takes them: resized to its own input size when it has one (a
        comparison of shapes, no host sync: capturable)."""
        size = self.input_sizes[i]
        if size is None or tuple(images.shape[-2:]) == (size, size):
            return images
        if images.dtype == torch.float16 and images.device.type == "cpu":  # (no fp16 antialiasing kernel on CPUs)
            return F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False).half()
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    def _features(self, i: int, images: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        network = self.networks[i]
        if self.spec.frozen_teacher and i == len(self.networks) - 1:
            with torch.no_grad():  # the frozen teacher: no graph to keep
                return network.features(images)
        return network.high_level(shared) if shared is not None else network.features(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every network (``net<k>``) and, for ONE, of its gated ensemble
        (``gated_ensemble``), in the modules' current mode."""
        if not self.spec.shared_low_layers:
            return {f"net{i}": n(self.network_input(i, images))[1] for i, n in enumerate(self.networks)}
        shared = self.networks[0].low_level(self.network_input(0, images))
        logits = torch.stack([n.head(n.high_level(shared)) for n in self.networks])
        return {**{f"net{i}": z for i, z in enumerate(logits)},
                "gated_ensemble": gated_ensemble(self.gate(shared), logits)}


def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out

