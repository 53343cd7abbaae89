"""The performance model (benchmarks/model.py) on small networks: its FLOP counts agree with counts
of the networks taken on their own, the AFD step does exactly the work of its floor (no second
forward, no redundant backward), and the predictions and byte counts are consistent."""
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import model  # noqa: E402

from afd_fast.models import build_network  # noqa: E402

CIFAR = model.CONFIGS["quick"][0]  # ResNet-20s, batch 128 from counts at 2 and 4


@pytest.fixture(scope="module")
def rows():
    torch.set_num_threads(1)
    vanilla = model.model_row(CIFAR, 2, "vanilla")
    return {"vanilla": vanilla, "afd": model.model_row(CIFAR, 2, "afd", vanilla["gflops_per_step"])}


def test_vanilla_step_is_each_network_forward_and_backward(rows):
    """The vanilla pair's step: each network's forward and backward, nothing else (counted here on a
    plain network, outside the trainer's step)."""
    net = build_network(CIFAR.archs[2][0], CIFAR.num_classes).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(images)[1]
        logits.float().sum().backward()
    expected = 2 * counter.get_total_flops() * CIFAR.batch_size / 2
    assert rows["vanilla"]["gflops_per_step"] * 1e9 == pytest.approx(expected, rel=1e-12)


def test_afd_step_does_the_work_of_its_floor(rows):
    afd, vanilla = rows["afd"], rows["vanilla"]
    assert afd["gflops_per_step"] == pytest.approx(afd["floor_gflops"], rel=1e-9)
    # the extra backward of L_G through G is most of a network's backward: between 1.5x and 2x
    assert 1.5 < afd["flops_vs_vanilla"] < 2.0
    assert afd["floor_vs_vanilla"] == pytest.approx(afd["floor_gflops"] / vanilla["gflops_per_step"])


def test_operator_counts_and_predictions(rows):
    for row in rows.values():
        assert 0 < row["kernels_per_replay"] <= row["ops_per_step_fused"] < row["ops_per_step_eager"]
        h100, h200 = row["predicted"]["H100"], row["predicted"]["H200"]
        assert h200["ms"] <= h100["ms"]  # same peak FLOP/s, more bandwidth
        assert h100["img_per_s"] == pytest.approx(CIFAR.batch_size / (h100["ms"] * 1e-3))
        # no faster than the FLOPs alone at the stated efficiency allow
        floor_ms = row["gflops_per_step"] * 1e9 / (model.GPUS["H100"]["bf16_flops"] * model.COMPUTE_EFFICIENCY) * 1e3
        assert h100["ms"] > floor_ms
    assert rows["afd"]["kernels_per_replay"] > rows["vanilla"]["kernels_per_replay"]


def test_loss_bytes():
    (row,) = model.loss_bytes(((2, 64, 100),))
    logits = 2 * 64 * 100 * 2  # bf16
    assert row["minimum_bytes"] == 2 * logits
    assert row["minimum_bytes"] < row["fused_bytes_l2"] < row["fused_bytes_no_l2"] < row["eager_bytes"]
    assert row["eager_ops"] > 10
