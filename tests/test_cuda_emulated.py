"""The CUDA kernels of csrc/cuda/ops_cuda.cu, unmodified, run on the CPU under the emulation of the
CUDA execution model in tests/cuda_emu (fibers for threads, lock-step warp operations, barriers that
must be reached by every thread, shuffled thread and block order, guard pages around every buffer).

They are called as `torch.ops.afd_fast_emu.*`, the CUDA kernels registered with the schemas, fake
kernels and autograd of `torch.ops.afd_fast`, and compared with `afd_fast.reference` and with the
CPU kernels. What the emulation cannot show: the GPU's memory model (one thread runs at a time, so
a missing __threadfence is invisible), the device-only branches of afd_math.h (__CUDA_ARCH__), nvcc's
code generation, speed.
"""
import contextlib
import re

import pytest
import torch

import afd_fast.ops as ops
import cuda_emu
from afd_fast import reference

EMU = cuda_emu.build()
E = torch.ops.afd_fast_emu
SELFTEST = torch.ops.afd_emu_selftest
EMU.set_sm_count(2)  # few "SMs": the grid-stride loops of the backward kernels go round


@contextlib.contextmanager
def guarded(mode="end"):
    """New CPU tensors get guard pages after ("end") or before ("start") them."""
    EMU.set_guard_mode(mode)
    try:
        yield
    finally:
        EMU.set_guard_mode("off")


def emulated_loss(logits, target, weights, temperature=3.0, ce_weight=1.0, kd_weight=1.0, label_smoothing=0.0,
                  target_b=None, lam=None):
    """afd_fast.ops.mutual_distillation_loss with the emulated CUDA kernels."""
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, ce, kl, _ = E.mutual_distillation_forward(logits, target, weights, float(temperature), float(ce_weight),
                                                    float(kd_weight), float(label_smoothing), compute_grad,
                                                    target_b, lam)
    return loss, ce, kl


def run(fn, logits, target, weights, grad_out, with_grad, **kw):
    """(loss, ce, kl, d(loss·grad_out)/d logits or None); keeps `logits` as it is (its offset too)."""
    x = logits.detach().requires_grad_(with_grad)
    loss, ce, kl = fn(x, target, weights, **kw)
    grad = torch.autograd.grad((loss * grad_out).sum(), x)[0] if with_grad else None
    return loss.detach(), ce, kl, grad


def weights_for(topology, m, k, generator):
    if topology == "random":  # non-negative, some zeros, self-weights included
        w = torch.rand(k, m, generator=generator, dtype=torch.float64)
        return torch.where(torch.rand(k, m, generator=generator) < 0.3, torch.zeros_like(w), w)
    return ops.peer_weights(topology, k).double()


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
BATCHES = [1, 3, 8, 9, 33, 64]
CLASSES = [1, 2, 7, 8, 100, 1000, 4096, 4097, 5000, 8200]  # > 4096: a block per sample, else a warp
ROWS = [(1, 1, "random"), (2, 2, "pair"), (3, 3, "cyclic"), (3, 2, "ensemble"), (4, 4, "dml"), (5, 4, "ensemble"),
        (6, 6, "random"), (7, 5, "random"), (8, 8, "cyclic"), (8, 3, "random")]


def _cases():
    """Every class count with every dtype; rows, batch, temperature, smoothing, alignment, the
    gradient and soft targets (half the dtypes of each class count) cycle through their values.
    Block-per-sample cases keep B small (1 or 3)."""
    cases = []
    for i, (c, dtype) in enumerate((c, d) for c in CLASSES for d in DTYPES):
        m, k, topology = ROWS[(i + i // 10) % len(ROWS)]
        b = BATCHES[(i * 5 + i // 4) % len(BATCHES)] if c <= 4096 else (1, 3)[i % 2]
        cases.append(dict(m=m, k=k, topology=topology, b=b, c=c, dtype=dtype, misaligned=i % 3 == 2,
                          temperature=(1.0, 3.0, 4.0)[(i // 2) % 3], label_smoothing=(0.0, 0.1)[(i // 3) % 2],
                          with_grad=i % 5 != 4, soft=(i + i // 4) % 2 == 1, seed=i))
    return cases


def _case_id(c):
    return "M{m}K{k}-{topology}-B{b}-C{c}-{dt}{mis}-T{temperature:g}-ls{label_smoothing:g}{g}{soft_id}".format(
        dt=str(c["dtype"]).replace("torch.", ""), mis="-misaligned" if c["misaligned"] else "",
        g="" if c["with_grad"] else "-nograd", soft_id="-soft" if c["soft"] else "", **c)


def make_logits(case, generator):
    m, b, c, dtype = case["m"], case["b"], case["c"], case["dtype"]
    values = torch.randn(m, b, c, generator=generator, dtype=torch.float64) * 3
    if case["topology"] == "ensemble":  # the teacher row holds the students' mean logits
        values[case["k"]:] = values[:case["k"]].mean(0, keepdim=True)
    logits = torch.empty(m, b, c, dtype=dtype)
    if case["misaligned"]:  # one element off a 16-byte boundary: no 16-byte loads
        storage = torch.empty(m * b * c + 1, dtype=dtype)
        head, tail = storage[1:], storage[:-1]
        logits = (head if head.data_ptr() % 16 else tail).view(m, b, c)  # whichever is off the boundary
    return logits.copy_(values)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tolerances(dtype):
    """(losses vs the reference, gradients vs the reference, anything vs the CPU kernel)."""
    if dtype == torch.float64:
        tight = dict(rtol=1e-9, atol=1e-11)
        return tight, tight, dict(rtol=1e-12, atol=1e-13)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-4, atol=1e-6), dict(rtol=1e-5, atol=1e-6)
    low = dict(rtol=8e-3 if dtype == torch.bfloat16 else 1e-3, atol=1e-5)
    return dict(rtol=1e-5, atol=1e-5), low, low


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_mutual_distillation_kernels(case):
    gen = torch.Generator().manual_seed(case["seed"])
    EMU.set_seed(case["seed"])
    kw = dict(temperature=case["temperature"], ce_weight=0.7, kd_weight=1.3, label_smoothing=case["label_smoothing"])
    with guarded("start" if case["seed"] % 2 else "end"):
        logits = make_logits(case, gen)
        target = torch.randint(0, case["c"], (case["b"],), generator=gen)
        weights = weights_for(case["topology"], case["m"], case["k"], gen)
        grad_out = torch.rand(case["k"], generator=gen, dtype=torch.float64) + 0.5
        if case["soft"]:  # mixup/CutMix targets, lam 1 and target_b == target among them
            kw["target_b"] = torch.randint(0, case["c"], (case["b"],), generator=gen)
            kw["target_b"][::3] = target[::3]
            kw["lam"] = torch.rand(case["b"], generator=gen, dtype=torch.float64).to(acc_dtype(case["dtype"]))
            kw["lam"][1::4] = 1.0
        if case["misaligned"]:
            assert logits.data_ptr() % 16 != 0
        elif case["c"] % (16 // logits.element_size()) == 0:  # the kernel's 16-byte load path
            assert logits.data_ptr() % 16 == 0
        got = run(emulated_loss, logits, target, weights, grad_out, case["with_grad"], **kw)
    # The reference in float64 for float64 logits, else in float32 on the same (rounded) values.
    want = run(reference.mutual_distillation_loss, logits.to(got[0].dtype), target, weights, grad_out,
               case["with_grad"], **kw)
    cpu = run(ops.mutual_distillation_loss, logits, target, weights, grad_out, case["with_grad"], **kw)
    loss_tol, grad_tol, cpu_tol = tolerances(case["dtype"])
    for name, g, w, c in zip(("loss", "ce", "kl"), got, want, cpu):
        torch.testing.assert_close(g, w.to(g.dtype), **loss_tol, msg=lambda m: f"{name} vs reference: {m}")
        torch.testing.assert_close(g, c, **cpu_tol, msg=lambda m: f"{name} vs CPU kernel: {m}")
    if case["with_grad"]:
        assert got[3].dtype == case["dtype"]
        torch.testing.assert_close(got[3].to(want[3].dtype), want[3], **grad_tol, msg=lambda m: f"grad vs reference: {m}")
        torch.testing.assert_close(got[3], cpu[3], **cpu_tol, msg=lambda m: f"grad vs CPU kernel: {m}")


def test_batch_larger_than_a_block():
    """B > 256: the last block's reduction loops over the per-sample parts more than once."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 300, 3, generator=gen)
    target = torch.randint(0, 3, (300,), generator=gen)
    weights = ops.peer_weights("pair", 2)
    with guarded():
        got = run(emulated_loss, logits, target, weights, torch.ones(2), True, label_smoothing=0.1)
    cpu = run(ops.mutual_distillation_loss, logits, target, weights, torch.ones(2), True, label_smoothing=0.1)
    for g, c in zip(got, cpu):
        torch.testing.assert_close(g, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 2, 33, 1000, "ensemble"), (2, 2, 3, 8200, "pair")], ids=str)
def test_results_do_not_depend_on_thread_order(shape):
    m, k, b, c, topology = shape
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(m, b, c, generator=gen).requires_grad_()
    target = torch.randint(0, c, (b,), generator=gen)
    weights = ops.peer_weights(topology, k)
    results = []
    for seed, sm_count in ((0, 2), (1, 2), (2, 7)):
        EMU.set_seed(seed)
        EMU.set_sm_count(sm_count)
        results.append(run(emulated_loss, logits, target, weights, torch.ones(k), True, label_smoothing=0.1))
    EMU.set_sm_count(2)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)  # the kernels sum in a fixed order: bit-identical


@pytest.mark.parametrize("which", ["target", "target_b"])
@pytest.mark.parametrize("bad_target", [-1, "C"])
@pytest.mark.parametrize("c", [7, 5000])
def test_target_outside_classes_gives_nan(bad_target, c, which):
    """README: a target (or soft target_b) outside [0, C) gives NaN on CUDA (checking it would need a
    host sync)."""
    gen = torch.Generator().manual_seed(c)
    logits = torch.randn(2, 3, c, generator=gen)
    target = torch.randint(0, c, (3,), generator=gen)
    weights = ops.peer_weights("pair", 2)
    bad = target.clone()
    bad[1] = c if bad_target == "C" else bad_target
    if which == "target":  # a hard target
        bad_call, good_call = (bad, {}), (target, {})
    else:  # a soft target whose target_b is the bad one
        lam = torch.full((3,), 0.4)
        bad_call, good_call = (target, dict(target_b=bad, lam=lam)), (target, dict(target_b=target, lam=lam))
    with guarded():
        loss, ce, kl, grad = run(emulated_loss, logits, bad_call[0], weights, torch.ones(2), True, **bad_call[1])
        valid = run(emulated_loss, logits, good_call[0], weights, torch.ones(2), True, **good_call[1])
    assert torch.isnan(loss).all() and torch.isnan(ce).all()
    torch.testing.assert_close(kl, valid[2])  # the KL part does not read the target
    assert torch.isnan(grad[:, 1]).all()
    assert torch.equal(grad[:, [0, 2]], valid[3][:, [0, 2]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype,c", [(torch.float32, 20), (torch.bfloat16, 4104), (torch.float16, 64)], ids=str)
def test_non_finite_logits_match_cpu_kernel(bad, dtype, c):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 4, c, generator=gen) * 3).to(dtype)
    target = torch.randint(0, c, (4,), generator=gen)
    logits[0, 1, (target[1] + 1) % c] = bad  # network 0, sample 1, a class other than the target
    weights = ops.peer_weights("cyclic", 3)
    with guarded():
        got = run(emulated_loss, logits, target, weights, torch.ones(3), True)
    cpu = run(ops.mutual_distillation_loss, logits, target, weights, torch.ones(3), True)
    assert torch.isfinite(got[0][2]) and not torch.isfinite(got[0][:2]).any()
    for g, w in zip(got, cpu):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=1e-2, atol=1e-5)


LSGAN_CASES = [(1, 1), (2, 3), (3, 33), (8, 300), (5, 257)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,b", LSGAN_CASES, ids=str)
def test_lsgan_kernels(dtype, k, b):
    gen = torch.Generator().manual_seed(k * 1000 + b)
    grad_g, grad_d = torch.rand(k, generator=gen) + 0.5, torch.rand(k, generator=gen) + 0.5
    EMU.set_seed(b)
    with guarded("start" if b % 2 else "end"):
        own = (torch.randn(k, b, generator=gen, dtype=torch.float64) * 2).to(dtype).requires_grad_()
        peer = (torch.randn(k, b, generator=gen, dtype=torch.float64) * 2).to(dtype).requires_grad_()
        g_loss, d_loss = E.lsgan_forward(own, peer, 0.9, 0.1)
        got = (g_loss.detach(), d_loss.detach(), *torch.autograd.grad((g_loss * grad_g + d_loss * grad_d).sum(), (own, peer)))
    results = []
    for fn in (reference.lsgan_loss, ops.lsgan_loss):
        a, p = own.detach().requires_grad_(), peer.detach().requires_grad_()
        g, d = fn(a, p, 0.9, 0.1)
        results.append((g.detach(), d.detach(), *torch.autograd.grad((g * grad_g + d * grad_d).sum(), (a, p))))
    _, grad_tol, cpu_tol = tolerances(dtype)
    for name, g, w, c in zip(("g_loss", "d_loss", "grad_own", "grad_peer"), got, *results):
        assert g.dtype == c.dtype
        torch.testing.assert_close(g, w.to(g.dtype), **grad_tol, msg=lambda m: f"{name} vs reference: {m}")
        torch.testing.assert_close(g, c, **cpu_tol, msg=lambda m: f"{name} vs CPU kernel: {m}")


def test_lsgan_non_finite_scores_match_cpu_kernel():
    own = torch.randn(2, 6)
    own[1, 2] = float("nan")
    peer = torch.tensor([[float("inf"), -float("inf"), 1e4, -1e4, 0.0, 1.0]] * 2)
    with guarded():
        got = E.lsgan_forward(own, peer, 1.0, 0.0)
        grads = E.lsgan_backward(torch.ones(2), torch.ones(2), own, peer, 1.0, 0.0)
    for g, w in zip((*got, *grads), (*ops.lsgan_loss(own, peer), *torch.ops.afd_fast.lsgan_backward(
            torch.ones(2), torch.ones(2), own, peer, 1.0, 0.0))):
        torch.testing.assert_close(g, w, equal_nan=True)


def test_gradcheck_through_emulated_kernels():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 3, 5, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 5, (3,), generator=gen)
    weights = ops.peer_weights("ensemble", 2).double()
    logits[2] = logits[:2].mean(0)
    for k in range(2):
        def loss_k(row, k=k):  # loss[k] depends on row k alone: the other rows are detached teachers
            z = torch.cat([logits[:k], row[None], logits[k + 1:]])
            return emulated_loss(z, target, weights, 2.0, 0.5, 1.5, 0.2)[0][k]

        def soft_loss_k(row, k=k):  # soft targets (mixup/CutMix)
            z = torch.cat([logits[:k], row[None], logits[k + 1:]])
            return emulated_loss(z, target, weights, 2.0, 0.5, 1.5, 0.2, target_b=target.flip(0),
                                 lam=torch.tensor([0.3, 1.0, 0.0], dtype=torch.float64))[0][k]
        assert torch.autograd.gradcheck(loss_k, (logits[k].clone().requires_grad_(),))
        assert torch.autograd.gradcheck(soft_loss_k, (logits[k].clone().requires_grad_(),))
    own = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    peer = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: E.lsgan_forward(a, b, 0.9, 0.1), (own, peer))


def test_opcheck_emulated_ops():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 4, 9, generator=gen).requires_grad_()
    target = torch.randint(0, 9, (4,), generator=gen)
    weights = ops.peer_weights("ensemble", 2)
    for z, compute_grad in ((logits, True), (logits.detach(), False)):
        torch.library.opcheck(E.mutual_distillation_forward, (z, target, weights, 3.0, 1.0, 1.0, 0.1, compute_grad))
        torch.library.opcheck(E.mutual_distillation_forward, (z, target, weights, 3.0, 1.0, 1.0, 0.1, compute_grad,
                                                              target.roll(1), torch.rand(4, generator=gen)))
    torch.library.opcheck(E.mutual_distillation_backward, (torch.rand(2), torch.randn(2, 4, 9), 3))
    own, peer = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    torch.library.opcheck(E.lsgan_forward, (own, peer, 1.0, 0.0))
    torch.library.opcheck(E.lsgan_backward, (torch.rand(3), torch.rand(3), own.detach(), peer.detach(), 1.0, 0.0))


def test_every_cuda_kernel_is_emulated():
    names = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("afd_fast::")]
    cuda_ops = {n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(f"afd_fast::{n}", "CUDA")}
    emulated = {n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(f"afd_fast_emu::{n}", "CPU")}
    assert emulated == {"mutual_distillation_forward", "mutual_distillation_backward", "lsgan_forward",
                        "lsgan_backward"}
    if ops.HAS_EXTENSION and torch.version.cuda:  # the CUDA build registers the same kernels
        assert cuda_ops == emulated


# --- the emulator proves itself ------------------------------------------------------------------

(CORRECT, MISSING_BARRIER, WRONG_STRIDE, OFF_BY_ONE, DIVERGENT_BARRIER, PARTIAL_SHUFFLE, READ_BEFORE, MISALIGNED_LOAD,
 SHARED_OUT_OF_BOUNDS) = range(9)


def expected_block_sums(x, blocks, threads=256):
    """What block b of the grid-stride loop sums: elements i with (i // threads) % blocks == b."""
    owner = (torch.arange(x.numel()) // threads) % blocks
    return torch.stack([x[owner == b].sum() for b in range(blocks)])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,blocks", [(1, 1), (1000, 3), (4096, 2), (10007, 5)])
def test_emulator_block_sum_passes(seed, n, blocks):
    EMU.set_seed(seed)
    with guarded("end" if seed % 2 else "start"):
        x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        got = SELFTEST.block_sum(x, CORRECT, blocks)
    # float32 sums of up to ~2,000 terms in another order: rounding stays far below 1e-4, a missing or
    # doubled term (|x| ~ 1) far above it
    torch.testing.assert_close(got.double(), expected_block_sums(x.double(), blocks), rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", [MISSING_BARRIER, WRONG_STRIDE])
def test_emulator_catches_wrong_results(seed, variant):
    """A removed __syncthreads (a race on shared memory) and a wrong stride give wrong sums."""
    EMU.set_seed(seed)
    x = torch.rand(1000) + 1  # positive: no cancellation can hide a missing term
    got = SELFTEST.block_sum(x, variant, 3)
    assert not torch.allclose(got, expected_block_sums(x, 3))


def test_emulator_catches_off_by_one_read():
    with guarded("end"):
        x = torch.randn(1000)
        with pytest.raises(RuntimeError, match=r"invalid memory access .* 0 bytes past the end of a 4000-byte "
                                               r"buffer(.|\n)*selftest\.cu:\d+"):
            SELFTEST.block_sum(x, OFF_BY_ONE, 3)


def test_emulator_guard_mode_start_catches_reads_before_the_start():
    with guarded("start"):
        x = torch.randn(1000)
        with pytest.raises(RuntimeError, match=r"4 bytes before the start of a 4000-byte buffer"):
            SELFTEST.block_sum(x, READ_BEFORE, 3)


@pytest.mark.parametrize("variant", [MISALIGNED_LOAD, SHARED_OUT_OF_BOUNDS])
def test_emulator_catches_misaligned_vector_load_and_shared_memory_overrun(variant):
    with pytest.raises(RuntimeError, match=r"misaligned or out-of-bounds access .* by thread \(\d+,0,0\)(.|\n)*"
                                           r"selftest\.cu:\d+"):
        SELFTEST.block_sum(torch.randn(1000), variant, 2)


def test_emulator_catches_barrier_not_reached_by_every_thread():
    with pytest.raises(RuntimeError, match=r"threads 0-127: __syncthreads\(\) at tests/cuda_emu/selftest\.cu:\d+"
                                           r"(.|\n)*threads 128-255: returned from the kernel"):
        SELFTEST.block_sum(torch.randn(100), DIVERGENT_BARRIER, 1)


def test_emulator_catches_shuffle_not_reached_by_every_lane():
    with pytest.raises(RuntimeError, match=r"warp \d+:(\n    lanes .*)*\n    lanes 0-15: __shfl_down_sync\(mask "
                                           r"0xffffffff\) at tests/cuda_emu/selftest\.cu:\d+"):
        SELFTEST.block_sum(torch.randn(100), PARTIAL_SHUFFLE, 1)


# --- broken copies of the real kernels are caught ------------------------------------------------

def _remove_group_sum_barrier(text):
    # group_sum's first barrier: without it a warp may overwrite smem while another still reads it.
    return text.replace("__syncthreads();  // a previous call may still be reading smem", "", 1)


def _wrong_lane_stride(text):
    # Pass 1 steps by one class per lane instead of one 16-byte pack: lanes overlap and overrun.
    return text.replace("c0 += int64_t(p.group) * VEC)", "c0 += int64_t(p.group))", 1)


@pytest.mark.parametrize("mutate", [_remove_group_sum_barrier, _wrong_lane_stride], ids=lambda f: f.__name__[1:])
def test_broken_kernel_copies_are_caught(mutate):
    name = "afd_fast_emu_" + mutate.__name__.strip("_")
    build = cuda_emu.build(name, mutate=mutate, float_only=True, selftest=False)
    broken = getattr(torch.ops, name)
    gen = torch.Generator().manual_seed(7)
    caught = []
    for seed, (b, c) in enumerate([(3, 8200), (9, 1000), (2, 5000)]):
        build.set_seed(seed)
        with guarded():
            logits = torch.randn(3, b, c, generator=gen)
        target = torch.randint(0, c, (b,), generator=gen)
        weights = ops.peer_weights("cyclic", 3)
        args = (logits, target, weights, 3.0, 1.0, 1.0, 0.0, True)
        want = torch.ops.afd_fast.mutual_distillation_forward(*args)
        try:
            with guarded():
                got = broken.mutual_distillation_forward(*args)
        except RuntimeError as e:  # the emulator's own report
            assert re.search(r"cuda_emu: ", str(e))
            caught.append(True)
            continue
        caught.append(not all(torch.allclose(g, w, rtol=1e-4, atol=1e-5) for g, w in zip(got, want)))
    assert any(caught), "the broken kernel passed every case"


# --- the launch rewrite, the one change made to the kernel source ----------------------------------

def test_rewrite_launches():
    src = 'k<T, 4><<<grid, block, 0, stream>>>(a,\n    b);  // k<<<1, 2>>>(x)\nconst char* s = "<<<x>>>";\n'
    assert cuda_emu.rewrite_launches(src) == (
        'k<T, 4> ^ ::afd_emu::Config(grid, block, 0, stream)(a,\n    b);  // k<<<1, 2>>>(x)\n'
        'const char* s = "<<<x>>>";\n')
    # a `>>>` inside brackets of the configuration and one closing nested templates elsewhere stay
    src = "k<<<f(a<b<c>>>(1)), 32>>>(x); std::vector<A<B<int>>> v;"
    assert cuda_emu.rewrite_launches(src) == (
        "k ^ ::afd_emu::Config(f(a<b<c>>>(1)), 32)(x); std::vector<A<B<int>>> v;")
    assert cuda_emu.rewrite_launches("/* <<< */ char c = '<'; x >>= 1;") == "/* <<< */ char c = '<'; x >>= 1;"
    for bad in ("k<<<1, 2(x);", "k<<<a<<<1>>>>>>(x);", "/* never closed", '"never closed'):
        with pytest.raises(ValueError):
            cuda_emu.rewrite_launches(bad)


def test_kernel_source_changes_only_at_launches():
    with open(cuda_emu.KERNELS) as f:
        text = f.read()
    rewritten = cuda_emu.rewrite_launches(text)
    changed = [(a, b) for a, b in zip(text.splitlines(), rewritten.splitlines()) if a != b]
    assert len(text.splitlines()) == len(rewritten.splitlines())  # compiler messages keep their lines
    assert changed and all("<<<" in a and "::afd_emu::Config(" in b for a, b in changed)
    assert len(changed) == text.count("<<<")
