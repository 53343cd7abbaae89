"""Fused loss ops of online adversarial feature-map distillation.

``import afd_fast.ops as ops`` gives:

* :func:`mutual_distillation_loss` — cross-entropy plus tempered-softmax KL towards detached peers,
  for K networks at once, in one kernel that also writes the gradient (backward only rescales).
* :func:`lsgan_loss` — the discriminators' LSGAN losses with the sigmoid fused in.
* :func:`peer_weights` — the topology matrix W (``pair``, ``cyclic``, ``dml``, ``ensemble``).

The ops are ``torch.ops.afd_fast.*`` operators with autograd, fake (meta) kernels for
``torch.compile(fullgraph=True)``, and no host synchronisation on CUDA, so they can be captured in
CUDA graphs. Without the compiled extension they fall back, with one warning, to the plain-PyTorch
reference in :mod:`afd_fast.reference`.
"""
from __future__ import annotations

import warnings

import torch

from afd_fast import reference

try:
    from afd_fast import _C  # noqa: F401  (registers torch.ops.afd_fast.*)

    HAS_EXTENSION = True
except ImportError as _error:  # pragma: no cover - exercised only without a build
    HAS_EXTENSION = False
    warnings.warn(
        f"afd_fast._C is not built ({_error}); afd_fast.ops uses the slower plain-PyTorch reference. "
        "Build it with `pip install --no-build-isolation -e .`.",
        stacklevel=2,
    )

TOPOLOGIES = ("pair", "cyclic", "dml", "ensemble")


def peer_weights(topology: str, num_networks: int, device=None) -> torch.Tensor:
    """Peer-weight matrix W ``[K, M]`` of a topology (docs/design.md §1).

    ``pair`` (K = 2): each network learns from the other. ``cyclic``: network k learns from k-1
    (1→2, …, K→1). ``dml``: 1/(K-1) from every other network. ``ensemble``: one teacher-only row
    (the mean logits of the K networks) with weight 1, so M = K + 1.
    """
    k = int(num_networks)
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; choose one of {', '.join(TOPOLOGIES)}")
    if k < 2:
        raise ValueError(f"topology {topology!r} needs at least 2 networks, got {k}")
    if topology == "pair" and k != 2:
        raise ValueError(f"topology 'pair' is for exactly 2 networks, got {k}; use 'cyclic' or 'dml'")
    if topology == "ensemble":
        w = torch.zeros(k, k + 1)
        w[:, k] = 1.0
    elif topology == "dml":
        w = (1.0 - torch.eye(k)) / (k - 1)
    else:  # pair is the cyclic scheme with two networks
        w = torch.zeros(k, k)
        w[torch.arange(k), (torch.arange(k) - 1) % k] = 1.0
    return w.to(device)


def mutual_distillation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    peer_weights: torch.Tensor,
    temperature: float = 3.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    label_smoothing: float = 0.0,
    target_b: torch.Tensor | None = None,
    lam: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-network logit loss of online distillation, fused.

    Args:
        logits: ``[M, B, C]`` float32/float64/bfloat16/float16. Rows ``0..K-1`` are the K student
            networks, rows ``K..M-1`` teacher-only rows (e.g. the ensemble's mean logits).
        target: ``[B]`` int64 class indices.
        peer_weights: ``[K, M]`` topology matrix W (see :func:`peer_weights`).
        target_b, lam: soft targets (mixup, CutMix): ``[B]`` class indices and the weight of
            ``target`` (``[B]`` or one value, float; tensors stay on the device, no host sync). Sample
            b's CE target is then ``lam[b]·onehot(target[b]) + (1 - lam[b])·onehot(target_b[b])``,
            with label smoothing on top: ``(1 - eps)·that + eps / C``. Both or neither.

    Returns:
        ``(loss, ce, kl)``, each ``[K]`` (float32; float64 for float64 logits), with
        ``ce[k] = ce_weight * CE(y, softmax(z_k))``,
        ``kl[k] = kd_weight * T² * Σ_j W[k, j] * KL(softmax(z_j/T) || softmax(z_k/T))`` (batch means)
        and ``loss = ce + kl``. Only ``loss`` is differentiable; ``ce`` and ``kl`` are for logging.
        Teachers are detached: row k gets gradient only through ``loss[k]``, rows ≥ K none.

    Non-finite logits (NaN, ±inf) give NaN losses for the networks they reach. Target indices
    outside ``[0, C)`` raise on the CPU; on CUDA (where checking would cost a host sync) they give
    NaN losses.
    """
    if (target_b is None) != (lam is None):
        raise ValueError("soft targets need both target_b and lam (or neither)")
    # one λ for the batch (mixup, CutMix) becomes one per sample: the kernels read lam[b]. A number is
    # filled on the device (no host-to-device copy: capturable), a 0-d tensor expanded.
    if lam is not None and not isinstance(lam, torch.Tensor):
        lam = torch.full(target.shape, float(lam), device=logits.device)
    elif lam is not None and lam.dim() == 0:
        lam = lam.expand(target.shape)
    if not HAS_EXTENSION:
        return reference.mutual_distillation_loss(
            logits, target, peer_weights, temperature, ce_weight, kd_weight, label_smoothing, target_b, lam
        )
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, ce, kl, _ = torch.ops.afd_fast.mutual_distillation_forward(
        logits, target, peer_weights, float(temperature), float(ce_weight), float(kd_weight),
        float(label_smoothing), compute_grad, target_b, lam,
    )
    return loss, ce, kl


def lsgan_loss(
    d_own: torch.Tensor, d_peer: torch.Tensor, real_label: float = 1.0, fake_label: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSGAN losses of K discriminators, sigmoid fused in.

    Args:
        d_own: ``[K, B]`` scores before the sigmoid of D_k on network k's own feature map (fake).
        d_peer: ``[K, B]`` scores of D_k on the map of the peer network k learns from (real).

    Returns:
        ``(g_loss, d_loss)``, each ``[K]`` float32 (float64 for float64 scores):
        ``g_loss[k] = mean_b (real - σ(own))²`` and
        ``d_loss[k] = mean_b [(real - σ(peer))² + (σ(own) - fake)²]``. Both are differentiable
        w.r.t. both inputs; take each gradient set w.r.t. its own parameters (docs/design.md §2).
    """
    if not HAS_EXTENSION:
        return reference.lsgan_loss(d_own, d_peer, real_label, fake_label)
    return torch.ops.afd_fast.lsgan_forward(d_own, d_peer, float(real_label), float(fake_label))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_fake_and_autograd(namespace: str = "afd_fast") -> None:
    """Fake kernels and autograd for a library of operators with afd_fast's four schemas, under
    ``torch.ops.<namespace>``; called once at import for ``afd_fast``.

    The namespace is the one documented hook of this module: the CPU emulation of the CUDA kernels
    (tests/cuda_emu, docs/design.md §5) registers them as ``afd_fast_emu``
    with the same schemas and calls this for that library, so that the emulated kernels run
    through the very autograd formulas and fake kernels users get, not a copy of them."""
    lib = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::mutual_distillation_forward")
    def _(logits, target, peer_weights, temperature, ce_weight, kd_weight, label_smoothing, compute_grad,
          target_b=None, lam=None):
        torch._check(logits.dim() == 3, lambda: f"logits must be [M, B, C], got {tuple(logits.shape)}")
        torch._check(peer_weights.dim() == 2, lambda: "peer_weights must be [K, M]")
        k = peer_weights.shape[0]
        stats = logits.new_empty((k,), dtype=_acc_dtype(logits.dtype))
        grad = logits.new_empty((k, logits.shape[1], logits.shape[2]) if compute_grad else (0,))
        return stats, torch.empty_like(stats), torch.empty_like(stats), grad

    @torch.library.register_fake(f"{namespace}::mutual_distillation_backward")
    def _(grad_loss, saved_grad, num_rows):
        return saved_grad.new_empty((num_rows, saved_grad.shape[1], saved_grad.shape[2]))

    @torch.library.register_fake(f"{namespace}::lsgan_forward")
    def _(d_own, d_peer, real_label, fake_label):
        torch._check(d_own.dim() == 2, lambda: f"d_own must be [K, B], got {tuple(d_own.shape)}")
        out = d_own.new_empty((d_own.shape[0],), dtype=_acc_dtype(d_own.dtype))
        return out, torch.empty_like(out)

    @torch.library.register_fake(f"{namespace}::lsgan_backward")
    def _(grad_g, grad_d, d_own, d_peer, real_label, fake_label):
        return torch.empty_like(d_own), torch.empty_like(d_peer)

    def _md_setup_context(ctx, inputs, output):
        logits, compute_grad = inputs[0], inputs[7]
        _, ce, kl, grad = output
        ctx.mark_non_differentiable(ce, kl, grad)
        ctx.num_rows = logits.shape[0]
        ctx.compute_grad = compute_grad
        ctx.save_for_backward(grad)

    def _md_backward(ctx, grad_loss, _grad_ce, _grad_kl, _grad_grad):
        if not ctx.compute_grad:
            raise RuntimeError(
                "mutual_distillation_forward was called with compute_grad=False but a gradient was "
                "requested; call afd_fast.ops.mutual_distillation_loss with grad enabled instead"
            )
        (saved,) = ctx.saved_tensors
        grad_logits = lib.mutual_distillation_backward(grad_loss, saved, ctx.num_rows)
        return grad_logits, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd(
        f"{namespace}::mutual_distillation_forward", _md_backward, setup_context=_md_setup_context
    )

    def _lsgan_setup_context(ctx, inputs, output):
        d_own, d_peer, real_label, fake_label = inputs
        ctx.save_for_backward(d_own, d_peer)
        ctx.labels = (real_label, fake_label)

    def _lsgan_backward(ctx, grad_g, grad_d):
        d_own, d_peer = ctx.saved_tensors
        grad_own, grad_peer = lib.lsgan_backward(grad_g, grad_d, d_own, d_peer, *ctx.labels)
        return grad_own, grad_peer, None, None

    torch.library.register_autograd(f"{namespace}::lsgan_forward", _lsgan_backward, setup_context=_lsgan_setup_context)


if HAS_EXTENSION:
    register_fake_and_autograd()
