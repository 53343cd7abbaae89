"""Batch-norm recalibration (afd_fast.calibration) and the loaders' calibration batches, on real JPEGs
(../shared/data/imagenette-mini) and small synthetic folders."""
import copy
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from afd_fast.calibration import recalibrated
from afd_fast.data import build_loaders, synthetic_image_folder
from afd_fast.data.dali import dali_available
from afd_fast.data.loaders import calibration_indices
from afd_fast.model import AFDModel
from afd_fast.models import build_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENETTE = os.environ.get("AFD_FAST_IMAGENETTE", os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenette-mini"))
needs_data = pytest.mark.skipif(not os.path.isdir(IMAGENETTE), reason=f"no imagenette-mini at {IMAGENETTE}")
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
NORM = nn.modules.batchnorm._BatchNorm


def _norms(model):
    return [m for m in model.modules() if isinstance(m, NORM)]


def _stats(model):
    return [(n.running_mean.clone(), n.running_var.clone(), n.num_batches_tracked.clone(), n.momentum)
            for n in _norms(model)]


def small_network(classes: int) -> nn.Module:
    """Three strided Conv-BN-ReLU blocks and a linear classifier: learns in a second on the CPU."""
    layers, cin = [], 3
    for cout in (16, 32, 64):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def _per_batch_reference(model, batches):
    """By hand: each batch norm's input statistics per batch (training-mode forward: batch statistics),
    averaged over the batches: the mean of the means, the mean of the unbiased variances."""
    model = copy.deepcopy(model).train()
    seen = {n: [] for n in _norms(model)}
    hooks = [n.register_forward_pre_hook(lambda m, args: seen[m].append(
        (args[0].double().mean((0, 2, 3)), args[0].double().var((0, 2, 3), unbiased=True)))) for n in seen]
    with torch.no_grad():
        for images, _ in batches:
            model(images)
    for h in hooks:
        h.remove()
    return [(torch.stack([m for m, _ in s]).mean(0), torch.stack([v for _, v in s]).mean(0)) for s in seen.values()]


def _logits(model, batches, train_mode=False):
    model.train(train_mode)
    with torch.no_grad():
        return torch.cat([model(images) for images, _ in batches])


def _top1(model, batches, train_mode=False):
    labels = torch.cat([y for _, y in batches])
    return 100 * (_logits(model, batches, train_mode).argmax(-1) == labels).float().mean().item()


@pytest.fixture(scope="module")
def imagenette_run():
    """A small network trained one pass over 1280 training images of imagenette-mini at 32 px
    (unaugmented: it learns in 40 steps); the loaders (torchvision backend); the validation batches."""
    torch.manual_seed(0)
    loaders = build_loaders(IMAGENETTE, 32, 32, 0, seed=0, backend="torch")
    net = small_network(loaders.num_classes)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for images, labels in loaders.calibration_batches(40):
        loss = nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net, loaders, list(loaders.val)


@needs_data
def test_recalibration_restores_corrupted_statistics_to_batch_statistics_accuracy(imagenette_run):
    net, loaders, val = imagenette_run
    trained = _top1(copy.deepcopy(net), val)  # with the training's running statistics
    net = copy.deepcopy(net)
    generator = torch.Generator().manual_seed(1)
    for n in _norms(net):  # garbage running statistics
        n.running_mean.copy_(torch.randn(n.running_mean.shape, generator=generator) * 5)
        n.running_var.copy_(torch.rand(n.running_var.shape, generator=generator) * 50 + 0.01)
    corrupted = _stats(net)
    buffers = [n.running_mean for n in _norms(net)]
    batches = list(loaders.calibration_batches(6))
    assert len(batches) == 6 and all(x.shape == (32, 3, 32, 32) for x, _ in batches)
    reference = _per_batch_reference(net, batches)
    by_hand = copy.deepcopy(net)
    for n, (mean, var) in zip(_norms(by_hand), reference):
        n.running_mean.copy_(mean)
        n.running_var.copy_(var)
    # the validation set is sorted by class: batch statistics from shuffled batches of it
    x, y = torch.cat([x for x, _ in val]), torch.cat([y for _, y in val])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    shuffled = [(x[order[i:i + 50]], y[order[i:i + 50]]) for i in range(0, len(y), 50)]
    batch_statistics = _top1(copy.deepcopy(net), shuffled, train_mode=True)
    garbage = _top1(net, val)
    net.eval()
    with recalibrated(net, batches, torch.device("cpu")):
        assert not net.training  # its mode, restored before the body
        for n, (mean, var) in zip(_norms(net), reference):
            torch.testing.assert_close(n.running_mean, mean.float(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(n.running_var, var.float(), rtol=1e-4, atol=1e-5)
            assert n.num_batches_tracked.item() == 6
        torch.testing.assert_close(_logits(net, val), _logits(by_hand, val), rtol=1e-4, atol=1e-4)
        recalibrated_top1 = _top1(net, val)
    assert trained > 20 and batch_statistics > 20 and garbage < 15  # it learnt; garbage statistics hide it
    assert abs(recalibrated_top1 - batch_statistics) <= 5, (recalibrated_top1, batch_statistics, trained, garbage)
    # exactly the training statistics again, in the same tensors
    for (mean, var, count, momentum), n, buffer in zip(corrupted, _norms(net), buffers):
        assert torch.equal(n.running_mean, mean) and torch.equal(n.running_var, var)
        assert torch.equal(n.num_batches_tracked, count) and n.momentum == momentum and n.running_mean is buffer


def test_afd_model_keeps_what_prediction_does_not_reach_and_a_frozen_teacher():
    torch.manual_seed(0)
    # l1kd-offline: transfer layers with batch norm (wrn-16-2 -> wrn-16-4's channels), a frozen teacher
    model = AFDModel([build_network("wrn-16-2", 4), build_network("wrn-16-4", 4)], "l1kd-offline", "cyclic", 32)
    student, teacher = model.networks
    for n in _norms(model):
        n.running_mean.fill_(0.5)
    transfer_norms = _norms(model.transfers)
    assert transfer_norms
    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    before = _stats(model)
    batches = [(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)), None) for i in range(2)]
    with recalibrated(model, batches, torch.device("cpu")):
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert all(n.num_batches_tracked.item() == 2 and not torch.all(n.running_mean == 0.5) for n in _norms(student))
        assert all(torch.all(n.running_mean == 0.5) for n in _norms(teacher) + transfer_norms)
    for (mean, var, count, momentum), n in zip(before, _norms(model)):
        assert torch.equal(n.running_mean, mean) and torch.equal(n.running_var, var)
        assert torch.equal(n.num_batches_tracked, count) and n.momentum == momentum


def test_models_without_batch_norm_run_nothing():
    def batches():
        raise AssertionError("read")
        yield

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    with recalibrated(model, batches(), torch.device("cpu")):
        pass


def test_an_error_inside_restores_the_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    before = _stats(model)
    with pytest.raises(RuntimeError, match="inside"):
        with recalibrated(model, [(torch.randn(2, 3, 8, 8), None)], torch.device("cpu")):
            raise RuntimeError("inside")
    assert not model.training
    (mean, var, count, momentum), = before
    assert torch.equal(model[1].running_mean, mean) and torch.equal(model[1].running_var, var)
    assert model[1].num_batches_tracked == count and model[1].momentum == momentum


def test_calibration_indices_are_fixed_equal_and_disjoint_shares():
    shares = [calibration_indices(103, 4, 8, seed=3, rank=r, world=3) for r in range(3)]
    assert [len(s) for s in shares] == [32, 32, 32]  # 4 batches of 8 of each share of 34
    assert len(set(shares[0]) | set(shares[1]) | set(shares[2])) == 96
    assert shares[1] == calibration_indices(103, 4, 8, seed=3, rank=1, world=3)
    assert shares[1] != calibration_indices(103, 4, 8, seed=4, rank=1, world=3)
    assert len(calibration_indices(103, 9, 8, seed=3, rank=0, world=3)) == 32  # a share holds 4 full batches


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return synthetic_image_folder(str(tmp_path_factory.mktemp("data") / "tiny"), num_classes=4, train_per_class=10,
                                  val_per_class=2, size=40)


def _check_calibration_batches(make_loaders, n, batch):
    """The calibration batches: the training images at calibration_indices, prepared as validation
    images (those of the loaders whose val split is train), the same every call; the training epoch's
    batches and torch's RNG unchanged by them."""
    loaders = make_loaders("val")
    as_validation = [x for x, _ in make_loaders("train").val]
    train_images = torch.cat(as_validation)
    uninterrupted = [(x.clone(), y.clone()) for x, y in loaders.train_epoch(0)]
    rng = torch.get_rng_state()
    epoch = iter(loaders.train_epoch(0))
    interrupted = [tuple(t.clone() for t in next(epoch))]
    first = [(x.clone(), y.clone()) for x, y in loaders.calibration_batches(n)]
    second = list(loaders.calibration_batches(n))
    interrupted += [(x.clone(), y.clone()) for x, y in epoch]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for u, i in zip(uninterrupted, interrupted) for a, b in zip(u, i))
    assert len(interrupted) == len(uninterrupted)
    indices = calibration_indices(loaders.train_size, n, batch, 0, 0, 1)
    assert len(first) == min(n, loaders.train_size // batch)
    images = torch.cat([x for x, _ in first])
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    torch.testing.assert_close(images.float(), train_images[indices].float(), rtol=0, atol=0)


def test_torchvision_calibration_batches(tiny_folder):
    _check_calibration_batches(lambda split: build_loaders(tiny_folder, 32, 8, 0, seed=0, backend="torch",
                                                           val_split=split), 3, 8)


@needs_dali
def test_dali_calibration_batches(tiny_folder):
    _check_calibration_batches(lambda split: build_loaders(tiny_folder, 32, 8, 1, seed=0, backend="dali",
                                                           val_split=split), 3, 8)


def test_cifar_calibration_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, 8))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    _check_calibration_batches(lambda split: build_loaders(str(tmp_path), 32, 8, 0, seed=0, val_split=split), 2, 8)


WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from afd_fast.calibration import recalibrated

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    batches = [(torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(10 * rank + i)), None) for i in range(2)]
    with recalibrated(model, batches, torch.device("cpu")):
        torch.save([model[1].running_mean.clone(), model[1].running_var.clone()], f"{sys.argv[1]}/rank{rank}.pt")
    dist.destroy_process_group()
""")


def test_two_processes_average_to_the_statistics_of_all_batches(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    every = [(torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(10 * r + i)), None)
             for r in range(2) for i in range(2)]
    with recalibrated(model, every, torch.device("cpu")):  # one process, all four batches
        mean, var = model[1].running_mean.clone(), model[1].running_var.clone()
    for rank in range(2):
        got_mean, got_var = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got_mean, mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_var, var, rtol=1e-6, atol=1e-7)
