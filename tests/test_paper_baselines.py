"""The comparisons of the paper's tables mean what the paper's rows mean: DML and ONE as their
authors define them, offline L1+KD with a frozen teacher, the recipes and parameter counts the paper
states, the global batch under several processes."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from afd_fast import train
from afd_fast.model import AFDModel
from afd_fast.step import DualStep, gradient_sets
from afd_fast.models import build_network
from afd_fast.models.cifar import CifarResNet


def _batch(n=6, size=16, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _nets(k, seed=0, depth=8):
    torch.manual_seed(seed)
    return [CifarResNet(depth, 10) for _ in range(k)]


# --- DML --------------------------------------------------------------------------------------------

def _kl_towards_peers(preds, k, t):
    """DML's distillation term of network k: T² · the mean over the peers of KL(p_j || p_k), peers detached."""
    peers = [j for j in range(len(preds)) if j != k]
    return t * t * sum(F.kl_div(F.log_softmax(preds[k] / t, 1), F.softmax(preds[j].detach() / t, 1),
                                reduction="batchmean") for j in peers) / len(peers)


def _handwritten_sync_dml_step(nets, optimizers, images, target, temperature):
    """DML as the common PyTorch code runs it: one forward of every network on the batch, then each
    network in turn steps on CE + its KL towards the others' predictions of that forward."""
    preds = [n(images)[1] for n in nets]
    for k, optimizer in enumerate(optimizers):
        optimizer.zero_grad()
        (F.cross_entropy(preds[k], target) + _kl_towards_peers(preds, k, temperature)).backward()
        optimizer.step()


def _handwritten_alternate_update(nets, optimizers, k, images, target, temperature):
    """DML as its authors' released code runs it (Deep-Mutual-Learning, train_models.py: one session
    run per network, each on the next batch of the queue): a forward of every network on this batch
    in training mode, network k steps on CE + the mean KL towards the others' predictions; only
    network k's batch-norm running statistics change."""
    saved = [{name: b.clone() for name, b in net.named_buffers()} for net in nets]
    preds = [n(images)[1] for n in nets]
    for j, net in enumerate(nets):
        if j != k:  # the peers' update ops are not in network k's train op
            for name, b in net.named_buffers():
                b.copy_(saved[j][name])
    optimizers[k].zero_grad()
    (F.cross_entropy(preds[k], target) + _kl_towards_peers(preds, k, temperature)).backward()
    optimizers[k].step()


def _assert_same_networks(nets, twins):
    for net, twin in zip(nets, twins):
        for (name, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("k,temperature", [(2, 1.0), (3, 3.0)])
def test_dml_step_equals_handwritten_dml(k, temperature):
    """--method dml: one forward, every network steps on its own loss (running statistics included),
    in float64; --temperature with T²."""
    nets = [n.double() for n in _nets(k)]
    twins = copy.deepcopy(nets)
    model = AFDModel(nets, method="dml", topology="cyclic", image_size=16, temperature=temperature)
    step = DualStep(model, lr=0.1, weight_decay=1e-4)
    assert step.batches_per_call == 1
    optimizers = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for n in twins]
    for index in range(2):  # the second step through the momentum buffers
        images, target = _batch(seed=index)
        losses = step(images.double(), target)
        _handwritten_sync_dml_step(twins, optimizers, images.double(), target, temperature)
        assert losses["ce"].shape == losses["kl"].shape == (k,)
        _assert_same_networks(nets, twins)


@pytest.mark.parametrize("k", [2, 3])
def test_alternating_dml_iteration_equals_handwritten_updates_in_turn(k):
    """--dml-update alternate: one call is one iteration, network n updating on the n-th of K batches
    (concatenated); the peers' running statistics stay as they are."""
    nets = [n.double() for n in _nets(k)]
    twins = copy.deepcopy(nets)
    model = AFDModel(nets, method="dml", topology="cyclic", image_size=16)
    assert model.temperature == 1.0  # the DML paper's plain softmaxes
    step = DualStep(model, lr=0.1, weight_decay=1e-4, dml_update="alternate")
    assert step.batches_per_call == k
    optimizers = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for n in twins]
    for iteration in range(2):  # each network twice: the second time through its momentum buffers
        batches = [_batch(seed=iteration * k + n) for n in range(k)]  # every update its own batch
        losses = step(torch.cat([x for x, _ in batches]).double(), torch.cat([y for _, y in batches]))
        for n, (images, target) in enumerate(batches):
            _handwritten_alternate_update(twins, optimizers, n, images.double(), target, 1.0)
        assert losses["ce"].shape == losses["kl"].shape == (k,)
        _assert_same_networks(nets, twins)


def test_sync_dml_of_a_pair_is_the_kd_only_step_and_alternate_is_not():
    """For two networks DML's peer mean is the pair's one peer: the same update as kd-only at the
    same T. The alternating form steps network 2 on the next batch instead."""
    nets = [n.double() for n in _nets(2)]
    models = {name: AFDModel(copy.deepcopy(nets), method=method, topology="pair", temperature=3.0)
              for name, method in (("sync", "dml"), ("alternate", "dml"), ("kd-only", "kd-only"))}
    images, target = _batch()
    DualStep(models["sync"], lr=0.1)(images.double(), target)
    DualStep(models["kd-only"], lr=0.1)(images.double(), target)
    DualStep(models["alternate"], lr=0.1, dml_update="alternate")(images.double(), target)  # 3 images each
    for a, b in zip(models["sync"].parameters(), models["kd-only"].parameters()):
        assert torch.equal(a, b)
    assert not any(torch.equal(a, b) for a, b in zip(models["sync"].parameters(), models["alternate"].parameters())
                   if a.dim() > 1)
    with pytest.raises(ValueError, match="method dml only"):
        DualStep(models["kd-only"], dml_update="alternate")


def test_dml_temperature_defaults_to_one_and_the_flag_overrides_it():
    assert train.parse_args(["--method", "dml", "--device", "cpu"]).temperature == 1.0
    assert train.parse_args(["--method", "dml", "--temperature", "3", "--device", "cpu"]).temperature == 3.0
    assert train.parse_args(["--method", "kd-only", "--device", "cpu"]).temperature == 3.0


# --- ONE --------------------------------------------------------------------------------------------

def _one(k=2, seed=0):
    return AFDModel(_nets(k, seed), method="one", image_size=16).double()


def test_one_branches_share_the_low_layers_and_export_whole_networks():
    model = _one(3)
    first = model.networks[0]
    for net in model.networks[1:]:
        assert all(getattr(net, m) is getattr(first, m) for m in first.low_level_modules)
        assert net.layer3 is not first.layer3 and net.fc is not first.fc
    params = model.logit_parameters()
    assert len({id(p) for p in params}) == len(params)
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}  # everything trains, once
    model.eval()
    images, _ = _batch()
    alone = CifarResNet(8, 10).double().eval()
    alone.load_state_dict(model.networks[2].plain_state_dict())
    torch.testing.assert_close(alone(images.double())[1], model.predict(images.double())["net2"])


def test_one_gate_weights_the_branches_into_the_ensemble():
    model = _one(3).eval()
    images, _ = _batch()
    x = images.double()
    shared = model.networks[0].low_level(x)
    gate = model.gate(shared)
    assert gate.shape == (6, 3) and torch.all(gate >= 0)
    torch.testing.assert_close(gate.sum(1), torch.ones(6, dtype=torch.float64))
    predicted = model.predict(x)
    expected = sum(gate[:, k:k + 1] * predicted[f"net{k}"] for k in range(3))
    torch.testing.assert_close(predicted["gated_ensemble"], expected)


def test_one_loss_and_the_detached_teacher():
    """ONE's loss (Lan et al., 2018): CE of every branch and of the gated ensemble, plus T² KL from the
    detached ensemble to each branch. The KL terms send no gradient into the teacher: the gate learns
    from the ensemble's CE alone."""
    model = _one(2)
    images, target = _batch()
    x, t = images.double(), target
    params = model.logit_parameters()
    (got,) = [g for _, g in gradient_sets(model, model(x, t))]

    shared = model.networks[0].low_level(x)
    z = [n.head(n.high_level(shared)) for n in model.networks]
    gate = model.gate(shared)
    ensemble = gate[:, :1] * z[0] + gate[:, 1:] * z[1]
    teacher = F.softmax(ensemble.detach() / 3, 1)
    kl = sum(F.kl_div(F.log_softmax(zk / 3, 1), teacher, reduction="batchmean") for zk in z)
    loss = sum(F.cross_entropy(zk, t) for zk in z) + F.cross_entropy(ensemble, t) + 9 * kl
    expected = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    for p, a, b in zip(params, got, expected):
        torch.testing.assert_close(a, torch.zeros_like(p) if b is None else b, rtol=1e-9, atol=1e-12)

    gate_params = list(model.gate.parameters())
    from_kl = torch.autograd.grad(kl, gate_params, allow_unused=True, retain_graph=True)
    assert all(g is None for g in from_kl)  # not even a zero: the teacher is outside the KL's graph
    from_ce = torch.autograd.grad(F.cross_entropy(ensemble, t), gate_params)
    for g, p in zip(from_ce, gate_params):
        torch.testing.assert_close(got[[id(q) for q in params].index(id(p))], g, rtol=1e-9, atol=1e-12)


def test_one_needs_one_cifar_architecture_k_times(capsys):
    with pytest.raises(ValueError, match="same network K times"):
        AFDModel([build_network("resnet20", 10), build_network("resnet32", 10)], method="one")
    with pytest.raises(ValueError, match="no such split"):
        AFDModel([build_network("resnet18", 10) for _ in range(2)], method="one")
    for archs in ("resnet20,resnet32", "resnet18,resnet18"):
        with pytest.raises(SystemExit):
            train.parse_args(["--method", "one", "--arch", archs, "--device", "cpu"])
        assert "shares the low layers" in capsys.readouterr().err


def test_one_step_is_capturable():
    """tests/test_capture_safety.py runs the methods on mixed architectures, which ONE cannot
    train: the same checks here, on identical networks."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_capture_safety import Case, CaptureChecker, build_step, run_checked

    for amp in ("off", "fp16"):
        step, images, target = build_step(Case(method="one", archs=("resnet8", "resnet8"), amp=amp))
        checker = CaptureChecker()
        run_checked(step, images, target, checker)
        checker.assert_replayable()
        names = {op.name for op in checker.traces[0]}
        assert {"afd_fast.mutual_distillation_forward.default", "aten._fused_sgd_.tensor_lr"} <= names


# --- offline L1+KD ------------------------------------------------------------------------------------

def test_offline_teacher_stays_frozen_and_only_the_student_learns():
    torch.manual_seed(0)
    student, teacher = build_network("wrn-16-2", 10), build_network("resnet20", 10)  # 128 -> 64 channels
    model = AFDModel([student, teacher], method="l1kd-offline", image_size=16)
    frozen = copy.deepcopy(teacher.state_dict())
    conv = model.transfers[0][0]
    assert (conv.in_channels, conv.out_channels) == (128, 64)  # the student's map into the teacher's space
    assert isinstance(model.transfers[1], torch.nn.Identity)
    trained = {id(p) for p in model.logit_parameters()}
    assert not any(id(p) in trained for p in teacher.parameters())
    student_before = copy.deepcopy(student.state_dict())
    step = DualStep(model, lr=0.1)
    for seed in range(2):
        model.train()
        assert not teacher.training and student.training
        losses = step(*_batch(seed=seed))
    assert losses["l1"].shape == (1,) and losses["kl"][1] == 0 and losses["kl"][0] > 0
    for name, value in teacher.state_dict().items():  # weights and batch-norm statistics
        assert torch.equal(value, frozen[name]), name
    assert any(not torch.equal(v, student_before[n]) for n, v in student.state_dict().items())


def test_offline_needs_the_teacher_weights(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "l1kd-offline", "--device", "cpu"])
    assert "pre-trained teacher" in capsys.readouterr().err


# --- what the paper states ------------------------------------------------------------------------------

def test_cifar_recipe_is_the_papers_text():
    """§4: 300 epochs, batch 128; SGD lr 0.1 x0.1 at 150 and 225, momentum 0.9, weight decay 1e-4;
    Adam lr 2e-5 x0.1 at 75 and 150, weight decay 1e-1; T = 3."""
    config = train.parse_args(["--recipe", "cifar-paper", "--device", "cpu"])
    assert (config.epochs, config.batch_size, config.temperature, config.image_size) == (300, 128, 3.0, 32)
    _, step, _, rates = train.build_training(config, 100, 1, torch.device("cpu"), steps_per_epoch=391)
    sgd = step.optimizers["logit"].param_groups[0]
    assert (float(sgd["lr"]), sgd["momentum"], sgd["nesterov"], sgd["weight_decay"]) == (0.1, 0.9, False, 1e-4)
    assert (rates.schedules["logit"].milestones, rates.schedules["logit"].decay) == ((150, 225), 0.1)
    for name in ("generator", "discriminator"):
        adam = step.optimizers[name].param_groups[0]
        assert (float(adam["lr"]), adam["weight_decay"]) == (pytest.approx(2e-5), 0.1), name
        assert (rates.schedules[name].milestones, rates.schedules[name].decay) == ((75, 150), 0.1)
    # the rates the optimizers get: the step schedule of the text, epoch by epoch
    for epoch, sgd_rate, adam_rate in ((0, 0.1, 2e-5), (74, 0.1, 2e-5), (75, 0.1, 2e-6), (149, 0.1, 2e-6),
                                       (150, 0.01, 2e-7), (225, 0.001, 2e-7), (299, 0.001, 2e-7)):
        applied = rates.apply(epoch * 391)
        assert (applied["logit"], applied["generator"]) == (pytest.approx(sgd_rate), pytest.approx(adam_rate)), epoch


def test_imagenet_recipe_trains_the_papers_30_epochs():
    config = train.parse_args(["--recipe", "imagenet-paper", "--arch", "resnet18,resnet34", "--device", "cpu"])
    assert (config.epochs, config.image_size, config.adv_lr) == (30, 224, 2e-5)


def test_imagenet_scratch_recipe_is_torchvisions_resnet_reference():
    """torchvision's ResNet reference: 90 epochs, SGD 0.1 per 256 images, x0.1 at 30 and 60, momentum 0.9,
    weight decay 1e-4, 224 px; the adversarial side as the paper."""
    config = train.parse_args(["--recipe", "imagenet-scratch", "--arch", "resnet18,resnet34", "--device", "cpu",
                               "--batch-size", "1024"])
    assert (config.epochs, config.image_size, config.milestones, config.lr_decay) == (90, 224, (30, 60), 0.1)
    assert (config.momentum, config.weight_decay, config.effective_lr) == (0.9, 1e-4, pytest.approx(0.4))
    assert (config.adv_lr, config.adv_weight_decay) == (2e-5, 0.1)


@pytest.mark.parametrize("arch,millions", [("wrn-16-2", 0.70), ("wrn-28-4", 5.87)])
def test_parameter_counts_the_paper_quotes(arch, millions):
    """§4.4: WRN-16-2 has 0.70M parameters, WRN-28-4 5.87M (CIFAR-100)."""
    count = sum(p.numel() for p in build_network(arch, 100).parameters())
    assert round(count / 1e6, 2) == millions


# --- the global batch -------------------------------------------------------------------------------------

def test_batch_size_is_the_global_batch(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = train.parse_args(["--batch-size", "32", "--device", "cpu"])
    assert (config.batch_size, config.batch_per_process) == (32, 16)
    with pytest.raises(SystemExit):
        train.parse_args(["--batch-size", "31", "--device", "cpu"])
    assert "must split evenly over the 2 processes" in capsys.readouterr().err


def test_learning_rate_scales_only_when_asked():
    common = ["--recipe", "cifar-paper", "--batch-size", "256", "--device", "cpu"]
    assert train.parse_args(common).effective_lr == 0.1  # the recipe's rate, whatever the batch
    scaled = train.parse_args(common + ["--lr-scaling", "linear"])
    assert scaled.effective_lr == pytest.approx(0.2) and scaled.adv_lr == 2e-5


# --- on a GPU: the baselines in one CUDA graph --------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("method,dml_update", [("dml", "sync"), ("dml", "alternate"), ("one", "sync"),
                                               ("l1kd-offline", "sync")])
def test_graph_replay_of_the_baselines_trains_as_the_eager_step(method, dml_update, monkeypatch):
    """DML (both forms: alternating DML's iteration of K one-network updates is one graph), ONE's
    gate and the frozen teacher replay as CUDA graphs exactly as they run eagerly."""
    from afd_fast.graph import GraphedStep

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    model = AFDModel([build_network("resnet20", 10) for _ in range(2)], method=method, topology="pair").cuda()
    model = model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    graphed = GraphedStep(DualStep(model, lr=0.05, capturable=True, dml_update=dml_update), warmup=2)
    eager = DualStep(twin, lr=0.05, dml_update=dml_update)
    g = torch.Generator(device="cuda").manual_seed(0)
    batch = 16 * eager.batches_per_call
    for _ in range(4):  # 2 warm-up steps and 2 replays
        images = torch.randn(batch, 3, 32, 32, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 10, (batch,), device="cuda", generator=g)
        out = {k: v.clone() for k, v in graphed(images, target).items()}
        torch.testing.assert_close(out["ce"], eager(images, target)["ce"], rtol=1e-5, atol=1e-6)
    assert graphed.captures == 1 and not graphed.disabled
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
