"""The weight EMA (afd_fast/ema.py) against a hand-written update in float64, at every step of its
warm-up, with and without --model-ema-every."""
import copy

import pytest
import torch

from afd_fast.ema import WeightEMA
from afd_fast.model import AFDModel
from afd_fast.models.cifar import CifarResNet


def _model(method="afd", seed=0):
    torch.manual_seed(seed)
    return AFDModel([CifarResNet(8, 10), CifarResNet(8, 10)], method, "pair", 8).double()


def _followed(model) -> dict[str, torch.Tensor]:
    """By hand: the networks' parameters and buffers (not the transfer layers' nor the discriminators')."""
    return {n: t for n, t in model.state_dict().items() if n.startswith("networks.")}


def _fake_step(model, g):
    """What a training step does to the followed tensors: new weights and statistics, one more batch."""
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, dtype=t.dtype, generator=g))
            else:
                t.add_(1)


@pytest.mark.parametrize("every", [1, 3])
def test_the_ema_follows_the_hand_written_rule_through_its_warm_up(every):
    model, g = _model(), torch.Generator().manual_seed(1)
    decay = 0.6  # (1 + t) / (10 + t) reaches it at t = 12.5: the warm-up and the capped rule both run
    ema = WeightEMA(model, decay, every=every)
    expected = {n: t.clone() for n, t in _followed(model).items()}  # the copy starts at the weights
    untouched = {n: t.clone() for n, t in ema.model.state_dict().items() if not n.startswith("networks.")}
    t = 0
    for step in range(16 * every):
        _fake_step(model, g)
        ema.update()
        for n, w in _followed(model).items():
            if not w.is_floating_point():
                expected[n] = w.clone()  # batch counts: copied at every step
            elif step % every == 0:
                d = min(decay, (1 + t) / (10 + t))
                expected[n] = d * expected[n] + (1 - d) * w
        t += step % every == 0
        got = ema.model.state_dict()
        for n, value in expected.items():
            assert torch.equal(got[n], value), (step, n)
    assert int(ema.updates) == t == 16 and int(ema.steps) == 16 * every
    assert min(decay, (1 + 15) / (10 + 15)) == decay  # the last updates ran at the full decay
    # the transfer layers and discriminators are not followed; the copy trains nothing
    assert all(torch.equal(ema.model.state_dict()[n], v) for n, v in untouched.items())
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_the_ema_resumes_exactly_from_its_state_dict():
    model, g = _model(), torch.Generator().manual_seed(2)
    ema = WeightEMA(model, 0.9, every=2)
    for _ in range(5):
        _fake_step(model, g)
        ema.update()
    saved_model = {n: t.clone() for n, t in model.state_dict().items()}
    saved_ema, saved_draws = copy.deepcopy(ema.state_dict()), g.get_state()  # (a checkpoint copies it)
    for _ in range(4):  # the run goes on ...
        _fake_step(model, g)
        ema.update()
    resumed = _model(seed=3)  # ... and is resumed from the saved state in another process
    resumed.load_state_dict(saved_model)
    other = WeightEMA(resumed, 0.9, every=2)
    held = other.persistent_tensors()
    other.load_state_dict(saved_ema)
    assert all(held[n] is t for n, t in other.persistent_tensors().items())  # in place: a graph may hold them
    g.set_state(saved_draws)
    for _ in range(4):
        _fake_step(resumed, g)
        other.update()
    for (n, a), b in zip(ema.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert int(other.updates) == int(ema.updates) == 5


def test_one_shares_its_low_layers_and_follows_its_gate():
    torch.manual_seed(0)
    model = AFDModel([CifarResNet(8, 10), CifarResNet(8, 10)], "one", "pair", 8)
    ema = WeightEMA(model, 0.5)
    shared = model.networks[0].low_level_modules[0]
    a, b = dict(ema.model.networks[0].named_parameters()), dict(ema.model.networks[1].named_parameters())
    name = next(n for n in a if n.startswith(shared))
    assert a[name] is b[name]  # one tensor in the copy too: averaged once per update
    before = [p.clone() for p in ema.model.gate.parameters()]
    _fake_step(model, torch.Generator().manual_seed(0))
    ema.update()
    assert all(not torch.equal(p, q) for p, q in zip(ema.model.gate.parameters(), before))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(_model(), 1.0)
    with pytest.raises(ValueError, match="every"):
        WeightEMA(_model(), 0.9, every=0)


def test_the_training_step_updates_the_ema_after_its_optimizer_steps():
    """DualStep(model_ema=...): after each real step (float64), the EMA is the hand-written average of
    the weights that step produced."""
    from afd_fast.step import DualStep

    model = _model()
    step = DualStep(model, lr=0.1, adv_lr=1e-3, model_ema=0.5, model_ema_every=1)
    expected = {n: t.clone() for n, t in _followed(model).items()}
    g = torch.Generator().manual_seed(0)
    for t in range(3):
        images, target = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
        step(images, target)
        d = min(0.5, (1 + t) / (10 + t))
        for n, w in _followed(model).items():
            expected[n] = d * expected[n] + (1 - d) * w if w.is_floating_point() else w.clone()
    got = step.ema.model.state_dict()
    assert all(torch.equal(got[n], v) for n, v in expected.items())
    assert not all(torch.equal(got[n], w) for n, w in _followed(model).items())  # an average, not the weights
