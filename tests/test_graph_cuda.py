"""The whole AFD step as one CUDA graph (afd_fast.graph.GraphedStep): replay trains exactly as the
eager step does. Every test skips itself without a GPU."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from afd_fast import train
from afd_fast.model import AFDModel
from afd_fast.step import DualStep
from afd_fast.graph import GraphedStep
from afd_fast.models import build_network

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _deterministic():
    # the same kernels in graph and eager runs, so that only the graph can make a difference
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


def _pair(arch="resnet20", channels_last=True):
    torch.manual_seed(0)
    model = AFDModel([build_network(arch, 10) for _ in range(2)], method="afd", topology="pair").cuda()
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _batches(n, batch=16, size=32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, device="cuda", generator=g).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (batch,), device="cuda", generator=g)) for _ in range(n)]


TOLERANCE = {"off": dict(rtol=1e-5, atol=1e-6), "bf16": dict(rtol=2e-3, atol=2e-4), "fp16": dict(rtol=1e-3, atol=1e-4)}


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_graph_replay_trains_as_the_eager_step(amp):
    model = _pair()
    twin = copy.deepcopy(model)
    graphed = GraphedStep(DualStep(model, lr=0.05, adv_lr=1e-3, amp=amp, capturable=True), warmup=2)
    eager = DualStep(twin, lr=0.05, adv_lr=1e-3, amp=amp)
    for images, target in _batches(8):
        out_g = {k: v.clone() for k, v in graphed(images, target).items()}
        out_e = eager(images, target)
        torch.testing.assert_close(out_g["ce"], out_e["ce"], **TOLERANCE[amp])
    assert graphed.captures == 1 and not graphed.disabled
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, msg=name, **TOLERANCE[amp])
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):  # batch-norm statistics move in the graph
        torch.testing.assert_close(b, c, msg=name, **TOLERANCE[amp])
    if amp == "fp16":
        assert torch.equal(graphed.step.loss_scale.scale, eager.loss_scale.scale)


def test_mixing_in_the_graph_draws_as_the_eager_step():
    """mixup/CutMix inside the captured step: every replay draws a new λ, permutation and box from the
    CUDA generator, the values that the eager step draws from the same generator state (graph-safe
    philox offsets), and leaves the generator where the eager step does (what exact resume needs)."""
    from afd_fast.mixing import Mixing
    mixing = Mixing(mixup=0.2, cutmix=1.0, prob=0.8)
    model = _pair()
    twin = copy.deepcopy(model)
    graphed = GraphedStep(DualStep(model, lr=0.05, adv_lr=1e-3, capturable=True, mixing=mixing), warmup=2)
    eager = DualStep(twin, lr=0.05, adv_lr=1e-3, mixing=mixing)
    for images, target in _batches(8):
        before = torch.cuda.get_rng_state()
        out_g = {k: v.clone() for k, v in graphed(images, target).items()}
        after = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(before)
        out_e = eager(images, target)
        assert torch.equal(torch.cuda.get_rng_state(), after)
        torch.testing.assert_close(out_g["ce"], out_e["ce"], **TOLERANCE["off"])
    assert graphed.captures == 1 and not graphed.disabled
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, msg=name, **TOLERANCE["off"])


def test_schedules_reach_the_captured_graph():
    model = _pair()
    twin = copy.deepcopy(model)
    step = DualStep(model, lr=0.05, adv_lr=1e-3, capturable=True)
    graphed, eager = GraphedStep(step, warmup=1), DualStep(twin, lr=0.05, adv_lr=1e-3)
    schedules = [torch.optim.lr_scheduler.MultiStepLR(o, [1], 0.1) for s in (step, eager) for o in s.optimizers.values()]
    for n, (images, target) in enumerate(_batches(5)):
        graphed(images, target)
        eager(images, target)
        if n == 2:  # after the capture
            for s in schedules:
                s.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCE["off"])


def test_fp16_overflow_is_skipped_inside_the_graph():
    model = _pair()
    step = DualStep(model, lr=0.05, adv_lr=1e-3, amp="fp16", capturable=True)
    graphed = GraphedStep(step, warmup=1)
    batches = _batches(3)
    graphed(*batches[0])
    graphed(*batches[1])  # captured and replayed
    step.loss_scale.scale.fill_(2.0 ** 40)
    before = copy.deepcopy(model)
    graphed(*batches[2])
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)
    assert float(step.loss_scale.scale) == 2.0 ** 39


def test_new_batch_shape_recaptures():
    graphed = GraphedStep(DualStep(_pair(), adv_lr=1e-3, capturable=True), warmup=1)
    for images, target in _batches(2) + _batches(2, batch=8) + _batches(2):
        graphed(images, target)
    assert graphed.captures == 3


FALLBACK = """
import torch
from test_graph_cuda import _batches, _pair
from afd_fast.model import AFDModel
from afd_fast.step import DualStep
from afd_fast.graph import GraphedStep

step = DualStep(_pair(), adv_lr=1e-3, capturable=True)

def syncing_step(images, target):
    losses = step(images, target)
    float(losses["logit"])  # a host sync: not capturable
    return losses

graphed = GraphedStep(syncing_step, warmup=1)
for images, target in _batches(3):
    assert torch.isfinite(graphed(images, target)["logit"])
assert graphed.disabled
# the process stays usable: a new graph captures and replays
other = GraphedStep(DualStep(_pair(), adv_lr=1e-3, capturable=True), warmup=1)
for images, target in _batches(3):
    other(images, target)
torch.cuda.synchronize()
assert other.captures == 1 and not other.disabled
print("fallback ok")
"""


def test_capture_failure_falls_back_to_eager_steps():
    # its own process: a failed capture must not leave state behind that hides problems in other tests
    proc = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stdout + proc.stderr
    assert "CUDA graph capture failed" in proc.stderr


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trainer_with_every_speed_flag(tmp_path, amp, capfd):
    from afd_fast.data import synthetic_image_folder

    data = synthetic_image_folder(str(tmp_path / "data"), num_classes=4, train_per_class=16, val_per_class=6)
    common = ["--data", data, "--device", "cuda", "--amp", amp, "--channels-last", "--cuda-graph", "--workers", "2",
              "--batch-size", "8", "--print-every", "1000", "--seed", "2"]
    full = train.main([*common, "--output", str(tmp_path / "a"), "--epochs", "2"])
    train.main([*common, "--output", str(tmp_path / "b"), "--epochs", "1"])
    resumed = train.main([*common, "--output", str(tmp_path / "b"), "--epochs", "2", "--resume"])
    assert full["steps"] == 16 and resumed["steps"] == 16
    assert "CUDA graph capture failed" not in capfd.readouterr().err
    for key in ("net0_top1", "net1_top1"):
        assert abs(full[key] - resumed[key]) <= 100 / 24 + 1e-9  # at most one image of 24 flips (reduced precision)


def test_resume_from_an_eager_checkpoint_into_a_graphed_run():
    plain = DualStep(_pair(channels_last=False), adv_lr=1e-3, fused=False)  # CPU-style state: step on the host
    images, target = _batches(1)[0]
    plain(images.contiguous(), target)
    step = DualStep(_pair(), adv_lr=1e-3, amp="fp16", capturable=True)
    step.load_state_dict(plain.state_dict())
    adam = step.optimizers["generator"]
    first = adam.param_groups[0]["params"][0]
    assert adam.param_groups[0]["capturable"] and adam.state[first]["step"].is_cuda
    graphed = GraphedStep(step, warmup=1)
    for images, target in _batches(3):
        graphed(images, target)
    torch.cuda.synchronize()
    assert graphed.captures == 1 and not graphed.disabled
