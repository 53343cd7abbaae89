"""Weight EMA: an exponential moving average of every network of a run (``--model-ema DECAY``), the
weights that timm's and torchvision's reference scripts evaluate and export beside the raw ones.

:class:`WeightEMA` keeps a copy of the :class:`afd_fast.model.AFDModel` (so that the EMA networks
are evaluated exactly as the raw ones: per-network input sizes, ONE's gated ensemble) and updates
the networks' (and ONE's gate's) parameters and floating-point buffers after each training step:

    d_t   = min(DECAY, (1 + t) / (10 + t))     t: the EMA updates done before this one (warm-up)
    ema  <- d_t * ema + (1 - d_t) * weights     every --model-ema-every N steps

The warm-up of the decay is TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` rule (timm's
``ModelEmaV3`` offers a similar one): the first updates follow the weights closely, so the average
is not dominated by the random initialisation for the first ~1/(1 - DECAY) steps. Batch-norm running
means and variances are averaged by the same rule (as timm's ``ModelEmaV2`` and torchvision's
reference ``ExponentialMovingAverage(use_buffers=True)``); ``num_batches_tracked`` is copied each
step (bookkeeping only: an EMA network never trains, and recalibration resets it). With
``--bn-recalibrate`` the EMA's statistics are recomputed before it is evaluated or exported.

Everything happens on the device, from tensors that live as long as the run (the copy, two step
counters; the decay is a Python number, the same at every step): the update issues no host sync
and allocates no persistent state, so the
training step's CUDA graph replays it; the "every N" choice is a weight of 0 on the other steps
(the cost of the update, one pass over the weights, is paid every step: small beside the step).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float, every: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the EMA decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"the EMA is updated every N >= 1 steps, got {every}")
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.model.eval()
        self.decay, self.every = decay, every
        device = next(model.parameters()).device
        self.steps = torch.zeros((), dtype=torch.int64, device=device)  # training steps seen
        self.updates = torch.zeros((), dtype=torch.int64, device=device)  # EMA updates done (the warm-up's t)
        source, target = _averaged(model), _averaged(self.model)
        assert source.keys() == target.keys()
        self._floats = ([source[n] for n in source if source[n].is_floating_point()],
                        [target[n] for n in target if target[n].is_floating_point()])
        self._counts = ([source[n] for n in source if not source[n].is_floating_point()],
                        [target[n] for n in target if not target[n].is_floating_point()])

    @torch.no_grad()
    def update(self) -> None:
        """One training step done: the EMA moves towards the weights on every ``every``-th step."""
        due = torch.remainder(self.steps, self.every) == 0
        t = self.updates.double()  # the rule in float64, then in the averages' dtype
        d = torch.where(due, ((1 + t) / (10 + t)).clamp(max=self.decay), 1.0)
        weights, averages = self._floats
        if weights:
            d = d.to(averages[0].dtype)
            torch._foreach_mul_(averages, d)
            torch._foreach_add_(averages, torch._foreach_mul(weights, 1 - d))
        counts, copies = self._counts
        if counts:
            torch._foreach_copy_(copies, counts)
        self.updates += due.to(self.updates.dtype)
        self.steps += 1

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the EMA copy's state_dict (the keys of the model's) and the counters."""
        return {"model": self.model.state_dict(), "steps": self.steps.clone(), "updates": self.updates.clone()}

    def load_state_dict(self, state: dict) -> None:
        """In place (a CUDA graph may hold these tensors); the decay and cadence stay as built."""
        self.model.load_state_dict(state["model"])
        self.steps.copy_(state["steps"])
        self.updates.copy_(state["updates"])

    def persistent_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the update reads or writes that outlives a step (capture-safety checks)."""
        out = {f"ema:{n}": t for n, t in self.model.state_dict(keep_vars=True).items()}
        return {**out, "ema:steps": self.steps, "ema:updates": self.updates}


def _averaged(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the EMA follows, by name: the networks' and ONE's gate's parameters and buffers
    (not the transfer layers' nor the discriminators': they are not evaluated), each once (ONE's
    branches share their low layers)."""
    parts = {"networks": model.networks, **({"gate": model.gate} if getattr(model, "gate", None) is not None else {})}
    out, seen = {}, set()
    for prefix, part in parts.items():
        for name, t in [*part.named_parameters(), *part.named_buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                out[f"{prefix}.{name}"] = t.detach()
    return out
