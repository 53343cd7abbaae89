"""Weight decay by parameter kind (--norm-weight-decay, --bias-weight-decay): which parameters are
norms and biases, and that no decay reaches them when asked, in SGD and in the adversarial Adam sets."""
import pytest
import torch
from torch import nn

from afd_fast.model import AFDModel
from afd_fast.models.cifar import CifarResNet
from afd_fast.step import DualStep, parameter_kinds


def _afd_pair():
    torch.manual_seed(0)
    model = AFDModel([CifarResNet(8, 10), CifarResNet(8, 10)], "afd", "pair", 8)
    with torch.no_grad():  # no zero parameter (the heads' biases start at 0): the decay moves every one
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    return model


def test_parameter_kinds_split_as_torchvision_reference_scripts_do():
    class RmsNorm(nn.Module):  # a norm that is no torch class (as timm's): found by its name
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4),
                          RmsNorm(), nn.Conv2d(4, 4, 1, bias=False))
    kinds = parameter_kinds(model)
    named = {n: kinds[id(p)] for n, p in model.named_parameters()}
    assert named == {"0.weight": "weight", "0.bias": "bias", "1.weight": "norm", "1.bias": "norm",
                     "2.weight": "weight", "2.bias": "bias", "3.weight": "norm", "3.bias": "norm",
                     "4.weight": "norm", "4.bias": "norm", "5.weight": "norm", "6.weight": "weight"}


def _decayed(step: DualStep) -> dict[str, set[str]]:
    """Per optimizer, which kinds of parameter moved in one step with zero gradients (only the decay acts)."""
    kinds = parameter_kinds(step.model)
    moved = {}
    for name, opt in step.optimizers.items():
        params = [p for g in opt.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        moved[name] = {kinds[id(p)] for p, b in zip(params, before) if not torch.equal(p.detach(), b)}
        for p in params:
            p.grad = None
    return moved


def test_no_decay_reaches_norms_or_biases_when_asked():
    step = DualStep(_afd_pair(), lr=0.1, weight_decay=0.1, adv_lr=0.1, adv_weight_decay=0.1,
                    norm_weight_decay=0.0, bias_weight_decay=0.0)
    kinds = parameter_kinds(step.model)
    held = {name: {kinds[id(p)] for g in opt.param_groups for p in g["params"]}
            for name, opt in step.optimizers.items()}
    assert held == {"logit": {"weight", "norm", "bias"}, "generator": {"weight", "norm"},
                    "discriminator": {"weight", "norm", "bias"}}
    assert _decayed(step) == {"logit": {"weight"}, "generator": {"weight"}, "discriminator": {"weight"}}


def test_each_kind_takes_its_own_decay_and_the_default_decays_everything():
    step = DualStep(_afd_pair(), weight_decay=0.1, adv_weight_decay=0.2, norm_weight_decay=0.0)
    groups = {name: [(g["weight_decay"], len(g["params"])) for g in opt.param_groups]
              for name, opt in step.optimizers.items()}
    assert [d for d, _ in groups["logit"]] == [0.1, 0.0] and [d for d, _ in groups["generator"]] == [0.2, 0.0]
    plain = DualStep(_afd_pair(), weight_decay=0.1, adv_weight_decay=0.2)  # the paper's: one group, decay on all
    assert all(len(opt.param_groups) == 1 for opt in plain.optimizers.values())
    # every parameter decays (the generator set holds no bias: the heads are not in it)
    assert _decayed(plain) == {"logit": {"weight", "norm", "bias"}, "generator": {"weight", "norm"},
                               "discriminator": {"weight", "norm", "bias"}}
