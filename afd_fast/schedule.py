"""Learning-rate schedules as pure functions of the global step, written into the optimizers.

The rate of step ``s`` (0-based, one call of the training step per batch) is

    base * warmup(s) * decay(s)

* ``warmup``: linear over the first ``round(warmup_epochs * steps_per_epoch)`` steps W (at least one
  when warmup_epochs > 0), per step: ``(s + 1) / W``, so the first step already trains and step W-1
  reaches the base rate; 1 afterwards.
* ``decay`` for ``step``: ``lr_decay ** (number of milestones <= the epoch of s)``: a milestone m
  lowers the rate from epoch m on (0-based; epochs 1..m train before it), the MultiStepLR rule.
* ``decay`` for ``cosine``: 1 during the warm-up, then ``(1 + cos(pi * p)) / 2`` per step with p
  going from 0 (end of the warm-up) to 1 (end of the last epoch): the last step trains at a small
  positive rate.

Nothing is stored: a resumed run computes the rate of its step from its configuration. Fused
optimizers hold their rates in device tensors that a captured CUDA graph reads: those tensors are
filled in place (the same tensor, never replaced by a Python number); plain optimizers get a float.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    base: float
    kind: str = "step"  # "step" or "cosine"
    milestones: tuple[int, ...] = ()
    decay: float = 0.1
    warmup_epochs: float = 0.0
    epochs: int = 1

    def warmup_steps(self, steps_per_epoch: int) -> int:
        return max(round(self.warmup_epochs * steps_per_epoch), 1) if self.warmup_epochs > 0 else 0

    def rate(self, step: int, steps_per_epoch: int) -> float:
        warm = self.warmup_steps(steps_per_epoch)
        factor = (step + 1) / warm if step < warm else 1.0
        if self.kind == "cosine":
            total = self.epochs * steps_per_epoch
            if step >= warm:
                progress = min((step - warm) / max(total - warm, 1), 1.0)
                factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            epoch = step // steps_per_epoch
            factor *= self.decay ** sum(1 for m in self.milestones if m <= epoch)
        return self.base * factor

    def describe(self) -> str:
        shape = (f"cosine to 0 over {self.epochs} epochs" if self.kind == "cosine" else
                 f"x{self.decay:g} at epochs {', '.join(map(str, self.milestones))}" if self.milestones else
                 "constant")
        warm = f", linear warm-up over {self.warmup_epochs:g} epochs" if self.warmup_epochs else ""
        return f"{self.base:g}, {shape}{warm}"


class LearningRates:
    """Each optimizer's :class:`Schedule`; :meth:`apply` sets the rates of a step (before it runs)."""

    def __init__(self, optimizers: dict, schedules: dict[str, Schedule], steps_per_epoch: int):
        self.optimizers, self.schedules, self.steps_per_epoch = optimizers, schedules, steps_per_epoch
        self.current: dict[str, tuple] = {}

    def forget(self) -> None:
        """After loading an optimizer state (it brings its own rates): the next apply writes every rate."""
        self.current = {}

    def rates(self, step: int) -> dict[str, float]:
        return {name: self.schedules[name].rate(step, self.steps_per_epoch) for name in self.optimizers}

    def apply(self, step: int) -> dict[str, float]:
        rates = self.rates(step)
        for name, value in rates.items():
            groups = self.optimizers[name].param_groups
            # a step schedule changes at epoch boundaries: no work on the other steps (unless a loaded
            # optimizer state replaced the rates)
            if self.current.get(name) == (value, [id(g["lr"]) for g in groups]):
                continue
            for group in groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(value)  # in place: a captured graph reads this storage
                else:
                    group["lr"] = value
            self.current[name] = (value, [id(g["lr"]) for g in groups])
        return rates
