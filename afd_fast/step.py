"""The training step: the gradient sets of one forward and the optimizer steps (docs/design.md §2).

Single forward, dual step: the gradients of Σ L_logit (all network parameters), Σ L_G (extractors
and transfer layers) and Σ L_D (discriminators) are all taken at the same parameters from the one
forward of :class:`afd_fast.model.AFDModel`, then SGD, Adam and Adam step. fp16 adds
:class:`LossScale`, a loss scale that stays on the device so that the step can be captured in a
CUDA graph (:mod:`afd_fast.graph`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from afd_fast.ema import WeightEMA
from afd_fast.mixing import Mixing
from afd_fast.model import AFDModel

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
    Every method steps every trained network once per batch. DML (``--method dml``) is that step too:
    each network's loss is CE + T² · mean_{j≠k} KL(p_j || p_k) with the peers detached, so network
    k's gradient comes from its own loss only and one SGD step over all networks is the same as K
    per-network steps, in any order.

    ``dml_update="alternate"`` (DML only): the DML authors' released code instead. A call is one
    iteration: it takes K batches, concatenated (``batches_per_call``), and network k updates on the
    k-th (:meth:`_alternate`), so each network gets one update per call.

    ``average_gradients`` (e.g. an all-reduce across processes) is applied to every gradient set
    before any optimizer steps, since ``autograd.grad`` bypasses DDP's hooks.

    ``amp``: "bf16" or "fp16" autocast of the forward ("off": the parameters' dtype); fp16 adds
    :class:`LossScale`. ``fused``: torch's fused SGD/Adam with learning rates held in device tensors
    (the schedules update them in place), needed for fp16 and for CUDA-graph capture; default on CUDA
    and with fp16.
    ``norm_weight_decay``, ``bias_weight_decay``: the decay of normalisation layers' parameters and of
    the other biases in every optimizer (:func:`decay_groups`; None: as the rest). ``model_ema``: the
    decay of a :class:`afd_fast.ema.WeightEMA` of the networks, updated at the end of every call
    (every ``model_ema_every`` calls), inside what a CUDA graph captures; None: none.
    ``mixing``: mixup/CutMix (:class:`afd_fast.mixing.Mixing`) of each batch on the device at the
    start of the call, so inside the captured step; every network sees the same mixed images and the
    losses take the soft targets (alternating DML: each network's batch mixed on its turn). None: off.
    ``capturable``: Adam ready for CUDA-graph capture (CUDA only). ``batched_backward``: the logit
    and generator sets through the extractors in one batched backward (see :func:`gradient_sets`;
    an experiment that ``benchmarks/step.py`` measures, off by default)."""

    def __init__(self, model: AFDModel, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                 adv_lr: float = 2e-5, adv_weight_decay: float = 0.1, average_gradients=None, amp: str = "off",
                 fused: bool | None = None, capturable: bool = False, batched_backward: bool = False,
                 nesterov: bool = False, dml_update: str = "sync", norm_weight_decay: float | None = None,
                 bias_weight_decay: float | None = None, model_ema: float | None = None, model_ema_every: int = 1,
                 mixing: Mixing | None = None):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        if dml_update not in ("sync", "alternate") or (dml_update == "alternate" and model.method != "dml"):
            raise ValueError(f"dml_update {dml_update!r}: 'sync', or 'alternate' for method dml only")
        self.model = model
        self.mixing = mixing
        self.alternate = dml_update == "alternate"
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

        kinds = parameter_kinds(model)

        def groups(params, decay: float) -> list[dict]:
            return decay_groups(params, kinds, decay, norm_weight_decay, bias_weight_decay)
        adam = dict(fused=fused or None, capturable=capturable)
        self.optimizers = {"logit": torch.optim.SGD(groups(model.logit_parameters(), weight_decay), lr=rate(lr),
                                                    momentum=momentum, nesterov=nesterov, fused=fused or None)}
        if fused and momentum != 0:
            # torch's fused SGD allocates momentum buffers uninitialised (empty_like) on its first
            # step and fills them in the kernel, which returns early when found_inf is set: an fp16
            # overflow on step one would leave garbage. Zeros give the same first step (0.9*0 + g = g).
            sgd = self.optimizers["logit"]
            for p in model.logit_parameters():
                sgd.state[p]["momentum_buffer"] = torch.zeros_like(p)
        if model.spec.adversarial:
            self.optimizers["generator"] = torch.optim.Adam(groups(model.generator_parameters(), adv_weight_decay),
                                                            lr=rate(adv_lr), **adam)
            self.optimizers["discriminator"] = torch.optim.Adam(
                groups(model.discriminator_parameters(), adv_weight_decay), lr=rate(adv_lr), **adam)
        # the weight EMA, updated at the end of every call: inside the step that a CUDA graph captures
        self.ema = WeightEMA(model, model_ema, model_ema_every) if model_ema else None

    def _autocast(self):
        # autocast's weight cache must be off under CUDA-graph capture (and buys nothing here:
        # every weight is cast once per forward anyway)
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None, cache_enabled=False)

    @property
    def batches_per_call(self) -> int:
        """Loader batches one call takes, concatenated: K for alternating DML, else 1."""
        return len(self.model.networks) if self.alternate else 1

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step on this batch (alternating DML: one iteration on these K batches), then
        the weight EMA's update."""
        losses = self._alternate(images, target) if self.alternate else self._synchronous(images, target)
        if self.ema is not None:
            self.ema.update()
        return losses

    def _mixed(self, images: torch.Tensor, target: torch.Tensor):
        """The batch mixed (mixup/CutMix, once for every network: each network's own input size is
        made from the mixed images) with its soft targets; as it is without mixing."""
        return (images, target) if self.mixing is None else self.mixing(images, target)

    def _synchronous(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        images, target = self._mixed(images, target)
        with self._autocast():
            losses = self.model(images, target, cut_at_features=self.batched_backward)
        scale = self.loss_scale.scale if self.loss_scale is not None else None
        self._apply(gradient_sets(self.model, losses, scale), list(self.optimizers.values()))
        return losses

    def _apply(self, sets: list[tuple[list, list]], optimizers: list[torch.optim.Optimizer]) -> None:
        """Each gradient set to its optimizer: averaged across processes (all sets in one collective),
        unscaled under fp16 (an overflow skips that optimizer's step on the device), then the steps.
        All sets exist before the first step; an extractor parameter is in two sets, so each
        optimizer gets its own gradients right before it steps."""
        if self.average_gradients is not None:
            self.average_gradients([g for _, grads in sets for g in grads])
        if self.loss_scale is not None:
            found_infs = self.loss_scale.unscale_([grads for _, grads in sets])
            for optimizer, found_inf in zip(optimizers, found_infs):
                optimizer.grad_scale, optimizer.found_inf = None, found_inf
        for (params, grads), optimizer in zip(sets, optimizers):
            _step_with(optimizer, params, grads)
        if self.loss_scale is not None:
            self.loss_scale.update(found_infs)

    def _alternate(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """One iteration of DML as its authors' code runs it (Zhang et al., 2018, ``train_models.py``):
        the K batches in turn, network k updating on the k-th. Returns every network's CE and KL,
        means over the K batches, for logging."""
        k = self.batches_per_call
        turns = [self._one_network_update(x, y, n) for n, (x, y) in enumerate(zip(images.chunk(k), target.chunk(k)))]
        return {key: torch.stack([t[key] for t in turns]).mean(0) for key in turns[0]}

    def _one_network_update(self, images: torch.Tensor, target: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
        """Network k's update on its own batch: a forward of every network on it at their current
        weights, then an SGD step of network k on CE + T² · mean_{j≠k} KL(p_j || p_k) (the peers
        detached). As in that code, the peers normalise with the batch's statistics (training mode)
        without changing their running statistics; network k's forward updates its own."""
        model = self.model
        images, target = self._mixed(images, target)
        with self._autocast():
            logits = []
            for j, network in enumerate(model.networks):
                peer = j != k
                with torch.set_grad_enabled(not peer), batch_statistics_only(network) if peer else contextlib.nullcontext():
                    logits.append(network(model.network_input(j, images))[1])
            loss, ce, kl = model.logit_losses(torch.stack(logits), target)
        params = list(model.networks[k].parameters())
        scale = self.loss_scale.scale if self.loss_scale is not None else None
        grads = torch.autograd.grad(loss[k] if scale is None else loss[k] * scale, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        # only network k has gradients: SGD leaves the others alone
        self._apply([(params, grads)], [self.optimizers["logit"]])
        return {"ce": ce, "kl": kl, "logit": loss.detach().sum()}

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


def parameter_kinds(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> "norm" (any parameter of a normalisation layer: torch's batch, layer, group and
    instance norms and any module whose class name has "Norm", as timm's RmsNorm or LayerNorm2d),
    "bias" (a bias of any other layer) or "weight" (the rest): what --norm-weight-decay and
    --bias-weight-decay apply to, as torchvision's reference scripts split them."""
    torch_norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
    kinds = {}
    for module in model.modules():
        is_norm = isinstance(module, torch_norms) or "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            kinds.setdefault(id(p), "norm" if is_norm else "bias" if name == "bias" else "weight")
    return kinds


def decay_groups(params: list[nn.Parameter], kinds: dict[int, str], weight_decay: float,
                 norm_weight_decay: float | None = None, bias_weight_decay: float | None = None) -> list[dict]:
    """The optimizer's parameter groups: one per weight decay, in the order of ``params`` within each
    (None: a kind decays as the rest). Without the two options, one group: the paper's decay on all."""
    decay = {"weight": weight_decay, "norm": weight_decay if norm_weight_decay is None else norm_weight_decay,
             "bias": weight_decay if bias_weight_decay is None else bias_weight_decay}
    by_decay: dict[float, list] = {}
    for p in params:
        by_decay.setdefault(decay[kinds.get(id(p), "weight")], []).append(p)
    return [{"params": group, "weight_decay": value} for value, group in by_decay.items()]


def _step_with(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    """One optimizer step with these gradients: set, step, clear. A parameter in two gradient sets
    (an extractor's: logit and L_G) carries only the set of the optimizer that steps now."""
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    for p in params:
        p.grad = None
