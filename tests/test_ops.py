"""afd_fast.ops on the CPU against the plain-PyTorch reference (afd_fast.reference)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import afd_fast.ops as ops
from afd_fast import reference

import _native
from _cases import SHAPES, make_case


def _grads(fn, logits, target, weights, grad_out, **kw):
    x = logits.detach().clone().requires_grad_()
    loss, ce, kl = fn(x, target, weights, **kw)
    (g,) = torch.autograd.grad((loss * grad_out).sum(), x)
    return loss.detach(), ce, kl, g


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-B{}-C{}-{}".format(*s))
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_mutual_distillation_matches_reference_float64(shape, label_smoothing):
    gen = torch.Generator().manual_seed(hash((shape, label_smoothing)) % 2**31)
    logits, target, weights = make_case(*shape, generator=gen)
    grad_out = torch.rand(shape[1], dtype=torch.float64, generator=gen) + 0.5
    kw = dict(temperature=float(torch.empty(1).uniform_(1.0, 5.0, generator=gen)),
              ce_weight=0.7, kd_weight=1.3, label_smoothing=label_smoothing)
    got = _grads(ops.mutual_distillation_loss, logits, target, weights, grad_out, **kw)
    want = _grads(reference.mutual_distillation_loss, logits, target, weights, grad_out, **kw)
    for g, w, name in zip(got, want, ("loss", "ce", "kl", "grad")):
        assert g.dtype == torch.float64, name
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(got[0], got[1] + got[2])


def test_largest_class_count():
    logits, target, weights = make_case(2, 2, 1, 262144, "pair", dtype=torch.float32)
    got = _grads(ops.mutual_distillation_loss, logits, target, weights, torch.ones(2))
    want = _grads(reference.mutual_distillation_loss, logits, target, weights, torch.ones(2))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


# Stated tolerances: losses are accumulated in float32 from the same rounded inputs, so they match a
# float32 reference on those inputs closely; gradients are rounded once to the logits dtype.
TOLERANCES = {
    torch.float32: dict(loss=dict(rtol=1e-5, atol=1e-5), grad=dict(rtol=1e-4, atol=1e-7)),
    torch.bfloat16: dict(loss=dict(rtol=1e-5, atol=1e-5), grad=dict(rtol=8e-3, atol=1e-6)),
    torch.float16: dict(loss=dict(rtol=1e-5, atol=1e-5), grad=dict(rtol=1e-3, atol=1e-7)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 64, 1000, "pair"), (3, 2, 32, 100, "ensemble"), (3, 3, 16, 1001, "cyclic")],
                         ids=lambda s: "M{}-K{}-B{}-C{}-{}".format(*s))
def test_mutual_distillation_low_precision(dtype, shape):
    logits, target, weights = make_case(*shape, dtype=dtype)
    grad_out = torch.rand(shape[1]) + 0.5
    loss, ce, kl, grad = _grads(ops.mutual_distillation_loss, logits, target, weights, grad_out, label_smoothing=0.1)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref = _grads(reference.mutual_distillation_loss, logits.float(), target, weights, grad_out, label_smoothing=0.1)
    tol = TOLERANCES[dtype]
    for got, want in zip((loss, ce, kl), ref[:3]):
        torch.testing.assert_close(got, want, **tol["loss"])
    torch.testing.assert_close(grad.float(), ref[3], **tol["grad"])


def test_teachers_are_detached():
    """Row k gets gradient only from loss[k]; teacher-only rows get none."""
    logits, target, weights = make_case(3, 2, 4, 11, "ensemble")
    x = logits.clone().requires_grad_()
    loss, _, _ = ops.mutual_distillation_loss(x, target, weights)
    for k in range(2):
        (g,) = torch.autograd.grad(loss[k], x, retain_graph=True)
        assert g[k].abs().sum() > 0
        assert torch.count_nonzero(torch.cat([g[:k], g[k + 1:]])) == 0


def test_self_weight_is_a_constant_teacher():
    """W[k, k] != 0 distils towards a detached copy of itself: zero KL and zero KD gradient."""
    logits, target, _ = make_case(2, 2, 6, 9, "pair")
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = _grads(ops.mutual_distillation_loss, logits, target, w, torch.ones(2), ce_weight=0.0)
    assert torch.all(got[2].abs() < 1e-12) and torch.all(got[3].abs() < 1e-12)


def test_no_grad_call_skips_gradient():
    logits, target, weights = make_case(2, 2, 4, 10, "pair", dtype=torch.float32)
    out = torch.ops.afd_fast.mutual_distillation_forward(logits, target, weights, 3.0, 1.0, 1.0, 0.0, False)
    assert out[3].numel() == 0
    with torch.no_grad():
        loss, _, _ = ops.mutual_distillation_loss(logits.requires_grad_(), target, weights)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, out[0])


def test_non_contiguous_inputs():
    logits, target, weights = make_case(2, 2, 6, 50, "pair")
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)  # same values, [B, M, C] memory
    assert not strided.is_contiguous()
    w_t = weights.t().contiguous().t()
    got = _grads(ops.mutual_distillation_loss, strided, target[::1], w_t, torch.ones(2))
    want = _grads(reference.mutual_distillation_loss, logits, target, weights, torch.ones(2))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_int32_target_and_weights_dtype():
    logits, target, weights = make_case(2, 2, 6, 50, "pair", dtype=torch.float32)
    a = ops.mutual_distillation_loss(logits, target.int(), weights.double())
    b = ops.mutual_distillation_loss(logits, target, weights)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_results_do_not_depend_on_thread_count():
    logits, target, weights = make_case(3, 3, 97, 333, "cyclic", dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(_grads(ops.mutual_distillation_loss, logits, target, weights, torch.ones(3)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("topology,k", [("pair", 2), ("cyclic", 3), ("cyclic", 4), ("dml", 3), ("ensemble", 3)])
def test_peer_weights(topology, k):
    w = ops.peer_weights(topology, k)
    if topology in ("pair", "cyclic"):
        expected = torch.zeros(k, k)
        for i in range(k):
            expected[i, (i - 1) % k] = 1.0  # network i learns from i-1: 1->2, ..., K->1
    elif topology == "dml":
        expected = (torch.ones(k, k) - torch.eye(k)) / (k - 1)
    else:
        expected = torch.cat([torch.zeros(k, k), torch.ones(k, 1)], 1)
    assert torch.equal(w, expected)


def _student_loss(logits, target, weights, k):
    """loss[k] as a function of row k alone: the other rows are its (detached) teachers, so finite
    differences of loss[k] in row k are exactly what the analytic gradient describes."""
    def f(row):
        z = torch.cat([logits[:k], row[None], logits[k + 1:]])
        return ops.mutual_distillation_loss(z, target, weights, 2.0, 0.5, 1.5, 0.2)[0][k]
    return f


def test_gradcheck():
    logits, target, weights = make_case(3, 2, 3, 5, "ensemble")
    for k in range(2):
        row = logits[k].clone().requires_grad_()
        assert torch.autograd.gradcheck(_student_loss(logits, target, weights, k), (row,))
    own = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    peer = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.lsgan_loss(a, b, 0.9, 0.1), (own, peer))


def test_opcheck():
    logits, target, weights = make_case(3, 2, 4, 9, "ensemble", dtype=torch.float32)
    x = logits.clone().requires_grad_()
    # compute_grad=False is the no-grad call (ops.mutual_distillation_loss passes it only then).
    for z, compute_grad in ((x, True), (x.detach(), False)):
        torch.library.opcheck(torch.ops.afd_fast.mutual_distillation_forward,
                              (z, target, weights, 3.0, 1.0, 1.0, 0.1, compute_grad))
    saved = torch.randn(2, 4, 9)
    torch.library.opcheck(torch.ops.afd_fast.mutual_distillation_backward, (torch.rand(2), saved, 3))
    own = torch.randn(3, 7, requires_grad=True)
    peer = torch.randn(3, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.afd_fast.lsgan_forward, (own, peer, 1.0, 0.0))
    torch.library.opcheck(torch.ops.afd_fast.lsgan_backward,
                          (torch.rand(3), torch.rand(3), own.detach(), peer.detach(), 1.0, 0.0))


def test_torch_compile_fullgraph_matches_eager():
    logits, target, weights = make_case(2, 2, 8, 37, "pair", dtype=torch.float32)
    own, peer = torch.randn(2, 8), torch.randn(2, 8)

    def step(z, a, b):
        loss, _, _ = ops.mutual_distillation_loss(z, target, weights, label_smoothing=0.1)
        g_loss, d_loss = ops.lsgan_loss(a, b)
        return loss.sum() + g_loss.sum() + 0.5 * d_loss.sum()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        z, a, b = (t.clone().requires_grad_() for t in (logits, own, peer))
        out = fn(z, a, b)
        results.append((out.detach(), *torch.autograd.grad(out, (z, a, b))))
    for e, c in zip(*results):
        torch.testing.assert_close(c, e)


def test_lsgan_matches_reference_float64():
    gen = torch.Generator().manual_seed(3)
    for k, b in [(1, 1), (2, 7), (3, 256), (4, 1001)]:
        own = torch.randn(k, b, dtype=torch.float64, generator=gen) * 4
        peer = torch.randn(k, b, dtype=torch.float64, generator=gen) * 4
        real, fake = float(torch.rand(1, generator=gen)) * 0.2 + 0.8, float(torch.rand(1, generator=gen)) * 0.2
        gg, gd = torch.rand(k, dtype=torch.float64, generator=gen), torch.rand(k, dtype=torch.float64, generator=gen)
        res = []
        for fn in (ops.lsgan_loss, reference.lsgan_loss):
            a, p = own.clone().requires_grad_(), peer.clone().requires_grad_()
            g_loss, d_loss = fn(a, p, real, fake)
            res.append((g_loss, d_loss, *torch.autograd.grad((g_loss * gg).sum() + (d_loss * gd).sum(), (a, p))))
        for x, y in zip(*res):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_lsgan_gradient_directions():
    """g_loss pushes D(own) up (towards real); d_loss pushes D(own) down and D(peer) up; g_loss
    does not depend on the peer's score."""
    own = torch.zeros(2, 4, requires_grad=True)
    peer = torch.zeros(2, 4, requires_grad=True)
    g_loss, d_loss = ops.lsgan_loss(own, peer)
    g_own, g_peer = torch.autograd.grad(g_loss.sum(), (own, peer), retain_graph=True)
    assert torch.all(g_own < 0) and torch.all(g_peer == 0)
    d_own, d_peer = torch.autograd.grad(d_loss.sum(), (own, peer))
    assert torch.all(d_own > 0) and torch.all(d_peer < 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lsgan_low_precision(dtype):
    own, peer = torch.randn(3, 300).to(dtype), torch.randn(3, 300).to(dtype)
    res = []
    for fn, cast in ((ops.lsgan_loss, lambda t: t), (reference.lsgan_loss, lambda t: t.float())):
        a, p = cast(own).clone().requires_grad_(), cast(peer).clone().requires_grad_()
        g_loss, d_loss = fn(a, p)
        res.append((g_loss, d_loss, *torch.autograd.grad(g_loss.sum() + d_loss.sum(), (a, p))))
    assert res[0][0].dtype == torch.float32 and res[0][2].dtype == dtype
    for x, y in zip(res[0][:2], res[1][:2]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    rtol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    for x, y in zip(res[0][2:], res[1][2:]):
        torch.testing.assert_close(x.float(), y, rtol=rtol, atol=1e-6)


# inputs of the bad-input tests
L, Y, W = torch.randn(2, 4, 10), torch.randint(0, 10, (4,)), ops.peer_weights("pair", 2)
Y_SOFT = torch.randint(0, 10, (4,))


# --- soft targets (mixup, CutMix): lam * onehot(target) + (1 - lam) * onehot(target_b) ----------------

def soft_target(batch, classes, target, generator, dtype=torch.float64):
    """target_b and lam [B] with the edge cases mixed in: lam 0 and 1, target_b == target."""
    target_b = torch.randint(0, classes, (batch,), generator=generator)
    lam = torch.rand(batch, generator=generator, dtype=torch.float64)
    lam[::4], lam[1::5] = 1.0, 0.0
    target_b[2::3] = target[2::3]
    return target_b, lam.to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-B{}-C{}-{}".format(*s))
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_soft_targets_match_reference_float64(shape, label_smoothing):
    gen = torch.Generator().manual_seed(hash((shape, label_smoothing, "soft")) % 2**31)
    logits, target, weights = make_case(*shape, generator=gen)
    target_b, lam = soft_target(shape[2], shape[3], target, gen)
    grad_out = torch.rand(shape[1], dtype=torch.float64, generator=gen) + 0.5
    kw = dict(temperature=2.5, ce_weight=0.7, kd_weight=1.3, label_smoothing=label_smoothing,
              target_b=target_b, lam=lam)
    got = _grads(ops.mutual_distillation_loss, logits, target, weights, grad_out, **kw)
    want = _grads(reference.mutual_distillation_loss, logits, target, weights, grad_out, **kw)
    for g, w, name in zip(got, want, ("loss", "ce", "kl", "grad")):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_soft_target_cross_entropy_is_torchvisions():
    """The CE of a mixed target is what torchvision's reference trains with: its one-hot targets mixed,
    then CrossEntropyLoss(label_smoothing) on the probabilities; also λ·CE(a) + (1-λ)·CE(b)."""
    gen = torch.Generator().manual_seed(3)
    logits, target, weights = make_case(2, 2, 12, 10, "pair", generator=gen)
    target_b, lam = soft_target(12, 10, target, gen)
    _, ce, _ = ops.mutual_distillation_loss(logits, target, weights, label_smoothing=0.1, target_b=target_b, lam=lam)
    mixed = lam[:, None] * F.one_hot(target, 10) + (1 - lam[:, None]) * F.one_hot(target_b, 10)
    for k in range(2):
        torch.testing.assert_close(ce[k], F.cross_entropy(logits[k], mixed.double(), label_smoothing=0.1))
        per_sample = (lam * F.cross_entropy(logits[k], target, label_smoothing=0.1, reduction="none")
                      + (1 - lam) * F.cross_entropy(logits[k], target_b, label_smoothing=0.1, reduction="none"))
        torch.testing.assert_close(ce[k], per_sample.mean())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_hard_targets_are_soft_targets_with_lam_one_or_zero(dtype):
    """lam = 1 is the hard target, lam = 0 the hard target_b: bit for bit, gradient included."""
    gen = torch.Generator().manual_seed(5)
    logits, target, weights = make_case(3, 3, 9, 101, "cyclic", dtype=dtype, generator=gen)
    other = torch.randint(0, 101, (9,), generator=gen)
    ones = torch.ones(9)
    hard_a = _grads(ops.mutual_distillation_loss, logits, target, weights, ones[:3], label_smoothing=0.1)
    hard_b = _grads(ops.mutual_distillation_loss, logits, other, weights, ones[:3], label_smoothing=0.1)
    soft_a = _grads(ops.mutual_distillation_loss, logits, target, weights, ones[:3], label_smoothing=0.1,
                    target_b=other, lam=torch.ones(9))
    soft_b = _grads(ops.mutual_distillation_loss, logits, target, weights, ones[:3], label_smoothing=0.1,
                    target_b=other, lam=0.0)
    for hard, soft in ((hard_a, soft_a), (hard_b, soft_b)):
        for h, s in zip(hard, soft):
            assert torch.equal(h, s)


def test_one_lam_for_the_batch_is_every_samples():
    logits, target, weights = make_case(2, 2, 7, 20, "pair")
    target_b = target.roll(1)
    one = ops.mutual_distillation_loss(logits, target, weights, target_b=target_b, lam=torch.tensor(0.3))
    each = ops.mutual_distillation_loss(logits, target, weights, target_b=target_b, lam=torch.full((7,), 0.3))
    for a, b in zip(one, each):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_soft_targets_low_precision(dtype):
    gen = torch.Generator().manual_seed(7)
    logits, target, weights = make_case(3, 2, 32, 1000, "ensemble", dtype=dtype, generator=gen)
    target_b, lam = soft_target(32, 1000, target, gen, dtype=torch.float32)
    grad_out = torch.rand(2, generator=gen) + 0.5
    kw = dict(label_smoothing=0.1, target_b=target_b, lam=lam)
    loss, ce, kl, grad = _grads(ops.mutual_distillation_loss, logits, target, weights, grad_out, **kw)
    ref = _grads(reference.mutual_distillation_loss, logits.float(), target, weights, grad_out, **kw)
    tol = TOLERANCES[dtype]
    for got, want in zip((loss, ce, kl), ref[:3]):
        torch.testing.assert_close(got, want, **tol["loss"])
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref[3], **tol["grad"])


def test_soft_targets_gradcheck_and_opcheck():
    logits, target, weights = make_case(3, 2, 4, 6, "ensemble")
    target_b, lam = target.flip(0), torch.tensor([0.2, 1.0, 0.0, 0.65], dtype=torch.float64)
    for k in range(2):
        row = logits[k].clone().requires_grad_()

        def loss_k(r, k=k):
            z = torch.cat([logits[:k], r[None], logits[k + 1:]])
            return ops.mutual_distillation_loss(z, target, weights, 2.0, 0.5, 1.5, 0.2, target_b=target_b, lam=lam)[0][k]
        assert torch.autograd.gradcheck(loss_k, (row,))
    x = logits.float().requires_grad_()
    for z, compute_grad in ((x, True), (x.detach(), False)):
        torch.library.opcheck(torch.ops.afd_fast.mutual_distillation_forward,
                              (z, target, weights, 3.0, 1.0, 1.0, 0.1, compute_grad, target_b, lam.float()))


def test_soft_targets_under_torch_compile():
    logits, target, weights = make_case(2, 2, 8, 37, "pair", dtype=torch.float32)
    target_b, lam = target.roll(1), torch.rand(8)

    def step(z):
        return ops.mutual_distillation_loss(z, target, weights, label_smoothing=0.1, target_b=target_b, lam=lam)[0].sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        z = logits.clone().requires_grad_()
        out = fn(z)
        results.append((out.detach(), *torch.autograd.grad(out, z)))
    for e, c in zip(*results):
        torch.testing.assert_close(c, e)


def test_soft_target_lam_is_not_clamped():
    """lam is not checked (CUDA could not without a host sync): any value gives the linear formula's
    result, NaN a NaN loss for the networks, never a crash."""
    logits, target, weights = make_case(2, 2, 5, 9, "pair")
    target_b = target.roll(1)
    for lam in (torch.full((5,), 1.5, dtype=torch.float64), torch.full((5,), -0.5, dtype=torch.float64)):
        got = ops.mutual_distillation_loss(logits, target, weights, target_b=target_b, lam=lam)
        want = reference.mutual_distillation_loss(logits, target, weights, target_b=target_b, lam=lam)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    lam = torch.full((5,), 0.5, dtype=torch.float64)
    lam[2] = float("nan")
    loss, ce, kl = ops.mutual_distillation_loss(logits, target, weights, target_b=target_b, lam=lam)
    assert torch.isnan(ce).all() and torch.isfinite(kl).all()


@pytest.mark.parametrize("kw,match", [
    (dict(target_b=Y_SOFT), "soft targets need both target_b and lam"),
    (dict(lam=torch.ones(4)), "soft targets need both target_b and lam"),
    (dict(target_b=Y_SOFT[:3], lam=torch.ones(4)), r"target_b must be \[B\] = \[4\]"),
    (dict(target_b=Y_SOFT.float(), lam=torch.ones(4)), "target_b must hold int64"),
    (dict(target_b=Y_SOFT, lam=torch.ones(3)), r"lam must be \[B\] = \[4\]"),
    (dict(target_b=Y_SOFT, lam=torch.ones(4, 1)), r"lam must be \[B\] = \[4\]"),
    (dict(target_b=Y_SOFT, lam=torch.ones(4, dtype=torch.int64)), "lam must be a floating-point tensor"),
    (dict(target_b=Y_SOFT.clone().fill_(10), lam=torch.ones(4)), r"target_b holds class indices in \[10, 10\]"),
    (dict(target_b=Y_SOFT.clone().fill_(-3), lam=torch.ones(4)), "target_b holds class indices"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_soft_target_bad_inputs(kw, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.mutual_distillation_loss(L, Y, W, **kw)
    if "target_b" in kw and "lam" in kw:  # the operator itself, not only the Python wrapper
        with pytest.raises(RuntimeError, match=match):
            torch.ops.afd_fast.mutual_distillation_forward(L, Y, W, 3.0, 1.0, 1.0, 0.0, False, kw["target_b"], kw["lam"])


def test_soft_target_operator_wants_both():
    with pytest.raises(RuntimeError, match="both target_b and lam"):
        torch.ops.afd_fast.mutual_distillation_forward(L, Y, W, 3.0, 1.0, 1.0, 0.0, False, Y_SOFT, None)


# --- bad inputs: each gives a clear error --------------------------------------------------------


@pytest.mark.parametrize("args,match", [
    ((L[0], Y, W), r"logits must be \[M, B, C\]"),
    ((L.int(), Y, W), "logits must be float32, float64, float16 or bfloat16"),
    ((L, Y[:3], W), r"target must be \[B\] = \[4\]"),
    ((L, Y[None], W), r"target must be \[B\]"),
    ((L, Y.float(), W), "target must hold int64"),
    ((L, Y, torch.ones(2, 3)), r"peer_weights must be \[K, M\]"),
    ((L, Y, torch.ones(3, 2)), r"peer_weights must be \[K, M\] with 1 <= K <= M"),
    ((L, Y, torch.ones(2)), r"peer_weights must be \[K, M\]"),
    ((L, Y, W.int()), "peer_weights must be a floating-point tensor"),
    ((L, Y.clone().fill_(10), W), r"class indices in \[10, 10\].*valid: 0..9"),
    ((L, Y.clone().fill_(-1), W), "class indices"),
    ((torch.randn(2, 0, 10), Y[:0], W), "at least one row, sample and class"),
    ((torch.randn(2, 4, 0), Y, W), "at least one row, sample and class"),
    ((torch.randn(9, 4, 10), Y, torch.ones(9, 9)), "at most 8 are supported"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_mutual_distillation_bad_inputs(args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.mutual_distillation_loss(*args)


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
    (dict(label_smoothing=-0.1), r"label_smoothing must be in \[0, 1\]"),
])
def test_mutual_distillation_bad_scalars(kw, match):
    with pytest.raises(RuntimeError, match=match):
        ops.mutual_distillation_loss(L, Y, W, **kw)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(8), torch.randn(8)), r"d_own must be \[K, B\]"),
    ((torch.randn(2, 8, 1), torch.randn(2, 8, 1)), "squeeze the last dimension"),
    ((torch.randn(2, 8), torch.randn(2, 7)), "d_peer must have the shape of d_own"),
    ((torch.randn(2, 8), torch.randn(2, 8).double()), "d_own and d_peer must have one dtype"),
    ((torch.randint(0, 3, (2, 8)), torch.randint(0, 3, (2, 8))), "d_own must be float32"),
    ((torch.randn(2, 0), torch.randn(2, 0)), "at least one network and one sample"),
    ((torch.randn(2, 8), torch.randn(2, 8), float("inf")), "real_label and fake_label must be finite"),
])
def test_lsgan_bad_inputs(args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.lsgan_loss(*args)


@pytest.mark.parametrize("args,match", [
    (("ring", 2), "unknown topology 'ring'"),
    (("pair", 3), "exactly 2 networks"),
    (("dml", 1), "at least 2 networks"),
    (("cyclic", 0), "at least 2 networks"),
])
def test_peer_weights_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        ops.peer_weights(*args)


def test_backward_op_bad_inputs():
    with pytest.raises(RuntimeError, match="needs the gradient saved by the forward"):
        torch.ops.afd_fast.mutual_distillation_backward(torch.ones(2), torch.empty(0), 2)
    with pytest.raises(RuntimeError, match=r"grad_loss must be \[K\] = \[2\]"):
        torch.ops.afd_fast.mutual_distillation_backward(torch.ones(3), torch.ones(2, 4, 5), 2)
    with pytest.raises(RuntimeError, match=r"grad_g and grad_d must be \[K\] = \[2\]"):
        torch.ops.afd_fast.lsgan_backward(torch.ones(3), torch.ones(2), torch.ones(2, 4), torch.ones(2, 4), 1.0, 0.0)


# --- non-finite inputs: NaN losses, never a crash ------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_logits(bad, dtype):
    logits, target, weights = make_case(3, 3, 4, 20, "cyclic", dtype=dtype)
    logits[0, 1, (target[1] + 1) % 20] = bad  # network 0, sample 1, a class other than the target
    x = logits.clone().requires_grad_()
    loss, ce, kl = ops.mutual_distillation_loss(x, target, weights)
    # Network 0 reads its own row, network 1 learns from network 0; network 2 reads neither.
    assert not torch.isfinite(loss[0]) and not torch.isfinite(loss[1])
    assert torch.isfinite(loss[2])
    if bad != bad:  # NaN propagates as NaN
        assert torch.isnan(loss[0]) and torch.isnan(loss[1])
    loss[2].backward()
    assert torch.isfinite(x.grad).all()


def test_non_finite_scores():
    own = torch.randn(2, 5)
    own[1, 2] = float("nan")
    g_loss, d_loss = ops.lsgan_loss(own, torch.randn(2, 5))
    assert torch.isfinite(g_loss[0]) and torch.isnan(g_loss[1]) and torch.isnan(d_loss[1])
    big = torch.tensor([[float("inf"), -float("inf"), 1e4, -1e4]])
    g_loss, d_loss = ops.lsgan_loss(big, big)
    torch.testing.assert_close(g_loss, reference.lsgan_loss(big, big)[0])
    torch.testing.assert_close(d_loss, reference.lsgan_loss(big, big)[1])


# --- the GPU kernel's single-pass row statistics, run on the CPU ---------------------------------

@pytest.mark.parametrize("lanes", [1, 32, 256])
def test_online_row_stats(lanes):
    z = torch.randn(6, 777, dtype=torch.float64) * 10
    z[1] = torch.sort(z[1]).values  # ascending: the running max changes at every element
    z[2, ::3] = float("-inf")  # masked classes
    t = 2.5
    got = _native.online_row_stats()(z, t, lanes)
    mx = z.max(1).values
    torch.testing.assert_close(got[:, 0], mx)
    torch.testing.assert_close(got[:, 1], torch.logsumexp(z, 1))
    torch.testing.assert_close(got[:, 2], torch.logsumexp((z - mx[:, None]) / t, 1))
    torch.testing.assert_close(got[[0, 1, 3, 4, 5], 3], z[[0, 1, 3, 4, 5]].sum(1))

    bad = torch.randn(3, 100, dtype=torch.float64)
    bad[0, 50] = float("nan")
    bad[1, 7] = float("inf")
    bad[2, :] = float("-inf")
    got = _native.online_row_stats()(bad, t, lanes)
    # +inf: NaN as in the CPU kernels' exp(z - max) (the emulated CUDA kernel gave +inf before).
    assert torch.isnan(got[0, 1]) and torch.isnan(got[1, 1]) and not torch.isfinite(got[2, 1])


# --- the reference fallback ----------------------------------------------------------------------

def test_reference_fallback_without_extension():
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['afd_fast._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import afd_fast.ops as ops\n"
        "assert not ops.HAS_EXTENSION\n"
        "assert sum('slower plain-PyTorch reference' in str(x.message) for x in w) == 1, [str(x.message) for x in w]\n"
        "z = torch.randn(2, 3, 5, requires_grad=True)\n"
        "loss, ce, kl = ops.mutual_distillation_loss(z, torch.tensor([0, 1, 4]), ops.peer_weights('pair', 2))\n"
        "loss.sum().backward()\n"
        "g, d = ops.lsgan_loss(torch.zeros(2, 3), torch.zeros(2, 3))\n"
        "assert torch.allclose(g, torch.full((2,), 0.25)) and torch.allclose(d, torch.full((2,), 0.5))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
