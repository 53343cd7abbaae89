"""Mixup and CutMix on the training device, inside the captured step (``--mixup``, ``--cutmix``,
``--mix-prob``, ``--mix-switch-prob``).

One λ per batch, as timm's ``Mixup`` (mode "batch") and torchvision's reference transforms draw it:

* with probability ``prob`` the batch is mixed at all (else λ = 1: the images and targets as they are);
* when both are on, CutMix with probability ``switch_prob``, else mixup;
* mixup: λ ~ Beta(α, α), ``x = λ·x + (1 − λ)·x[perm]``;
* CutMix: λ ~ Beta(α, α), a box of ``sqrt(1 − λ)`` of each side around a uniform centre (torchvision's
  v2 ``CutMix``: half-sides ``floor(0.5·sqrt(1 − λ)·H)``, clipped to the image), the box's pixels taken
  from ``x[perm]``, and λ corrected to ``1 − box area / image area``;
* the partner of sample b is ``perm[b]``, a random permutation of the batch (the mixup paper's
  ``randperm``; timm flips the batch and torchvision rolls it by one).

The targets become ``SoftTarget(target, target[perm], λ)``: sample b's CE target is
``λ·onehot(target[b]) + (1 − λ)·onehot(target[perm[b]])``, which the fused loss takes as it is.

Everything is drawn on the images' device (λ from two gammas, the permutation as the argsort of
uniforms, the box from comparisons with ``arange``) and chosen with ``torch.where``: every call issues
the same ops on tensors of the same shapes, with no host read, so a CUDA graph replays it (CUDA's
generators are graph-safe: each replay advances their philox offset). The draws come from the
device's default generator, whose state the checkpoints keep, so a resumed run mixes the same; a
``generator`` may be passed instead (the sample grid draws from its own, leaving the run's alone).
Under torchrun every process starts from the same seed, so they draw the same λ and choices: one λ
per global batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


class SoftTarget(NamedTuple):
    """The targets of a mixed batch: ``lam`` (0-d float32 or ``[B]``) is the weight of ``target``,
    ``1 − lam`` that of ``target_b`` (the classes of the images mixed in)."""

    target: torch.Tensor
    target_b: torch.Tensor
    lam: torch.Tensor


def loss_targets(target: torch.Tensor | SoftTarget) -> tuple[torch.Tensor, dict]:
    """(hard target, the soft-target keyword arguments of ``mutual_distillation_loss``)."""
    if isinstance(target, SoftTarget):
        return target.target, {"target_b": target.target_b, "lam": target.lam}
    return target, {}


def cross_entropy(logits: torch.Tensor, target: torch.Tensor | SoftTarget) -> torch.Tensor:
    """Mean CE against a hard or soft target: λ·CE(a) + (1 − λ)·CE(b) is CE with the mixed one-hot
    target, since CE is linear in the target distribution."""
    if not isinstance(target, SoftTarget):
        return F.cross_entropy(logits, target)
    a = F.cross_entropy(logits, target.target, reduction="none")
    b = F.cross_entropy(logits, target.target_b, reduction="none")
    return (target.lam * a + (1 - target.lam) * b).mean()


@dataclass(frozen=True)
class Mixing:
    mixup: float = 0.0  # Beta's α of mixup; 0: off
    cutmix: float = 0.0  # of CutMix; 0: off
    prob: float = 1.0  # the probability that a batch is mixed
    switch_prob: float = 0.5  # both on: the probability of CutMix instead of mixup

    def __post_init__(self):
        for name in ("mixup", "cutmix"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} is Beta's alpha: it must not be negative, got {getattr(self, name)}")
        for name in ("prob", "switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability, in [0, 1], got {getattr(self, name)}")
        if not (self.mixup or self.cutmix):
            raise ValueError("Mixing needs mixup or cutmix (off: no Mixing at all)")

    @classmethod
    def of(cls, mixup: float, cutmix: float, prob: float = 1.0, switch_prob: float = 0.5) -> Mixing | None:
        """The run's mixing, or None when both are off."""
        return cls(mixup, cutmix, prob, switch_prob) if mixup or cutmix else None

    def describe(self) -> str:
        parts = [f"mixup {self.mixup:g}"] * bool(self.mixup) + [f"CutMix {self.cutmix:g}"] * bool(self.cutmix)
        extra = [f"CutMix share {self.switch_prob:g}"] * bool(self.mixup and self.cutmix)
        extra += [f"of {self.prob:g} of the batches"] * (self.prob < 1)
        return " + ".join(parts) + "".join(f", {e}" for e in extra)

    def __call__(self, images: torch.Tensor, target: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, SoftTarget]:
        """The mixed batch and its soft targets (λ = 1 when the batch is left unmixed)."""
        device, (b, h, w) = images.device, (images.shape[0], *images.shape[-2:])
        perm = torch.rand(b, device=device, generator=generator).argsort()
        # one uniform each: mix at all, CutMix or mixup, the box's centre row and column
        mix, switch, centre_y, centre_x = torch.rand(4, device=device, generator=generator)
        if self.mixup:
            lam_mixup = _beta(self.mixup, device, generator)
        if self.cutmix:
            lam_cut, inside = _box(_beta(self.cutmix, device, generator), centre_y, centre_x, h, w)
            weight_cut = (~inside).float()  # 1: the own pixel, 0: the partner's
        if self.mixup and self.cutmix:
            use_cut = switch < self.switch_prob
            lam, weight = torch.where(use_cut, lam_cut, lam_mixup), torch.where(use_cut, weight_cut, lam_mixup)
        elif self.cutmix:
            lam, weight = lam_cut, weight_cut
        else:
            lam, weight = lam_mixup, lam_mixup
        mixed = mix < self.prob
        lam, weight = torch.where(mixed, lam, 1.0), torch.where(mixed, weight, 1.0).to(images.dtype)
        # weight·x + (1 − weight)·x[perm] in one pass (lerp: half the time of the four-op blend on a CPU,
        # exact copies where CutMix's weight is 0 or 1); x[perm] keeps the images' memory format, and so
        # does the result (index_select would not)
        out = torch.lerp(images[perm], images, weight)
        return out, SoftTarget(target, target.index_select(0, perm), lam)


def _beta(alpha: float, device, generator) -> torch.Tensor:
    """One draw of Beta(α, α), 0-d float32: X / (X + Y) of two Gamma(α) draws (torch clamps each to
    the smallest positive float, so the ratio is defined)."""
    x, y = torch._standard_gamma(torch.full((2,), float(alpha), device=device), generator=generator)
    return x / (x + y)


def _box(lam: torch.Tensor, centre_y: torch.Tensor, centre_x: torch.Tensor, h: int, w: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ of the box, the box as an [h, w] mask): half-sides floor(0.5·sqrt(1 − λ)·side) around the
    centre (uniforms in [0, 1) scaled to a pixel), clipped to the image."""
    cut = 0.5 * torch.sqrt(1 - lam)
    bounds = []
    for u, side in ((centre_y, h), (centre_x, w)):
        centre = torch.floor(u * side).clamp(max=side - 1)  # (u·side may round up to side in float32)
        half = torch.floor(cut * side)
        bounds.append(((centre - half).clamp(min=0), (centre + half).clamp(max=side)))
    (y1, y2), (x1, x2) = bounds
    rows = torch.arange(h, device=lam.device)
    cols = torch.arange(w, device=lam.device)
    inside = ((rows >= y1) & (rows < y2))[:, None] & ((cols >= x1) & (cols < x2))[None, :]
    return 1 - (y2 - y1) * (x2 - x1) / (h * w), inside
