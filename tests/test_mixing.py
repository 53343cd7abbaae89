"""Mixup and CutMix on the device (afd_fast.mixing): λ's distribution, the exact mixed images and box,
the shares of unmixed and CutMix batches, determinism, the soft-target losses of the model against
a hand computation, the same mixed images for every network of a step (DualStep, alternating DML,
per-network sizes), the trainer on the CIFAR path and the sample grid after mixing."""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from afd_fast import train
from afd_fast.config import resolve
from afd_fast.data import synthetic_image_folder
from afd_fast.mixing import Mixing, SoftTarget
from afd_fast.model import AFDModel
from afd_fast.models.cifar import CifarResNet
from afd_fast.run_dir import sample_mixing
from afd_fast.step import DualStep

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cifar import cifar10  # noqa: E402, F401  (a fixture: a small fake CIFAR-10)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(b=8, h=12, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g), torch.arange(b)  # target = index: target_b is the permutation


def _draws(mixing, n, **batch):
    images, target = _batch(**batch)
    return [(images, *mixing(images, target)) for _ in range(n)]


# --- λ and the images -----------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_lambda_follows_beta(alpha):
    """Mean 1/2 and variance 1/(4(2α+1)) of Beta(α, α), over 4000 seeded batches (4.5 standard errors)."""
    torch.manual_seed(0)
    n = 4000
    lam = torch.stack([t.lam for _, _, t in _draws(Mixing(mixup=alpha), n, b=2, h=2, w=2)]).double()
    var = 1 / (4 * (2 * alpha + 1))
    fourth = 3 * (2 * alpha + 1) / (16 * (2 * alpha + 1) ** 2 * (2 * alpha + 3))  # E[(λ - 1/2)^4]
    assert abs(lam.mean() - 0.5) < 4.5 * math.sqrt(var / n)
    assert abs(lam.var() - var) < 4.5 * math.sqrt((fourth - var ** 2) / n)
    assert lam.min() >= 0 and lam.max() <= 1


def test_mixup_is_the_blend_with_the_permuted_batch():
    torch.manual_seed(1)
    for images, out, soft in _draws(Mixing(mixup=0.4), 20):
        perm = soft.target_b
        assert sorted(perm.tolist()) == list(range(8)) and torch.equal(soft.target, torch.arange(8))
        # (one rounding of float32 apart: the blend is computed as lerp(x[perm], x, λ))
        torch.testing.assert_close(out, soft.lam * images + (1 - soft.lam) * images[perm], rtol=0, atol=1e-6)
        assert soft.lam.dtype == torch.float32 and soft.lam.dim() == 0


@pytest.mark.parametrize("h,w", [(12, 20), (16, 16), (7, 5)])
def test_cutmix_pastes_one_box_whose_area_is_one_minus_lambda(h, w):
    """Each output pixel is the own image's or, inside one rectangle (the same for every sample), the
    partner's; the rectangle holds exactly (1 - λ)·H·W pixels."""
    torch.manual_seed(2)
    boxes = 0
    for images, out, soft in _draws(Mixing(cutmix=1.0), 40, h=h, w=w):
        partner = images[soft.target_b]
        inside = (out == partner).all(1) & (out != images).all(1)  # [B, H, W]; random values never tie
        assert torch.equal(torch.where(inside[:, None], partner, images), out)
        moved = [b for b in range(8) if soft.target_b[b] != b]
        box = inside[moved[0]]
        assert all(torch.equal(inside[b], box) for b in moved)
        rows, cols = box.any(1), box.any(0)
        assert torch.equal(box, rows[:, None] & cols[None, :])  # a rectangle
        for line in (rows, cols):  # each side one contiguous run
            on = line.nonzero().flatten()
            assert len(on) == 0 or on[-1] - on[0] + 1 == len(on)
        area = int(box.sum())
        assert round((1 - float(soft.lam)) * h * w) == area and abs(float(soft.lam) - (1 - area / (h * w))) < 1e-6
        boxes += area > 0
    assert boxes > 30  # (an empty box: λ = 1; rare at α = 1)


def test_cutmix_box_size_follows_torchvision():
    """Half-sides floor(0.5·sqrt(1 - λ)·side) around the centre: unclipped, the box is 2·half per side, clipped at the border (λ values whose sqrt is exact in float32)."""
    from afd_fast.mixing import _box

    for lam, cy, cx, (h, w), want in ((0.75, 0.5, 0.5, (16, 16), (8, 8)), (0.0, 0.5, 0.5, (10, 20), (10, 20)),
                                      (0.9375, 0.0, 0.99, (20, 20), (2, 3)), (1.0, 0.3, 0.3, (8, 8), (0, 0))):
        corrected, box = _box(torch.tensor(lam), torch.tensor(cy), torch.tensor(cx), h, w)
        got = (int(box.any(1).sum()), int(box.any(0).sum()))
        assert got == want, (lam, cy, cx, got)
        assert float(corrected) == pytest.approx(1 - want[0] * want[1] / (h * w))


def test_mix_prob_leaves_the_expected_share_unmixed():
    torch.manual_seed(3)
    n, prob = 1500, 0.3
    unmixed = 0
    for images, out, soft in _draws(Mixing(mixup=1.0, cutmix=1.0, prob=prob), n, b=4, h=4, w=4):
        if float(soft.lam) == 1.0:  # (a mixed batch gets λ = 1 with probability ~0 at α = 1)
            unmixed += 1
            assert torch.equal(out, images)
    sd = math.sqrt(prob * (1 - prob) / n)
    assert abs(unmixed / n - (1 - prob)) < 4.5 * sd


def test_switch_prob_is_the_share_of_cutmix():
    torch.manual_seed(4)
    n, switch = 1500, 0.25
    cut = 0
    for images, out, soft in _draws(Mixing(mixup=1.0, cutmix=1.0, switch_prob=switch), n, b=4, h=4, w=4):
        # CutMix: every pixel the own or the partner's (an empty box too: λ = 1); mixup blends them all
        cut += bool(((out == images) | (out == images[soft.target_b])).all())
    assert abs(cut / n - switch) < 4.5 * math.sqrt(switch * (1 - switch) / n)


def test_the_same_seed_mixes_the_same():
    mixing = Mixing(mixup=0.2, cutmix=1.0)
    images, target = _batch()
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append([mixing(images, target) for _ in range(4)])
    for (a, sa), (b, sb) in zip(runs[0], runs[1]):
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(sa, sb))
    assert any(not torch.equal(a, c) for (a, _), (c, _) in zip(runs[0], runs[2]))
    # a generator of its own: the same draws from the same seed, and the global generator untouched
    state = torch.get_rng_state()
    own = [mixing(images, target, torch.Generator().manual_seed(9))[0] for _ in range(2)]
    assert torch.equal(own[0], own[1]) and torch.equal(torch.get_rng_state(), state)


def test_fp16_and_channels_last_batches_keep_their_dtype_and_layout():
    images, target = _batch()
    images = images.half().contiguous(memory_format=torch.channels_last)
    out, soft = Mixing(mixup=0.2, cutmix=1.0)(images, target)
    assert out.dtype == torch.float16 and out.is_contiguous(memory_format=torch.channels_last)
    assert soft.lam.dtype == torch.float32


def test_bad_settings_are_refused():
    for kwargs in (dict(mixup=-1.0), dict(cutmix=1.0, prob=1.5), dict(mixup=1.0, switch_prob=-0.1), dict()):
        with pytest.raises(ValueError):
            Mixing(**kwargs)
    assert Mixing.of(0.0, 0.0) is None and Mixing.of(0.2, 0.0) == Mixing(0.2, 0.0)


# --- the losses with soft targets -------------------------------------------------------------------------

def _hand_ce(logits, soft, smoothing=0.0):
    """-Σ_c q_c log softmax(z)_c, batch mean, with q the mixed one-hot target, smoothed."""
    c = logits.shape[-1]
    q = soft.lam * F.one_hot(soft.target, c).double() + (1 - soft.lam) * F.one_hot(soft.target_b, c).double()
    q = (1 - smoothing) * q + smoothing / c
    return -(q * F.log_softmax(logits.double(), -1)).sum(-1).mean()


@pytest.mark.parametrize("method", ["afd", "dml", "one", "kd", "vanilla"])
def test_soft_target_losses_equal_the_hand_computation(method):
    """Every cross-entropy of the method takes the mixed target: the fused op's (with label smoothing
    0.1 on top) and ONE's gated ensemble's."""
    torch.manual_seed(7)
    model = AFDModel([CifarResNet(8, 10), CifarResNet(8, 10)], method, "pair", 8, label_smoothing=0.1).eval()
    images, _ = _batch(b=6, h=8, w=8)
    target = torch.tensor([0, 3, 3, 9, 1, 5])
    out_images, soft = Mixing(mixup=0.4)(images, target)
    soft = soft._replace(lam=torch.tensor(0.3))  # a λ clearly inside (0, 1)
    losses = model(out_images, soft)
    logits = model.predict(out_images)
    for k in range(2):
        assert float(losses["ce"][k]) == pytest.approx(float(_hand_ce(logits[f"net{k}"], soft, 0.1)), rel=1e-5)
    if method == "one":
        want = _hand_ce(logits["gated_ensemble"], soft)
        assert float(losses["ensemble_ce"]) == pytest.approx(float(want), rel=1e-5)
    # λ = 1: the hard target's losses
    hard = model(out_images, target)
    one = model(out_images, SoftTarget(target, soft.target_b, torch.tensor(1.0)))
    for key in ("ce", "logit") + (("ensemble_ce",) if method == "one" else ()):
        torch.testing.assert_close(one[key], hard[key], rtol=1e-6, atol=1e-6)


# --- every network of a step sees the same mixed images ---------------------------------------------------

def _stem_inputs(model):
    """The images each network's first convolution gets, in call order: [(network, tensor)]."""
    seen = []
    for k, network in enumerate(model.networks):
        stem = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3)
        stem.register_forward_pre_hook(lambda module, args, k=k: seen.append((k, args[0].detach().clone())))
    return seen


@pytest.mark.parametrize("sizes", [None, (8, 4)], ids=["one-size", "network-sizes"])
def test_every_network_sees_the_same_mixed_images(sizes):
    torch.manual_seed(0)
    model = AFDModel([CifarResNet(8, 10), CifarResNet(8, 10)], "afd", "pair", sizes or 8)
    mixing = Mixing(mixup=0.2, cutmix=1.0)
    step = DualStep(model, adv_lr=1e-3, mixing=mixing)
    seen = _stem_inputs(model)
    images, target = _batch(b=6, h=8, w=8)
    torch.manual_seed(11)
    step(images, target)
    torch.manual_seed(11)
    want, _ = mixing(images, target)
    assert [k for k, _ in seen] == [0, 1]
    assert torch.equal(seen[0][1], want) and not torch.equal(want, images)
    other = want if sizes is None else F.interpolate(want, size=(4, 4), mode="bilinear", antialias=True,
                                                       align_corners=False)
    assert torch.equal(seen[1][1], other)


def test_alternating_dml_mixes_each_networks_batch_on_its_turn():
    """Network k's turn: every network (k with gradient, its peers without) sees the k-th batch mixed."""
    torch.manual_seed(0)
    model = AFDModel([CifarResNet(8, 10), CifarResNet(8, 10)], "dml", "pair", 8)
    mixing = Mixing(mixup=0.2, cutmix=1.0)
    step = DualStep(model, mixing=mixing, dml_update="alternate")
    seen = _stem_inputs(model)
    images, target = _batch(b=8, h=8, w=8)
    torch.manual_seed(12)
    step(images, target)
    torch.manual_seed(12)
    want = [mixing(x, y)[0] for x, y in zip(images.chunk(2), target.chunk(2))]
    assert [k for k, _ in seen] == [0, 1, 0, 1]
    for turn in range(2):
        assert all(torch.equal(x, want[turn]) for _, x in seen[2 * turn:2 * turn + 2])


# --- the trainer ------------------------------------------------------------------------------------------

def test_cifar_training_with_mixing_and_the_flags_through_config_yaml(tmp_path, cifar10, capsys):
    """Mixing is on the device: the CIFAR loader trains with it; config.yaml repeats it."""
    out = tmp_path / "run"
    train.main(["--data", cifar10, "--output", str(out), "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
                "--arch", "resnet20,resnet20", "--device", "cpu", "--mixup", "0.2", "--cutmix", "1.0",
                "--mix-prob", "0.9", "--mix-switch-prob", "0.3"])
    printed = capsys.readouterr().out
    assert "mixup 0.2 + CutMix 1, CutMix share 0.3, of 0.9 of the batches" in printed
    again = resolve({"config": str(out / "config.yaml")})
    assert (again.mixup, again.cutmix, again.mix_prob, again.mix_switch_prob) == (0.2, 1.0, 0.9, 0.3)
    assert again.mixing == Mixing(0.2, 1.0, 0.9, 0.3)


def test_save_samples_shows_the_batches_after_mixing(tmp_path, capsys):
    data = synthetic_image_folder(str(tmp_path / "data"), num_classes=3, train_per_class=8, val_per_class=2)
    out = tmp_path / "run"
    flags = ["--data", data, "--loader", "torch", "--workers", "0", "--batch-size", "4", "--image-size", "16",
             "--cutmix", "1.0", "--mixup", "0.2", "--seed", "3"]
    train.main([*flags, "--output", str(out), "--epochs", "1", "--max-steps", "1", "--save-samples", "6"])
    assert "6 training images of epoch 0 (mixup 0.2 + CutMix 1, CutMix share 0.5)" in capsys.readouterr().out
    grid = torch.from_numpy(np.asarray(Image.open(out / "samples.png").convert("RGB"))).float()
    assert grid.shape == (2 + 2 * 18, 2 + 3 * 18, 3)  # 3 per row, 2 rows of 16 px with 2 px of padding
    tiles = torch.stack([grid[2 + 18 * r:18 + 18 * r, 2 + 18 * c:18 + 18 * c].permute(2, 0, 1) / 255
                         for r in range(2) for c in range(3)])
    config = resolve({"data": data, "image_size": 16, "batch_size": 4, "workers": 0, "loader": "torch",
                      "cutmix": 1.0, "mixup": 0.2, "seed": 3})
    loaders = train.build_data(config, 0, 1, torch.device("cpu"))
    mixed, plain = loaders.sample_images(6, sample_mixing(config)), loaders.sample_images(6)
    assert (tiles - mixed).abs().max() <= 1 / 255 + 1e-6
    assert (tiles - plain).abs().amax((1, 2, 3)).max() > 0.1  # the grid is not the unmixed images
    # the sample grid draws from its own generator: the run's global one is left alone
    state = torch.get_rng_state()
    sample_mixing(config)(*_batch(b=4, h=16, w=16))
    assert torch.equal(torch.get_rng_state(), state)
