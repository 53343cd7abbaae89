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

The baselines of the paper's tables run through the same step (:data:`METHOD_SPECS`): DML as its
authors define it (the networks step one after the other, §3.1 of the AFD paper), ONE (branches on
shared low layers, gated-ensemble teacher, :mod:`afd_fast.models.one`), online KD (mean-ensemble
teacher), L1 / L1+KD feature alignment online and offline (a frozen pre-trained teacher), and the
ablations without KD or without the adversarial term.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from afd_fast import ops, reference
from afd_fast.models import SplitNetwork
from afd_fast.models.cifar import CIFAR_NETWORKS
from afd_fast.models.one import Gate, gated_ensemble, low_level_channels, share_low_layers

METHODS = ("afd", "dml", "one", "kd", "vanilla", "l1", "l1kd", "l1kd-offline", "adv-only", "kd-only")


@dataclass(frozen=True)
class MethodSpec:
    """What each method of the paper's tables trains with."""

    kd: bool  # logit distillation (KL towards the teacher row(s) of ``weights``)
    adversarial: bool  # discriminators and L_G
    l1: bool  # direct L1 alignment of feature maps
    # who teaches whom: "topology" (the --topology flag), "dml" (every other network, 1/(K-1) each),
    # "ensemble" (the mean logits), "gated" (ONE's gated ensemble), "teacher" (the last network) or "none"
    weights: str
    temperature: float = 3.0  # default T: the AFD paper's (and ONE's) 3; DML's paper uses plain softmaxes
    sequential: bool = False  # DML: network k steps, then network k+1's loss sees k's updated prediction
    shared_low_layers: bool = False  # ONE: branches on network 0's low layers, plus a gate
    frozen_teacher: bool = False  # offline: the last network is a pre-trained teacher and never trains


METHOD_SPECS = {
    "afd": MethodSpec(kd=True, adversarial=True, l1=False, weights="topology"),
    "dml": MethodSpec(kd=True, adversarial=False, l1=False, weights="dml", temperature=1.0, sequential=True),
    "one": MethodSpec(kd=True, adversarial=False, l1=False, weights="gated", shared_low_layers=True),
    "kd": MethodSpec(kd=True, adversarial=False, l1=False, weights="ensemble"),  # online KD, ensemble teacher
    "vanilla": MethodSpec(kd=False, adversarial=False, l1=False, weights="none"),
    "l1": MethodSpec(kd=False, adversarial=False, l1=True, weights="topology"),
    "l1kd": MethodSpec(kd=True, adversarial=False, l1=True, weights="topology"),
    "l1kd-offline": MethodSpec(kd=True, adversarial=False, l1=True, weights="teacher", frozen_teacher=True),
    "adv-only": MethodSpec(kd=False, adversarial=True, l1=False, weights="topology"),
    # AFD without the adversarial term: one synchronous step of the topology's KD (not DML)
    "kd-only": MethodSpec(kd=True, adversarial=False, l1=False, weights="topology"),
}


def method_spec(method: str) -> MethodSpec:
    if method not in METHOD_SPECS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHOD_SPECS[method]


def architecture_problem(method: str, archs: list[str]) -> str | None:
    """Why ``method`` cannot train these networks (for the CLI, before any work), or None."""
    spec = method_spec(method)
    if len(archs) < 2 and method != "vanilla":
        return f"--method {method} distils between networks: give at least 2 in --arch (e.g. resnet20,resnet20)"
    if spec.shared_low_layers and (len(set(archs)) > 1 or archs[0] not in CIFAR_NETWORKS):
        return (f"--method {method} shares the low layers of its branches: give one CIFAR ResNet or WRN K times "
                "(e.g. resnet32,resnet32)")
    return None


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
    """The K networks with their transfer layers and discriminators (ONE: its gate), and the
    method's losses. ``temperature``: None for the method's default (:class:`MethodSpec`)."""

    def __init__(self, networks: list[SplitNetwork], method: str = "afd", topology: str = "cyclic",
                 image_size: int = 32, temperature: float | None = None, fused_losses: bool = True):
        super().__init__()
        self.spec = spec = method_spec(method)
        self.method = method
        # the fused ops, or their plain-PyTorch reference (the benchmarks' "what public code does")
        self.fused_losses = fused_losses
        k = len(networks)
        if k < 2 and method != "vanilla":
            raise ValueError(f"method {method!r} distils between networks: it needs at least 2, got {k}")
        if spec.shared_low_layers:
            share_low_layers(networks)
        self.networks = nn.ModuleList(networks)
        self.temperature = spec.temperature if temperature is None else temperature
        weights = {"topology": topology, "dml": "dml", "ensemble": "ensemble", "gated": "ensemble"}.get(spec.weights)
        if weights == "pair" and k != 2:
            raise ValueError(f"topology 'pair' is for exactly 2 networks, got {k}; use 'cyclic'")
        if spec.weights == "teacher":  # networks 0..K-2 learn from the last one; the teacher from none
            w = torch.zeros(k, k)
            w[:-1, -1] = 1.0
        else:
            w = ops.peer_weights("cyclic" if weights == "pair" else weights, k) if weights else torch.zeros(k, k)
        self.register_buffer("peer_weights", w, persistent=False)
        if spec.sequential:  # one network at a time: row 0 the student, rows 1..K-1 its peers, 1/(K-1) each
            row = torch.full((1, k), 1 / (k - 1))
            row[0, 0] = 0.0
            self.register_buffer("sequential_weights", row, persistent=False)
        # whose feature map network i's L1 / adversarial loss reads: the frozen teacher, or its peer
        self.teachers = [k - 1 if spec.frozen_teacher else peer_of(i, k) for i in range(k)]

        self.transfers = nn.ModuleList()
        self.discriminators = nn.ModuleList()
        if spec.adversarial or spec.l1:
            shapes = [feature_shape(n, image_size) for n in networks]
            if len({s[1:] for s in shapes}) > 1:
                raise ValueError(f"feature maps of the networks differ in spatial size: {shapes}")
            # online: every map to the largest channel count; offline: the students' maps to the teacher's
            common = shapes[-1][0] if spec.frozen_teacher else max(s[0] for s in shapes)
            self.transfers.extend(transfer_layer(s[0], common) for s in shapes)
            if spec.adversarial:
                self.discriminators.extend(Discriminator(common, *shapes[0][1:]) for _ in networks)
        self.gate = Gate(low_level_channels(networks[0], image_size), k) if spec.weights == "gated" else None
        if spec.frozen_teacher:
            self.networks[-1].requires_grad_(False)
            self.networks[-1].eval()

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
    def forward(self, images: torch.Tensor, target: torch.Tensor, cut_at_features: bool = False
                ) -> dict[str, torch.Tensor]:
        """One forward of every network; returns the summed losses of the three gradient sets
        (``logit``, ``generator``, ``discriminator``) and per-network parts for logging.

        ``cut_at_features``: the heads, transfer layers and discriminators read detached copies of
        the feature maps (returned as ``cut``, the attached maps as ``features``), so that the
        gradient sets can be taken down to the maps first and then through the extractors in one
        batched backward (see :func:`gradient_sets`)."""
        losses = ops if self.fused_losses else reference
        spec, k = self.spec, len(self.networks)
        shared = self.networks[0].low_level(images) if spec.shared_low_layers else None
        features = [self._features(i, images, shared) for i in range(k)]
        maps = [f.detach().requires_grad_() for f in features] if cut_at_features else features
        logits = [n.head(m) for n, m in zip(self.networks, maps)]
        z = torch.stack(logits)
        out = {}
        if spec.weights == "ensemble":  # the teacher row: mean logits of the K networks
            z = torch.cat([z, z.detach().mean(0, keepdim=True)])
        elif spec.weights == "gated":  # the teacher row: ONE's gated ensemble (the op detaches it)
            ensemble = gated_ensemble(self.gate(shared), z)
            z = torch.cat([z, ensemble.to(z.dtype)[None]])
            ensemble_ce = F.cross_entropy(ensemble, target)  # trains the gate (and the branches)
            out["ensemble_ce"] = ensemble_ce.detach()
        loss, ce, kl = losses.mutual_distillation_loss(
            z, target, self.peer_weights, self.temperature, kd_weight=1.0 if spec.kd else 0.0)
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
            # taken only w.r.t. its own parameters (DESIGN §4).
            d_own = torch.stack([d(t[i]) for i, d in enumerate(self.discriminators)])
            d_peer = torch.stack([d(t[teacher[i]].detach()) for i, d in enumerate(self.discriminators)])
            g_loss, d_loss = losses.lsgan_loss(d_own, d_peer)
            out.update(generator=g_loss.sum(), discriminator=d_loss.sum(), g_loss=g_loss.detach(),
                       d_loss=d_loss.detach(), d_own=d_own.detach(), d_peer=d_peer.detach())
        return out

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
            return {f"net{i}": n(images)[1] for i, n in enumerate(self.networks)}
        shared = self.networks[0].low_level(images)
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


@contextlib.contextmanager
def batch_statistics_only(module: nn.Module):
    """Train-mode batch norm that normalises with the batch's statistics but leaves the running ones
    alone: a second forward of the same batch must not count it twice."""
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def gradient_sets(model: AFDModel, losses: dict[str, torch.Tensor],
                  loss_scale: torch.Tensor | None = None) -> list[tuple[list[nn.Parameter], list]]:
    """The three gradient sets at the current parameters, each w.r.t. its own parameter group
    (multiplied by ``loss_scale`` when given: fp16 loss scaling).

    When the forward was cut at the feature maps (``cut`` in losses), the logit and generator sets
    go down to the maps separately and then through the extractors in one backward with two
    stacked gradient outputs (``is_grads_batched``) instead of two passes: the same values."""
    groups = [("logit", model.logit_parameters())]
    if model.spec.adversarial:
        groups += [("generator", model.generator_parameters()), ("discriminator", model.discriminator_parameters())]
    scaled = {name: losses[name] if loss_scale is None else losses[name] * loss_scale for name, _ in groups}
    if "cut" in losses and len(groups) == 3:
        return _batched_gradient_sets(model, losses["features"], losses["cut"], scaled, groups)
    sets = []
    for n, (name, params) in enumerate(groups):
        grads = torch.autograd.grad(scaled[name], params, retain_graph=n < len(groups) - 1, allow_unused=True)
        sets.append((params, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]))
    return sets


def _batched_gradient_sets(model: AFDModel, features, cut, scaled, groups):
    extractor = [p for n in model.networks for p in n.extractor_parameters()]
    in_extractor = {id(p) for p in extractor}
    grads = {}  # (set name, id(param)) -> gradient
    at_maps = {}
    for name, params in groups:
        above = [p for p in params if id(p) not in in_extractor]  # heads, transfer layers, discriminators
        wrt = above + (list(cut) if name != "discriminator" else [])
        got = torch.autograd.grad(scaled[name], wrt, retain_graph=True, allow_unused=True)
        grads.update({(name, id(p)): g for p, g in zip(above, got)})
        if name != "discriminator":
            at_maps[name] = [torch.zeros_like(c) if g is None else g for c, g in zip(cut, got[len(above):])]
    stacked = [torch.stack([a, b]) for a, b in zip(at_maps["logit"], at_maps["generator"])]
    through = torch.autograd.grad(features, extractor, stacked, is_grads_batched=True, allow_unused=True)
    for p, g in zip(extractor, through):
        if g is not None:
            grads[("logit", id(p))], grads[("generator", id(p))] = g[0], g[1]
    sets = []
    for name, params in groups:
        got = [grads.get((name, id(p))) for p in params]
        sets.append((params, [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]))
    return sets


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class LossScale:
    """Dynamic fp16 loss scaling that stays on the device (no host sync, so it can live in a CUDA
    graph): the fused optimizers skip a step whose gradients hold inf/NaN (``found_inf``), the scale
    halves on such a step and doubles after ``growth_interval`` clean ones (as torch's GradScaler)."""

    def __init__(self, device: torch.device, init_scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_interval = growth_interval

    def unscale_(self, grad_sets: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Divides every gradient by the scale in place; returns one found_inf per set (1.0 if any
        of its gradients is inf/NaN, else 0.0): each optimizer skips only its own bad step."""
        inv_scale = self.scale.reciprocal()
        found_infs = []
        for grads in grad_sets:
            found_infs.append(torch.zeros((), dtype=torch.float32, device=self.scale.device))
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_infs[-1], inv_scale)
        return found_infs

    def update(self, found_infs: list[torch.Tensor]) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, torch.stack(found_infs).sum(),
                                 2.0, 0.5, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


class DualStep:
    """Single forward, dual (triple) optimizer step: SGD on the logit loss, Adam on L_G, Adam on L_D.
    For DML (``spec.sequential``) the networks' SGD steps follow one another instead
    (:meth:`_sequential_step`), in the same optimizer (steps after the first see gradients of one
    network only), so schedules, checkpoints and CUDA-graph capture treat it as every other method.

    ``average_gradients`` (e.g. an all-reduce across processes) is applied to every gradient set
    before any optimizer steps, since ``autograd.grad`` bypasses DDP's hooks.

    ``amp``: "bf16" or "fp16" autocast of the forward ("off": the parameters' dtype); fp16 adds
    :class:`LossScale`. ``fused``: torch's fused SGD/Adam with learning rates held in device tensors
    (the schedules update them in place), needed for fp16 and for CUDA-graph capture; default on CUDA
    and with fp16.
    ``capturable``: Adam ready for CUDA-graph capture (CUDA only). ``batched_backward``: the logit
    and generator sets through the extractors in one batched backward (see :func:`gradient_sets`;
    an experiment that ``benchmarks/step.py`` measures, off by default)."""

    def __init__(self, model: AFDModel, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                 adv_lr: float = 2e-5, adv_weight_decay: float = 0.1, average_gradients=None, amp: str = "off",
                 fused: bool | None = None, capturable: bool = False, batched_backward: bool = False):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        self.model = model
        self.average_gradients = average_gradients
        self.batched_backward = batched_backward and model.spec.adversarial
        self.device = next(model.parameters()).device
        self.amp_dtype = AMP_DTYPES[amp]
        fused = (self.device.type == "cuda" or amp == "fp16") if fused is None else fused
        if amp == "fp16" and not fused:
            raise ValueError("amp='fp16' skips steps on the device through the fused optimizers: use fused=True")
        self.loss_scale = LossScale(self.device) if amp == "fp16" else None

        def rate(value: float):
            return torch.tensor(value, dtype=torch.float32, device=self.device) if fused else value

        adam = dict(weight_decay=adv_weight_decay, fused=fused or None, capturable=capturable)
        self.optimizers = {"logit": torch.optim.SGD(model.logit_parameters(), lr=rate(lr), momentum=momentum,
                                                    weight_decay=weight_decay, fused=fused or None)}
        if fused and momentum != 0:
            # torch's fused SGD allocates momentum buffers uninitialised (empty_like) on its first
            # step and fills them in the kernel, which returns early when found_inf is set: an fp16
            # overflow on step one would leave garbage. Zeros give the same first step (0.9*0 + g = g).
            sgd = self.optimizers["logit"]
            for p in model.logit_parameters():
                sgd.state[p]["momentum_buffer"] = torch.zeros_like(p)
        if model.spec.adversarial:
            self.optimizers["generator"] = torch.optim.Adam(model.generator_parameters(), lr=rate(adv_lr), **adam)
            self.optimizers["discriminator"] = torch.optim.Adam(model.discriminator_parameters(), lr=rate(adv_lr),
                                                                **adam)

    def _autocast(self):
        # autocast's weight cache must be off under CUDA-graph capture (and buys nothing here:
        # every weight is cast once per forward anyway)
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None, cache_enabled=False)

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.model.spec.sequential:
            return self._sequential_step(images, target)
        with self._autocast():
            losses = self.model(images, target, cut_at_features=self.batched_backward)
        scale = self.loss_scale.scale if self.loss_scale is not None else None
        sets = gradient_sets(self.model, losses, scale)
        if self.average_gradients is not None:  # all three sets in one collective
            self.average_gradients([g for _, grads in sets for g in grads])
        if self.loss_scale is not None:
            found_infs = self.loss_scale.unscale_([grads for _, grads in sets])
            for optimizer, found_inf in zip(self.optimizers.values(), found_infs):
                optimizer.grad_scale, optimizer.found_inf = None, found_inf
        # All sets exist before the first step; an extractor parameter is in two sets, so each
        # optimizer gets its own gradients right before it steps.
        for (params, grads), optimizer in zip(sets, self.optimizers.values()):
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            for p in params:
                p.grad = None
        if self.loss_scale is not None:
            self.loss_scale.update(found_infs)
        return losses

    def _sequential_step(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """DML as its authors define it (Zhang et al., 2018, Algorithm 1), for K networks in turn:
        network k takes an SGD step on CE + T² · mean_{j≠k} KL(p_j || p_k) towards the others'
        current predictions, then its prediction is recomputed with the updated weights, so the
        networks after it learn from that. Network k's own forward is the one of the step's start
        (its weights have not changed before its turn); the recomputation needs no graph, and its
        batch norm normalises with the batch without counting it a second time."""
        model, optimizer = self.model, self.optimizers["logit"]
        losses = ops if model.fused_losses else reference
        scale = self.loss_scale.scale if self.loss_scale is not None else None
        with self._autocast():
            logits = [n(images)[1] for n in model.networks]
        totals, ces, kls, found_infs = [], [], [], []
        for k, network in enumerate(model.networks):
            # row 0 the student k, rows 1..K-1 its peers (teachers: the op detaches them)
            z = torch.stack([logits[k]] + [peer.detach() for j, peer in enumerate(logits) if j != k])
            loss, ce, kl = losses.mutual_distillation_loss(z, target, model.sequential_weights, model.temperature)
            params = list(network.parameters())
            grads = torch.autograd.grad(loss.sum() if scale is None else loss.sum() * scale, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            if self.average_gradients is not None:
                self.average_gradients(grads)
            if self.loss_scale is not None:
                found_infs += self.loss_scale.unscale_([grads])
                optimizer.grad_scale, optimizer.found_inf = None, found_infs[-1]
            for p, g in zip(params, grads):  # only network k has gradients: SGD leaves the others alone
                p.grad = g
            optimizer.step()
            for p in params:
                p.grad = None
            if k < len(logits) - 1:
                with torch.no_grad(), self._autocast(), batch_statistics_only(network):
                    logits[k] = network(images)[1]
            totals.append(loss.detach())
            ces.append(ce)
            kls.append(kl)
        if self.loss_scale is not None:
            self.loss_scale.update(found_infs)
        return {"ce": torch.cat(ces), "kl": torch.cat(kls), "logit": torch.cat(totals).sum()}

    def state_dict(self) -> dict:
        state = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        if self.loss_scale is not None:
            state["loss_scale"] = self.loss_scale.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Optimizer state, learning rates and loss scale from a checkpoint; how this run steps
        (fused, capturable, device lr tensors, memory layout) stays as built, whatever the
        checkpoint's run used. Load before a CUDA graph is captured."""
        for name, opt in self.optimizers.items():
            built = [dict(group) for group in opt.param_groups]
            opt.load_state_dict(state[name])
            for group, before in zip(opt.param_groups, built):
                for key in ("fused", "capturable", "foreach", "differentiable"):
                    if key in before:
                        group[key] = before[key]
                rate = before["lr"]
                if isinstance(rate, torch.Tensor):  # keep the device tensor (a CUDA graph may hold it)
                    rate.fill_(group["lr"])
                    group["lr"] = rate
                steps_on_device = group.get("fused") or group.get("capturable")
                for p in group["params"]:
                    values = opt.state.get(p, {})
                    for key, value in values.items():
                        if not isinstance(value, torch.Tensor):
                            continue
                        if value.shape == p.shape:  # moments in the parameter's layout (channels-last or not)
                            values[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
                        elif key == "step" and steps_on_device:  # fused/capturable Adam counts on the device
                            values[key] = value.to(p.device, torch.float32)
        if self.loss_scale is not None and "loss_scale" in state:
            self.loss_scale.load_state_dict(state["loss_scale"])
