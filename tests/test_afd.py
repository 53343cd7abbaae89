"""The AFD method (afd_fast.model, afd_fast.step) and its networks (afd_fast.models)."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from afd_fast import reference
from afd_fast.errors import ConfigError
from afd_fast.methods import METHODS, method_spec, peer_of
from afd_fast.model import AFDModel
from afd_fast.step import DualStep, gradient_sets
from afd_fast.schedule import LearningRates, Schedule
from afd_fast.models import build_network
from afd_fast.models.cifar import CIFAR_NETWORKS


def _batch(n=6, size=32, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


# the CIFAR networks and one torchvision ResNet (every torchvision classifier: tests/test_networks.py)
@pytest.mark.parametrize("name", sorted(n for n in CIFAR_NETWORKS if not n.startswith("wrn-28")) + ["resnet18"])
def test_networks_split_into_features_and_head(name):
    size = 64 if name in ("resnet18", "resnet34", "resnet50") else 32
    net = build_network(name, 10)
    x, _ = _batch(2, size)
    fmap, logits = net(x)
    assert fmap.shape[:2] == (2, net.feature_channels) and logits.shape == (2, 10)
    torch.testing.assert_close(net.head(net.features(x)), logits)
    head = {id(p) for p in net.head_parameters()}
    assert len(net.extractor_parameters()) + len(head) == len(list(net.parameters()))


def test_unknown_network_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown network 'resnet19'; known networks: .*resnet18.*wrn-16-2"):
        build_network("resnet19", 10)


def test_plain_state_dict_loads_into_torchvision():
    net = build_network("resnet18", 7)
    plain = torchvision.models.resnet18(num_classes=7)
    plain.load_state_dict(net.plain_state_dict())
    x, _ = _batch(2, 64)
    net.eval(), plain.eval()
    torch.testing.assert_close(plain(x), net(x)[1])


def _handwritten_step(model, images, target, lr, adv_lr):
    """docs/design.md §1 spelled out with the reference losses and autograd.grad."""
    k = len(model.networks)
    t_ = model.temperature
    maps, logits = zip(*(n(images) for n in model.networks))
    peer = [(i - 1) % k for i in range(k)]
    logit_loss = sum(F.cross_entropy(logits[i], target)
                     + t_ * t_ * F.kl_div(F.log_softmax(logits[i] / t_, 1),
                                          F.softmax(logits[peer[i]] / t_, 1).detach(), reduction="batchmean")
                     for i in range(k))
    t = [tr(m) for tr, m in zip(model.transfers, maps)]
    s = torch.sigmoid
    g_loss = sum(((1 - s(d(t[i]))) ** 2).mean() for i, d in enumerate(model.discriminators))
    d_loss = sum(((1 - s(d(t[peer[i]].detach()))) ** 2 + s(d(t[i].detach())) ** 2).mean()
                 for i, d in enumerate(model.discriminators))
    nets = [p for n in model.networks for p in n.parameters()]
    gens = [p for n in model.networks for p in n.extractor_parameters()] + list(model.transfers.parameters())
    discs = list(model.discriminators.parameters())
    ga = torch.autograd.grad(logit_loss, nets, retain_graph=True)
    gb = torch.autograd.grad(g_loss, gens, retain_graph=True, allow_unused=True)
    gc = torch.autograd.grad(d_loss, discs)
    for params, grads, opt in ((nets, ga, torch.optim.SGD(nets, lr=lr, momentum=0.9, weight_decay=1e-4)),
                               (gens, gb, torch.optim.Adam(gens, lr=adv_lr, weight_decay=0.1)),
                               (discs, gc, torch.optim.Adam(discs, lr=adv_lr, weight_decay=0.1))):
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        opt.step()
        for p in params:
            p.grad = None


@pytest.mark.parametrize("names", [("resnet20", "resnet20"), ("wrn-16-2", "wrn-16-4"),
                                   ("resnet20", "resnet20", "wrn-16-1")], ids="-".join)
def test_dual_step_equals_handwritten_step(names):
    if "wrn-16-1" in names:
        from afd_fast.models.cifar import WideResNet
        networks = [build_network(n, 10) if n != "wrn-16-1" else WideResNet(16, 1, 10) for n in names]
    else:
        networks = [build_network(n, 10) for n in names]
    torch.manual_seed(0)
    # float64: Adam's first step is about lr * sign(g), so float32 rounding in near-zero gradients
    # would decide the comparison.
    model = AFDModel(networks, method="afd", topology="cyclic", image_size=32).double()
    twin = copy.deepcopy(model)
    images, target = _batch(6)
    images = images.double()
    step = DualStep(model, lr=0.1, adv_lr=1e-3)
    step(images, target)
    _handwritten_step(twin, images, target, lr=0.1, adv_lr=1e-3)
    named_twin = dict(twin.named_parameters())
    changed = 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, named_twin[name], rtol=1e-7, atol=1e-9, msg=name)
        changed += 1
    assert changed == len(list(twin.parameters()))


def test_step_moves_every_parameter_group():
    model = AFDModel([build_network("resnet20", 10) for _ in range(2)], method="afd", topology="pair")
    before = copy.deepcopy(model)
    DualStep(model, adv_lr=1e-3)(*_batch(6))
    for group in ("networks", "transfers", "discriminators"):
        params = list(getattr(model, group).parameters())
        old = list(getattr(before, group).parameters())
        assert all(not torch.equal(a, b) for a, b in zip(params, old)) or not params, group
    assert len(list(model.discriminators.parameters())) > 0


def test_discriminator_learns_own_is_fake_and_peer_is_real():
    torch.manual_seed(1)
    model = AFDModel([build_network("resnet20", 10) for _ in range(2)], method="afd", topology="pair")
    images, target = _batch(16, seed=3)
    optimizer = torch.optim.Adam(model.discriminator_parameters(), lr=1e-3)
    for _ in range(60):  # networks frozen: only the discriminators learn
        losses = model(images, target)
        (grads,) = [g for _, g in gradient_sets(model, losses)[2:]]
        for p, g in zip(model.discriminator_parameters(), grads):
            p.grad = g
        optimizer.step()
    model.eval()
    losses = model(images, target)
    own, peer = torch.sigmoid(losses["d_own"]), torch.sigmoid(losses["d_peer"])
    for k in range(2):
        assert peer[k].mean() > 0.5 > own[k].mean(), (k, peer[k].mean(), own[k].mean())
    # L_G pushes the own map towards "real": a small step against its gradient raises D_k(own).
    with torch.no_grad():
        fmap = model.networks[0].features(images)
    fmap.requires_grad_()
    d = model.discriminators[0]
    g_loss = reference.lsgan_loss(d(fmap)[None], d(fmap)[None].detach())[0].sum()
    (grad,) = torch.autograd.grad(g_loss, fmap)
    with torch.no_grad():
        assert torch.sigmoid(d(fmap - 0.1 * grad / grad.norm())).mean() > torch.sigmoid(d(fmap)).mean()


def test_cyclic_teachers_for_three_networks():
    assert [peer_of(k, 3) for k in range(3)] == [2, 0, 1]  # 1->2, 2->3, 3->1 in the paper's numbering
    model = AFDModel([build_network("resnet20", 10) for _ in range(3)], method="afd", topology="cyclic")
    expected = torch.zeros(3, 3)
    expected[0, 2] = expected[1, 0] = expected[2, 1] = 1
    assert torch.equal(model.peer_weights, expected)
    model.eval()
    images, target = _batch(4)
    losses = model(images, target)
    maps = [n.features(images) for n in model.networks]
    for k in range(3):
        d = model.discriminators[k]
        torch.testing.assert_close(losses["d_own"][k], d(model.transfers[k](maps[k])))
        torch.testing.assert_close(losses["d_peer"][k], d(model.transfers[peer_of(k, 3)](maps[peer_of(k, 3)])))


def test_transfer_layers_only_where_channels_differ():
    model = AFDModel([build_network("wrn-16-2", 10), build_network("wrn-16-4", 10)], method="afd", topology="pair")
    conv, bn, relu = model.transfers[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (128, 256, (1, 1))
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    assert isinstance(model.transfers[1], torch.nn.Identity)
    assert all(d.conv1.in_channels == 256 for d in model.discriminators)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_takes_a_step(method):
    model = AFDModel([build_network("resnet20", 10) for _ in range(2)], method=method, topology="pair")
    losses = DualStep(model, adv_lr=1e-3)(*_batch(4))
    assert torch.isfinite(losses["logit"])
    assert ("generator" in losses) == method_spec(method).adversarial
    assert ("l1" in losses) == method_spec(method).l1
    students = losses["kl"][:-1] if method_spec(method).frozen_teacher else losses["kl"]
    if method in ("vanilla", "l1", "adv-only"):
        assert torch.all(losses["kl"] == 0)
    else:
        assert torch.all(students > 0) and torch.all(losses["kl"][len(students):] == 0)


def test_bad_method_and_network_count():
    nets = [build_network("resnet20", 10)]
    with pytest.raises(ConfigError, match="unknown method 'afdd'"):
        AFDModel(nets * 2, method="afdd")
    with pytest.raises(ConfigError, match="needs at least 2"):
        AFDModel(nets, method="afd")
    with pytest.raises(ConfigError, match="exactly 2 networks"):
        AFDModel([build_network("resnet20", 10) for _ in range(3)], method="afd", topology="pair")
    AFDModel(nets, method="vanilla")  # one network alone is fine without distillation


def _pair(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return AFDModel([build_network("resnet20", 10) for _ in range(2)], method="afd", topology="pair").to(dtype)


def _assert_same_parameters(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}", **tol)


def test_fused_optimizers_with_device_learning_rates_equal_the_default_ones():
    model = _pair(torch.float64)
    twin = copy.deepcopy(model)
    # rates a float32 device tensor holds exactly
    fused = DualStep(model, lr=0.125, adv_lr=2 ** -10, fused=True)
    plain = DualStep(twin, lr=0.125, adv_lr=2 ** -10, fused=False)
    assert isinstance(fused.optimizers["logit"].param_groups[0]["lr"], torch.Tensor)
    for seed in range(2):
        images, target = _batch(6, seed=seed)
        fused(images.double(), target)
        plain(images.double(), target)
    _assert_same_parameters(model, twin, rtol=1e-9, atol=1e-11)


def test_schedules_and_resume_update_device_learning_rates_in_place():
    step = DualStep(_pair(), lr=0.1, adv_lr=1e-3, fused=True)
    rates = {n: o.param_groups[0]["lr"] for n, o in step.optimizers.items()}
    schedules = {"logit": Schedule(0.1, milestones=(1,), epochs=2), "generator": Schedule(1e-3, milestones=(1,), epochs=2),
                 "discriminator": Schedule(1e-3, milestones=(1,), epochs=2)}
    step(*_batch(4))
    LearningRates(step.optimizers, schedules, steps_per_epoch=1).apply(1)  # the trainer's, after the milestone
    assert float(rates["logit"]) == pytest.approx(0.01, rel=1e-6) and float(rates["generator"]) == pytest.approx(1e-4, rel=1e-6)
    state = step.state_dict()
    other = DualStep(_pair(), lr=0.5, adv_lr=0.5, fused=True)
    kept = {n: o.param_groups[0]["lr"] for n, o in other.optimizers.items()}
    other.load_state_dict(state)
    for name, opt in other.optimizers.items():  # the same tensor objects (a CUDA graph may hold them), new values
        assert opt.param_groups[0]["lr"] is kept[name]
        assert float(kept[name]) == float(rates[name])


def test_amp_bf16_runs_the_networks_in_bf16():
    model = _pair()
    seen = []
    model.networks[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    DualStep(model, adv_lr=1e-3, amp="bf16")(*_batch(4))
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    model = _pair()
    step = DualStep(model, lr=0.1, adv_lr=1e-3, amp="fp16")
    assert step.loss_scale is not None and step.optimizers["logit"].defaults["fused"]
    step.loss_scale.scale.fill_(2.0 ** 40)  # the scaled backward overflows float16
    before = copy.deepcopy(model)
    step(*_batch(4))
    _assert_same_parameters(model, before, rtol=0, atol=0)
    assert float(step.loss_scale.scale) == 2.0 ** 39
    assert float(step.optimizers["generator"].state[model.generator_parameters()[0]]["step"]) == 0
    buffers = [step.optimizers["logit"].state[p]["momentum_buffer"] for p in model.network_parameters()]
    assert all(not b.any() for b in buffers)  # still zero: the skipped first step left them alone
    step.loss_scale.scale.fill_(1024.0)
    step.loss_scale.growth_interval = 1
    step(*_batch(4))
    moved = sum(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    assert moved == len(list(model.parameters()))
    assert float(step.loss_scale.scale) == 2048.0  # a clean step after growth_interval clean steps doubles it


def test_fp16_needs_fused_optimizers_and_amp_must_be_known():
    with pytest.raises(ValueError, match="fused=True"):
        DualStep(_pair(), amp="fp16", fused=False)
    with pytest.raises(ValueError, match="amp must be one of"):
        DualStep(_pair(), amp="fp8")


def test_reference_losses_give_the_fused_step():
    model = _pair(torch.float64)
    twin = copy.deepcopy(model)
    twin.fused_losses = False
    images, target = _batch(6)
    DualStep(model, adv_lr=1e-3)(images.double(), target)
    DualStep(twin, adv_lr=1e-3)(images.double(), target)
    _assert_same_parameters(model, twin, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("names", [("resnet20", "resnet20"), ("resnet20", "wrn-16-2", "resnet32")])
def test_batched_dual_backward_gives_the_same_gradient_sets(names):
    torch.manual_seed(0)
    model = AFDModel([build_network(n, 10) for n in names], method="afd", topology="cyclic").double()
    images, target = _batch(6)
    torch.manual_seed(1)
    separate = gradient_sets(model, model(images.double(), target))
    batched = gradient_sets(model, model(images.double(), target, cut_at_features=True))
    assert [len(p) for p, _ in separate] == [len(p) for p, _ in batched]
    for (params, a), (_, b) in zip(separate, batched):
        for p, ga, gb in zip(params, a, b):
            torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-12)
    twin = copy.deepcopy(model)
    DualStep(model, adv_lr=1e-3, batched_backward=True)(images.double(), target)
    DualStep(twin, adv_lr=1e-3)(images.double(), target)
    _assert_same_parameters(model, twin, rtol=1e-9, atol=1e-11)


def test_l1_methods_train_their_transfer_layers():
    torch.manual_seed(0)
    model = AFDModel([build_network("resnet20", 10), build_network("wrn-16-2", 10)], method="l1", topology="pair")
    transfers = [p for p in model.transfers.parameters()]
    assert transfers  # 64 -> 128 channels
    before = [p.detach().clone() for p in transfers]
    DualStep(model, lr=0.1)(*_batch(4))
    assert all(not torch.equal(a, p) for a, p in zip(before, transfers))


def test_resume_keeps_how_this_run_steps():
    plain = DualStep(_pair(), lr=0.125, adv_lr=2 ** -10, fused=False)
    plain(*_batch(4))
    model = _pair().to(memory_format=torch.channels_last)
    fused = DualStep(model, lr=0.5, adv_lr=0.5, amp="fp16")
    fused.load_state_dict(plain.state_dict())
    for opt in fused.optimizers.values():
        group = opt.param_groups[0]
        assert group["fused"] and isinstance(group["lr"], torch.Tensor)
        for p in group["params"]:
            for value in opt.state[p].values():
                if value.shape == p.shape:
                    assert value.stride() == p.stride()  # the loaded moments follow this run's layout
    assert float(fused.optimizers["logit"].param_groups[0]["lr"]) == 0.125
    fused(*_batch(4))  # steps with found_inf on the fused optimizers
