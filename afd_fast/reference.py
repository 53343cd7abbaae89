"""The fused losses in plain PyTorch: the executable specification.

Every fused op in :mod:`afd_fast.ops` is tested against these functions, and the benchmarks use
them as the "what public code does" baseline. Keep them obvious rather than fast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mutual_distillation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    peer_weights: torch.Tensor,
    temperature: float = 3.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    label_smoothing: float = 0.0,
    target_b: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-network logit loss of online distillation (docs/design.md §1).

    ``logits`` is ``[M, B, C]``: rows ``0..K-1`` are the students, rows ``K..M-1`` teacher-only.
    ``peer_weights`` is ``[K, M]``. Returns ``(loss, ce, kl)``, each ``[K]`` float32, with
    ``ce[k] = ce_weight * CE(y, z_k)``, ``kl[k] = kd_weight * T^2 * sum_j W[k, j] KL(p_j^T || p_k^T)``
    (both batch means) and ``loss = ce + kl``. Teachers are detached.

    Soft targets (mixup/CutMix): with ``target_b`` and ``lam`` (``[B]`` or a scalar), sample b's
    target distribution is ``lam[b] * onehot(target[b]) + (1 - lam[b]) * onehot(target_b[b])``,
    label smoothing on top, as torchvision's reference mixes one-hot targets before its smoothed CE.
    """
    num_students = peer_weights.shape[0]
    t = float(temperature)
    z = logits.double() if logits.dtype == torch.float64 else logits.float()
    if (target_b is None) != (lam is None):
        raise ValueError("soft targets need both target_b and lam (or neither)")
    if target_b is not None:
        classes = logits.shape[-1]
        weight = lam.to(z.dtype).expand(target.shape)[:, None]
        target = weight * F.one_hot(target.long(), classes).to(z.dtype) + (1 - weight) * F.one_hot(
            target_b.long(), classes).to(z.dtype)
    log_p_t = F.log_softmax(z / t, dim=-1)
    teacher = log_p_t.detach()
    ce, kl = [], []
    for k in range(num_students):
        ce.append(ce_weight * F.cross_entropy(z[k], target, label_smoothing=label_smoothing))
        kl_k = z.new_zeros(())
        for j in range(logits.shape[0]):
            w = peer_weights[k, j]
            if w != 0:
                kl_k = kl_k + w * F.kl_div(log_p_t[k], teacher[j], reduction="batchmean", log_target=True)
        kl.append(kd_weight * t * t * kl_k)
    ce_t, kl_t = torch.stack(ce), torch.stack(kl)
    return ce_t + kl_t, ce_t, kl_t


def lsgan_loss(
    d_own: torch.Tensor, d_peer: torch.Tensor, real_label: float = 1.0, fake_label: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSGAN losses of the discriminators on scores before the sigmoid, ``[K, B]`` each.

    ``d_own[k]`` is D_k on network k's own feature map (fake), ``d_peer[k]`` is D_k on the map of
    the peer k learns from (real). Returns ``g_loss[k] = mean (real - s(own))^2`` (network k
    fools its own D) and ``d_loss[k] = mean (real - s(peer))^2 + (s(own) - fake)^2``, float32.
    """
    acc = torch.float64 if d_own.dtype == torch.float64 else torch.float32
    own = torch.sigmoid(d_own.to(acc))
    peer = torch.sigmoid(d_peer.to(acc))
    g_loss = ((real_label - own) ** 2).mean(dim=1)
    d_loss = ((real_label - peer) ** 2 + (own - fake_label) ** 2).mean(dim=1)
    return g_loss, d_loss
