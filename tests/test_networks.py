"""Your own networks (issue 14): every torchvision classifier and timm models as peers, split into G and
head by rule; heterogeneous maps (channels and space) through the transfer layers; pretrained starts.

Speed: building all 80 torchvision classifiers with real weights takes over two minutes on the 2-core
CPU VM (their initialisation alone). So every classifier is built on the meta device (parameters
without storage: torchvision's own builders, only the factories that make parameters and buffers
redirected), split there (the trace and one forward on meta tensors at 224 px), put into AFDModel
there (the map shapes from a forward on meta tensors at the test's size), and only then given real
values: a fixed random pattern, no initialiser (``_Filler``). Then every classifier but the refused
ViTs runs one real forward and backward through AFDModel with a peer at 32 px, batch 2 (Inception v3
at 96 px, AlexNet at 64, MaxViT, built for 224 px only, at 224). Measured on the 2-core VM under
load: ~140 s for the 80 (~90 s more than the split on meta alone and one network per family), of
which RegNet-Y 128GF takes ~26 s and ~9 GB at its peak (644M parameters; AFD's discriminators for
its 7392-channel map hold 2 x 246M more), so its gradients are checked and dropped one tensor at a
time (``_finite_gradients``).
"""
from __future__ import annotations

import os
import re
import urllib.error

import pytest
import torch
import torchvision
from torch.overrides import TorchFunctionMode

from afd_fast import train
from afd_fast.errors import AfdFastError, ConfigError
from afd_fast.model import AFDModel
from afd_fast.models import (TORCHVISION_NETWORKS, UnsplittableNetwork, WeightsNotFound, build_network,
                             network_problem, parse_pretrained)
from afd_fast.models.cifar import CifarResNet
from afd_fast.models.library import GraphSplitNetwork, _torchvision_kwargs, torchvision_weight_file
from afd_fast.step import DualStep, gradient_sets

try:
    import timm
except ImportError:  # CI installs it ([dev]); without it only the timm tests skip
    timm = None
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed (pip install timm)")

CLASSES = 10
# the smallest sizes these take: Inception v3's stem needs 75 px; MaxViT is built for 224 px only
SIZES = {"inception_v3": 96, "maxvit_t": 224, "alexnet": 64}
CLASSIFIER = ("fc", "classifier", "head", "heads")  # torchvision's names of the final classifier


@pytest.fixture(scope="module", autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: a second thread buys nothing on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


class _MetaParameters(TorchFunctionMode):
    """Tensor factories called without a device make meta tensors (parameters and buffers); index
    arithmetic in constructors (RegNet's widths, Swin's position indices: arange, round, ...) stays on
    the CPU."""

    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.randn, torch.rand}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _meta_plain(name: str) -> torch.nn.Module:
    with _MetaParameters():
        model = torchvision.models.get_model(name, weights=None, num_classes=CLASSES, **_torchvision_kwargs(name))
    return model.to("meta")


def _classifier(model: torch.nn.Module) -> torch.nn.Module:
    return next(getattr(model, a) for a in CLASSIFIER if hasattr(model, a))


# the image size of the real forward and backward: the smallest that every network takes (maps of 1x1);
# SIZES: those that need more
SIZE = 32


class _Filler:
    """Small random values for meta tensors, fast: a fixed random pattern (a prime length, so that rows
    and channels do not repeat it in step) from a moving offset instead of an initialiser per tensor
    (normal_ alone takes ~15 s for RegNet-Y 128GF's 644M parameters here). Weights of two or more
    dimensions get the standard deviation 1/sqrt(fan-in), 1-d weights (normalisation scales) 1 plus
    5 % noise, biases 5 % noise, batch-norm statistics 0 and 1: the signal keeps its scale through
    any depth, so the logits depend on the image and comparing them means something."""

    LENGTH = 65521

    def __init__(self):
        self.pattern = torch.randn(self.LENGTH, generator=torch.Generator().manual_seed(0))
        self.offset = 0
        self.made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta tensor) -> (it, the real one)

    def noise(self, n: int) -> torch.Tensor:
        o = self.offset % self.LENGTH
        self.offset += 7919
        return self.pattern.repeat((o + n) // self.LENGTH + 1)[o:o + n]

    def real(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """The real tensor (a parameter for a parameter) for ``t``, held under ``key``."""
        if id(t) in self.made:  # a tensor that two modules hold stays one tensor (one parameter)
            return self.made[id(t)][1]
        real = torch.empty(t.shape, dtype=t.dtype)
        if key == "running_var":
            real.fill_(1.0)
        elif not t.is_floating_point() or key == "running_mean" or real.numel() == 0:
            real.zero_()
        elif t.dim() >= 2:
            real.view(-1).copy_(self.noise(real.numel())).mul_(t[0].numel() ** -0.5)
        else:
            real.copy_(self.noise(real.numel())).mul_(0.05).add_(1.0 if key == "weight" else 0.0)
        if isinstance(t, torch.nn.Parameter):
            real = torch.nn.Parameter(real, t.requires_grad)
        self.made[id(t)] = (t, real)
        return real


def _materialised(*models: torch.nn.Module) -> torch.nn.Module:
    """Meta-built models with real tensors (:class:`_Filler`); a tensor shared by several modules or
    models (a split network and the plain model it came from) gets one real tensor. Returns the first."""
    filler = _Filler()
    for model in models:
        for module in model.modules():
            for kind in ("_parameters", "_buffers"):
                for key, t in getattr(module, kind).items():
                    if t is not None and t.is_meta:
                        getattr(module, kind)[key] = filler.real(key, t)
    return models[0]


@pytest.mark.parametrize("name", sorted(TORCHVISION_NETWORKS))
def test_every_torchvision_classifier_splits_by_rule_and_trains(name):
    """Every torchvision classifier, built on the meta device (torchvision's own builder, only the
    factories of parameters and buffers redirected) and split there: the split keeps every parameter
    once, the head is exactly the plain model's classifier and the exported state_dict loads strictly
    into the plain model. ViTs are refused, naming the class token.

    Then with real values (:class:`_Filler`, no initialiser) at 32 px (Inception v3 96, AlexNet 64,
    MaxViT 224), batch 2: the exported state_dict holds the plain model's own tensors, the split
    computes the plain model's logits (which depend on the image), and one forward of AFDModel with a
    peer of other channels and spatial size (a CIFAR ResNet-20: 64x8x8) and the backward of each of
    its three losses w.r.t. its own parameter group (the trainer's gradient sets) give finite
    gradients, L_G none in the head. AFDModel's shapes come from a forward on meta tensors before the
    values are filled in."""
    plain = _meta_plain(name)
    if name.startswith("vit_"):
        with pytest.raises(UnsplittableNetwork, match="class token"):
            GraphSplitNetwork(name, plain, CLASSES)
        return
    net = GraphSplitNetwork(name, plain, CLASSES)
    assert {id(p) for p in net.parameters()} == {id(p) for p in plain.parameters()}
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())
    head = {id(p) for p in net.head_parameters()}
    assert head == {id(p) for p in _classifier(plain).parameters()}
    assert not head & {id(p) for p in net.extractor_parameters()}
    _meta_plain(name).load_state_dict(net.plain_state_dict(), strict=True)

    size = SIZES.get(name, SIZE)
    model = AFDModel([net, build_network("resnet20", CLASSES)], "afd", "pair", size)  # shapes on meta tensors
    _materialised(model, plain)
    assert {id(p) for p in net.parameters()} == {id(p) for p in plain.parameters()}  # still the same parameters
    exported, own = net.plain_state_dict(), plain.state_dict()
    assert all(exported[k].data_ptr() == own[k].data_ptr() for k in own)  # the plain model's own tensors
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    for mode in (True, False):  # training mode first: batch norm's batch statistics carry the image to the logits
        model.train(mode), plain.train(mode)
        with torch.no_grad():
            torch.manual_seed(2)  # the same dropout and stochastic depth draws on both sides
            feature_map, logits = net(x)
            torch.manual_seed(2)
            expected = plain(x)
        assert feature_map.dim() == 4 and feature_map.shape[1] == net.feature_channels
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        if mode:
            assert (logits[0] - logits[1]).abs().max() > 1e-2 * logits.abs().max()  # the logits see the image
    losses = model.train()(x, torch.tensor([1, 2]))
    for loss, params in [("logit", model.logit_parameters()), ("generator", model.generator_parameters()),
                         ("discriminator", model.discriminator_parameters())]:  # the trainer's gradient sets
        assert all(_finite_gradients(losses[loss], params)), loss
    to_head = torch.autograd.grad(losses["generator"], net.head_parameters(), allow_unused=True)
    assert all(g is None for g in to_head)  # L_G never reaches the head


def _finite_gradients(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[bool]:
    """The backward of ``loss`` into ``params``: whether each got a finite gradient. Each gradient is
    checked and dropped as soon as it is complete, so that a giant's (RegNet-Y 128GF: 644M parameters)
    never all exist at once; a NaN or inf anywhere makes its tensor's sum one."""
    finite = {}

    def check(p):
        finite[id(p)] = bool(p.grad.sum().isfinite())
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(check) for p in params]
    try:
        torch.autograd.backward(loss, inputs=params, retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    return [finite.get(id(p), False) for p in params]  # False: no gradient at all


# --- timm -----------------------------------------------------------------------------------------

TIMM = ["timm:resnet18", "timm:efficientnet_b0", "timm:convnext_atto", "timm:swin_tiny_patch4_window7_224"]


@needs_timm
@pytest.mark.parametrize("name", TIMM)
def test_timm_models_split_at_forward_features(name):
    net = build_network(name, CLASSES)
    plain = timm.create_model(name[5:], num_classes=CLASSES)
    plain.load_state_dict(net.plain_state_dict(), strict=True)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())
    classifier = {id(p) for p in net.model.get_classifier().parameters()}
    head = {id(p) for p in net.head_parameters()}
    assert classifier <= head and len(head) < len(list(net.parameters())) // 4
    size = 224 if "swin" in name else 64  # timm's Swin is built for its window grid at 224 px
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    net.eval(), plain.eval()
    feature_map, logits = net(x)
    assert feature_map.shape[1] == net.feature_channels  # channels first, also for Swin's channels-last maps
    torch.testing.assert_close(logits, plain(x))
    if size == 64:
        model = AFDModel([net, build_network("mobilenet_v3_small", CLASSES)], "afd", "pair", size).train()
        losses = model(x, torch.tensor([1, 2]))
        assert torch.autograd.grad(losses["generator"], net.head_parameters(), retain_graph=True,
                                   allow_unused=True) == tuple(None for _ in head)
        for _, grads in gradient_sets(model, losses):
            assert all(torch.isfinite(g).all() for g in grads)


@needs_timm
def test_timm_token_models_are_refused():
    with pytest.raises(UnsplittableNetwork, match="tokens"):
        build_network("timm:vit_tiny_patch16_224", CLASSES)


def test_names(monkeypatch):
    assert network_problem("mobilenet_v3_small") is None and network_problem("wrn-16-2") is None
    assert "known networks" in network_problem("resnet19")
    if timm is not None:
        assert "unknown timm model" in network_problem("timm:no_such_model")
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # as if timm were not installed
    assert "pip install timm" in network_problem("timm:resnet18")
    with pytest.raises(ConfigError, match="pip install timm"):
        build_network("timm:resnet18", CLASSES)


def test_a_slow_batch_norm_momentum_is_named_at_build(capsys):
    """torchvision builds MobileNet v3 with batch-norm momentum 0.01 (MNASNet: 0.0003): its running
    statistics, which evaluation uses, lag far behind the weights in a short run (the README's
    example, 124 steps: 10 % top-1 with them, 90 % with the same weights and recomputed statistics).
    The momentum stays torchvision's; a note at build time says so."""
    net = build_network("mobilenet_v3_small", CLASSES)
    out = capsys.readouterr().out
    assert "mobilenet_v3_small's batch norms" in out and "momentum 0.01" in out and "~100 steps" in out
    assert {m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}
    build_network("resnet18", CLASSES)
    assert "momentum" not in capsys.readouterr().out


def test_too_small_images_are_refused_at_start_up():
    with pytest.raises(ConfigError, match="inception_v3 cannot take 32 px images"):
        AFDModel([build_network("inception_v3", CLASSES), build_network("resnet18", CLASSES)], "afd", "pair", 32)


def test_transfer_layers_bring_maps_to_a_common_shape():
    """Channels to the largest, space pooled to the smallest; the offline teacher's map only pooled."""
    big, small = build_network("resnet20", CLASSES), build_network("mobilenet_v3_small", CLASSES)  # 64x8x8, 576x1x1
    model = AFDModel([big, small], "afd", "pair", 32)
    x = torch.randn(2, 3, 32, 32)
    maps = [t(n.features(x)) for t, n in zip(model.transfers, model.networks)]
    assert [tuple(m.shape) for m in maps] == [(2, 576, 1, 1)] * 2
    assert isinstance(model.transfers[0][0], torch.nn.AdaptiveAvgPool2d)
    offline = AFDModel([small, big], "l1kd-offline", "pair", 32)  # the teacher: resnet20, 64x8x8
    assert not list(offline.transfers[1].parameters())
    assert [tuple(t(n.features(x)).shape) for t, n in zip(offline.transfers, offline.networks)] == [(2, 64, 1, 1)] * 2


# --- pretrained starts -------------------------------------------------------------------------------

def _place_torchvision_weights(torch_home, name: str, tag: str = "DEFAULT", aux: bool = False) -> dict:
    """Weights of the right shapes under torchvision's file name in TORCH_HOME's hub cache."""
    w = torchvision.models.get_model_weights(name)[tag] if tag != "DEFAULT" else torchvision.models.get_model_weights(name).DEFAULT
    file, _ = torchvision_weight_file(w)
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    kwargs = {"aux_logits": True, "init_weights": False} if aux else {}
    state = torchvision.models.get_model(name, weights=None, num_classes=len(w.meta["categories"]), **kwargs).state_dict()
    torch.save(state, folder / file)
    return state


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch"


def test_torchvision_weights_load_strictly_from_the_cache(torch_home):
    state = _place_torchvision_weights(torch_home, "resnet18")
    net = build_network("resnet18", 1000, "torchvision")
    got = net.plain_state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_named_torchvision_weights_and_a_new_head(torch_home, capsys):
    state = _place_torchvision_weights(torch_home, "mobilenet_v3_small", "IMAGENET1K_V1")
    net = build_network("mobilenet_v3_small", CLASSES, "torchvision:IMAGENET1K_V1")
    assert "classifier.3.weight" in capsys.readouterr().out  # the note names the fresh head
    got = net.plain_state_dict()
    head = {"classifier.3.weight", "classifier.3.bias"}
    assert all(torch.equal(got[k], state[k]) for k in state if k not in head)
    assert got["classifier.3.weight"].shape == (CLASSES, 1024) and got.keys() == state.keys()


@pytest.mark.parametrize("classes", [1000, CLASSES])
def test_weights_that_do_not_fit_are_refused(torch_home, classes):
    """Strict: a weight file without one of the model's tensors stops the load (with the weights' own
    class count, and beside a new head)."""
    state = _place_torchvision_weights(torch_home, "resnet18")
    del state["layer1.0.conv1.weight"]
    file, folder = torchvision_weight_file(torchvision.models.ResNet18_Weights.DEFAULT)
    torch.save(state, os.path.join(folder, file))
    with pytest.raises(RuntimeError, match="layer1.0.conv1.weight"):
        build_network("resnet18", classes, "torchvision")


def test_googlenet_weights_with_their_auxiliary_heads(torch_home):
    """torchvision's file holds the auxiliary classifiers; its builder drops them after loading."""
    state = _place_torchvision_weights(torch_home, "googlenet", aux=True)
    net = build_network("googlenet", 1000, "torchvision")
    got = net.plain_state_dict()
    assert all(torch.equal(got[k], state[k]) for k in got) and any(k.startswith("aux1.") for k in state)


def test_missing_weights_name_the_file_and_folder(torch_home):
    file, folder = torchvision_weight_file(torchvision.models.ResNet34_Weights.DEFAULT)
    with pytest.raises(WeightsNotFound) as e:
        build_network("resnet34", CLASSES, "torchvision")
    assert file in str(e.value) and folder in str(e.value) and str(torch_home) in folder
    assert isinstance(e.value, AfdFastError)


def test_pretrained_entries(tmp_path):
    archs = ["resnet18", "timm:resnet18"]
    assert parse_pretrained("torchvision,timm", archs) == ("torchvision", "timm")
    assert parse_pretrained("torchvision", ["resnet18", "resnet34"]) == ("torchvision", "torchvision")
    assert parse_pretrained("torchvision:IMAGENET1K_V1,", archs) == ("torchvision:IMAGENET1K_V1", "")
    for value, message in [("torchvision:NOPE,", "no weights 'NOPE'"), ("timm,", "not a timm model"),
                           (",torchvision", "not a torchvision classifier"), ("a.pt,b.pt", "does not exist"),
                           ("x,y,z", "one entry per network")]:
        with pytest.raises(ConfigError, match=message):
            parse_pretrained(value, archs)


def _hf_cache(tmp_path, monkeypatch, repo: str, state: dict) -> None:
    """timm's weights in a Hugging Face cache layout (refs/main -> snapshots/<commit>/model.safetensors)."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    root = tmp_path / "hf" / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@needs_timm
def test_timm_weights_from_the_hugging_face_cache(tmp_path, monkeypatch, capsys):
    torch.manual_seed(4)
    state = timm.create_model("resnet18", num_classes=1000).state_dict()
    _hf_cache(tmp_path, monkeypatch, "timm/resnet18.a1_in1k", state)
    net = build_network("timm:resnet18", 1000, "timm:a1_in1k")
    got = net.plain_state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
    net = build_network("timm:resnet18", CLASSES, "timm:a1_in1k")
    assert "fc.weight" in capsys.readouterr().out and net.plain_state_dict()["fc.weight"].shape == (CLASSES, 512)
    assert torch.equal(net.plain_state_dict()["conv1.weight"], state["conv1.weight"])


@needs_timm
def test_missing_timm_weights_name_the_cache(tmp_path, monkeypatch):
    _hf_cache(tmp_path, monkeypatch, "timm/other", {"x": torch.zeros(1)})
    with pytest.raises(WeightsNotFound, match=r"resnet34\.a1_in1k.*models--timm--resnet34\.a1_in1k"):
        build_network("timm:resnet34", CLASSES, "timm:a1_in1k")


# --- the trainer CLI: heterogeneous peers ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from afd_fast.data import synthetic_image_folder
    return synthetic_image_folder(str(tmp_path_factory.mktemp("data") / "tiny"), num_classes=4,
                                  train_per_class=4, val_per_class=1, size=32)


@pytest.mark.parametrize("arch,method", [
    ("mobilenet_v3_small,resnet18", "afd"), ("efficientnet_b0,resnet34", "dml"), ("convnext_tiny,resnet50", "kd"),
    ("mobilenet_v3_small,resnet18", "l1kd"),
    pytest.param("shufflenet_v2_x0_5,resnet20,timm:efficientnet_b0", "afd", marks=needs_timm),  # a cyclic trio
])
def test_heterogeneous_peers_train_through_the_cli(tmp_path, tiny_data, arch, method):
    out = str(tmp_path / "out")
    summary = train.main(["--data", tiny_data, "--output", out, "--workers", "0", "--batch-size", "4", "--epochs", "1",
                          "--max-steps", "2", "--image-size", "32", "--arch", arch, "--method", method,
                          "--print-every", "1000"])
    assert summary["steps"] == 2 and 0 <= summary["net_mean_top1"] <= 100
    names = arch.split(",")
    for i, name in enumerate(names):
        assert os.path.exists(os.path.join(out, f"network{i}_{name}.pt"))


def test_each_network_takes_its_own_image_size():
    """--network-image-sizes: network i sees the batch resized to its own size (bilinear, antialiased),
    in the training forward, in alternating DML's updates and in evaluation; the maps of other spatial sizes meet
    through the transfer layers, and the discriminators are built from the shapes each size gives."""
    torch.manual_seed(0)
    nets = [build_network("resnet20", CLASSES), build_network("resnet20", CLASSES)]
    model = AFDModel(nets, "afd", "pair", [32, 16]).eval()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    got = model.predict(x)
    torch.testing.assert_close(got["net0"], nets[0](x)[1])
    torch.testing.assert_close(got["net1"], nets[1](small)[1])
    assert not torch.allclose(nets[1](x)[1], got["net1"])  # the resize is not a no-op
    # resnet20's maps: 64 x 8 x 8 at 32 px, 64 x 4 x 4 at 16 px: the first is pooled to 4 x 4
    assert isinstance(model.transfers[0][0], torch.nn.AdaptiveAvgPool2d)
    assert isinstance(model.transfers[1], torch.nn.Identity)
    assert [d.conv2.kernel_size for d in model.discriminators] == [(2, 2), (2, 2)]
    losses = model.train()(x, y)
    for params, grads in gradient_sets(model, losses):
        assert all(torch.isfinite(g).all() for g in grads)
    dml = AFDModel(nets, "dml", "pair", [32, 16])
    seen = []
    hook = nets[1].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    DualStep(dml, lr=0.01, dml_update="alternate")(torch.cat([x, x]), torch.cat([y, y]))  # its own forwards
    hook.remove()
    assert seen == [(16, 16), (16, 16)]
    with pytest.raises(ConfigError, match="one per network"):
        AFDModel(nets, "afd", "pair", [32])
    with pytest.raises(ConfigError, match="one image size"):
        AFDModel([build_network("resnet20", CLASSES) for _ in range(2)], "one", "pair", [32, 16])


def test_network_image_sizes_through_the_cli(tmp_path, tiny_data, capsys):
    out = str(tmp_path / "out")
    summary = train.main(["--data", tiny_data, "--output", out, "--workers", "0", "--batch-size", "4", "--epochs", "1",
                          "--max-steps", "2", "--image-size", "32", "--network-image-sizes", "48,32",
                          "--arch", "mobilenet_v3_small,resnet20", "--print-every", "1000"])
    assert summary["steps"] == 2 and summary["network_image_sizes"] == [48, 32]
    assert "networks: mobilenet_v3_small 48, resnet20 32" in capsys.readouterr().out
    for bad, message in [("48", "2 sizes|1 sizes"), ("48,x", "positive whole numbers")]:
        with pytest.raises(SystemExit):
            train.main(["--data", tiny_data, "--output", out, "--arch", "mobilenet_v3_small,resnet20",
                        "--network-image-sizes", bad])
        assert re.search(message, capsys.readouterr().err)


def test_one_keeps_identical_networks(tmp_path, tiny_data, capsys):
    with pytest.raises(SystemExit):
        train.main(["--data", tiny_data, "--output", str(tmp_path), "--arch", "mobilenet_v3_small,resnet18",
                    "--method", "one"])
    assert "one CIFAR ResNet or WRN K times" in capsys.readouterr().err


def test_table6_vanilla_row_evaluates_the_pretrained_networks_as_they_are(tmp_path, tiny_data, torch_home):
    """benchmarks/accuracy.py's imagenet-table6 vanilla row: torchvision's weights, no training step."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import accuracy

    state = _place_torchvision_weights(torch_home, "resnet18")
    out = tmp_path / "run"
    summary = accuracy.evaluate_as_they_are(["--method", "vanilla", "--arch", "resnet18", "--data", tiny_data,
                                             "--pretrained", "torchvision", "--image-size", "32", "--workers", "0",
                                             "--batch-size", "4", "--output", str(out), "--device", "cpu"])
    assert summary["steps"] == 0 and summary["pretrained"] and 0 <= summary["net0_top1"] <= 100
    exported = torch.load(out / "network0_resnet18.pt", weights_only=True)  # untouched but for the 4-class head
    assert all(torch.equal(exported[k], state[k]) for k in state if not k.startswith("fc."))
