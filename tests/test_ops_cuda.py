"""afd_fast.ops on a CUDA GPU: the CPU suite's cases plus graph capture, torch.compile and the
kernel's launch variants (warp or block per sample, 16-byte or scalar loads, 2/4/8-row arrays).
Every test skips itself without a GPU."""
import pytest
import torch

import afd_fast.ops as ops
from afd_fast import reference

from _cases import SHAPES, make_case
from test_ops import _grads, _student_loss

pytestmark = pytest.mark.cuda
DEV = "cuda"


# C = 5000 and 32000 take the block-per-sample path, odd C the scalar-load path.
CUDA_SHAPES = SHAPES + [(2, 2, 4, 5000, "pair"), (3, 2, 3, 4097, "ensemble"), (6, 6, 3, 6000, "dml")]


@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "M{}-K{}-B{}-C{}-{}".format(*s))
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_reference_float64(shape, label_smoothing):
    logits, target, weights = make_case(*shape, device=DEV)
    grad_out = torch.rand(shape[1], dtype=torch.float64, device=DEV) + 0.5
    kw = dict(temperature=2.5, ce_weight=0.7, kd_weight=1.3, label_smoothing=label_smoothing)
    got = _grads(ops.mutual_distillation_loss, logits, target, weights, grad_out, **kw)
    want = _grads(reference.mutual_distillation_loss, logits, target, weights, grad_out, **kw)
    for g, w, name in zip(got, want, ("loss", "ce", "kl", "grad")):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 8e-3), (torch.float16, 1e-3)], ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 256, 1000, "pair"), (3, 2, 128, 100, "ensemble"), (4, 4, 128, 100, "cyclic"),
                                   (2, 2, 64, 32000, "pair"), (2, 2, 2, 262144, "pair")],
                         ids=lambda s: "M{}-K{}-B{}-C{}-{}".format(*s))
def test_low_precision_matches_float32_reference(dtype, tol, shape):
    logits, target, weights = make_case(*shape, dtype=dtype, device=DEV)
    grad_out = torch.rand(shape[1], device=DEV) + 0.5
    got = _grads(ops.mutual_distillation_loss, logits, target, weights, grad_out, label_smoothing=0.1)
    want = _grads(reference.mutual_distillation_loss, logits.float(), target, weights, grad_out, label_smoothing=0.1)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3].float(), want[3], rtol=tol, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 64, 1000, "pair"), (3, 2, 9, 4097, "ensemble"), (5, 5, 7, 33, "cyclic")],
                         ids=lambda s: "M{}-K{}-B{}-C{}-{}".format(*s))
def test_soft_targets_match_reference(dtype, shape):
    """mixup/CutMix targets (target_b, lam) on the GPU: every launch variant, against the reference."""
    logits, target, weights = make_case(*shape, dtype=dtype, device=DEV)
    soft = dict(target_b=target.roll(1), lam=torch.rand(shape[2], device=DEV), label_smoothing=0.1)
    soft["lam"][::3] = 1.0
    grad_out = torch.rand(shape[1], device=DEV) + 0.5
    got = _grads(ops.mutual_distillation_loss, logits, target, weights, grad_out, **soft)
    want = _grads(reference.mutual_distillation_loss, logits.double(), target, weights, grad_out.double(), **soft)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g.double(), w, **tol)
    grad_tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(
        rtol=8e-3 if dtype == torch.bfloat16 else 1e-4, atol=1e-6)
    torch.testing.assert_close(got[3].double(), want[3], **grad_tol)


def test_cuda_matches_cpu_kernel():
    logits, target, weights = make_case(3, 3, 33, 1000, "cyclic", dtype=torch.float32)
    cpu = _grads(ops.mutual_distillation_loss, logits, target, weights, torch.ones(3))
    gpu = _grads(ops.mutual_distillation_loss, logits.to(DEV), target.to(DEV), weights.to(DEV), torch.ones(3, device=DEV))
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-6)


def test_deterministic():
    logits, target, weights = make_case(2, 2, 300, 5000, "pair", dtype=torch.bfloat16, device=DEV)
    a = _grads(ops.mutual_distillation_loss, logits, target, weights, torch.ones(2, device=DEV))
    b = _grads(ops.mutual_distillation_loss, logits, target, weights, torch.ones(2, device=DEV))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_lsgan_matches_reference():
    for k, b in [(1, 1), (2, 7), (4, 1001), (2, 70000)]:
        own = torch.randn(k, b, dtype=torch.float64, device=DEV) * 4
        peer = torch.randn(k, b, dtype=torch.float64, device=DEV) * 4
        gg, gd = torch.rand(k, dtype=torch.float64, device=DEV), torch.rand(k, dtype=torch.float64, device=DEV)
        res = []
        for fn in (ops.lsgan_loss, reference.lsgan_loss):
            a, p = own.clone().requires_grad_(), peer.clone().requires_grad_()
            g_loss, d_loss = fn(a, p, 0.9, 0.1)
            res.append((g_loss, d_loss, *torch.autograd.grad((g_loss * gg).sum() + (d_loss * gd).sum(), (a, p))))
        for x, y in zip(*res):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_opcheck():
    logits, target, weights = make_case(3, 2, 3, 5, "ensemble", device=DEV)
    for k in range(2):
        row = logits[k].clone().requires_grad_()
        assert torch.autograd.gradcheck(_student_loss(logits, target, weights, k), (row,))
    x = logits.clone().requires_grad_()
    torch.library.opcheck(torch.ops.afd_fast.mutual_distillation_forward,
                          (x.float(), target, weights, 3.0, 1.0, 1.0, 0.1, True))
    own = torch.randn(3, 7, device=DEV, requires_grad=True)
    peer = torch.randn(3, 7, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.afd_fast.lsgan_forward, (own, peer, 1.0, 0.0))


def test_bad_target_gives_nan_not_a_crash():
    logits, target, weights = make_case(2, 2, 4, 10, "pair", dtype=torch.float32, device=DEV)
    target[2] = 10
    loss, _, _ = ops.mutual_distillation_loss(logits, target, weights)
    assert torch.isnan(loss).all()
    torch.cuda.synchronize()  # the context is still healthy
    assert torch.isfinite(ops.mutual_distillation_loss(logits, target.clamp(max=9), weights)[0]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits(bad):
    logits, target, weights = make_case(3, 3, 4, 20, "cyclic", dtype=torch.bfloat16, device=DEV)
    logits[0, 1, (target[1] + 1) % 20] = bad
    x = logits.clone().requires_grad_()
    loss, _, _ = ops.mutual_distillation_loss(x, target, weights)
    assert not torch.isfinite(loss[0]) and not torch.isfinite(loss[1]) and torch.isfinite(loss[2])
    loss[2].backward()  # network 2 learns from network 1 only: W[2, 0] = 0 keeps row 0's NaN out
    assert torch.isfinite(x.grad).all()


def test_device_mismatch_is_an_error():
    logits, target, weights = make_case(2, 2, 4, 10, "pair", dtype=torch.float32, device=DEV)
    with pytest.raises(RuntimeError, match="must be on one device"):
        ops.mutual_distillation_loss(logits, target.cpu(), weights)
    with pytest.raises(RuntimeError, match="must be on one device"):
        ops.lsgan_loss(torch.randn(2, 3, device=DEV), torch.randn(2, 3))


def _step(logits, target, weights, own, peer):
    loss, _, _ = ops.mutual_distillation_loss(logits, target, weights, label_smoothing=0.1)
    g_loss, d_loss = ops.lsgan_loss(own, peer)
    total = loss.sum() + g_loss.sum() + d_loss.sum()
    return (total, *torch.autograd.grad(total, (logits, own, peer)))


def test_cuda_graph_capture_and_replay_equal_eager():
    torch.manual_seed(0)
    static = [torch.randn(2, 64, 1000, device=DEV, dtype=torch.bfloat16).requires_grad_(),
              torch.randint(0, 1000, (64,), device=DEV), ops.peer_weights("pair", 2, device=DEV),
              torch.randn(2, 64, device=DEV).requires_grad_(), torch.randn(2, 64, device=DEV).requires_grad_()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _step(*static)
    for _ in range(3):  # new data in the static buffers, replay, compare with eager
        fresh = [torch.randn_like(static[0]), torch.randint(0, 1000, (64,), device=DEV), None,
                 torch.randn_like(static[3]), torch.randn_like(static[4])]
        with torch.no_grad():
            for buf, new in zip(static, fresh):
                if new is not None:
                    buf.copy_(new)
        graph.replay()
        eager = _step(*static)
        for g, e in zip(outputs, eager):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_torch_compile_matches_eager():
    logits, target, weights = make_case(2, 2, 32, 1000, "pair", dtype=torch.bfloat16, device=DEV)
    args = [logits.requires_grad_(), target, weights, torch.randn(2, 32, device=DEV).requires_grad_(),
            torch.randn(2, 32, device=DEV).requires_grad_()]
    eager = _step(*args)
    compiled = torch.compile(_step, fullgraph=True)(*args)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e)
