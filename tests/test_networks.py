"""Your own networks (issue 14): every torchvision classifier and timm models as peers, split into G and
head by rule; heterogeneous maps (channels and space) through the transfer layers; pretrained starts.

Speed: building all 80 torchvision classifiers with real weights takes over two minutes on the 2-core
CPU VM (their initialisation alone), and a forward and backward on the meta device costs seconds per
network (batch norm runs through Python decompositions there). So every classifier is built on the
meta device (parameters without storage: torchvision's own builders, only the factories that make
parameters and buffers redirected) and split there (the trace and one forward on meta tensors at
224 px: shapes, parameters, head, the strict load); one network of each family, with real weights at a
small image size, shows that the split computes the plain model's logits and goes through one forward
and backward of AFDModel with a peer of other channels and spatial size (finite gradients, no L_G in
the head). The other members of a family are the same builder at other widths and depths.
"""
from __future__ import annotations

import os
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
from afd_fast.step import gradient_sets

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


@pytest.mark.parametrize("name", sorted(TORCHVISION_NETWORKS))
def test_every_torchvision_classifier_splits_by_rule(name):
    """Built on the meta device: the split keeps every parameter once, the head is exactly the plain
    model's classifier, G's map is spatial and the exported state_dict loads strictly into the plain
    model. ViTs are refused, naming the class token."""
    plain = _meta_plain(name)
    if name.startswith("vit_"):
        with pytest.raises(UnsplittableNetwork, match="class token"):
            GraphSplitNetwork(name, plain, CLASSES)
        return
    net = GraphSplitNetwork(name, plain, CLASSES)
    assert {id(p) for p in net.parameters()} == {id(p) for p in plain.parameters()}
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())
    assert {id(p) for p in net.head_parameters()} == {id(p) for p in _classifier(plain).parameters()}
    head = {id(p) for p in net.head_parameters()}
    assert not head & {id(p) for p in net.extractor_parameters()}
    _meta_plain(name).load_state_dict(net.plain_state_dict(), strict=True)


# one of each family, with real weights
# (VGG splits as AlexNet does, Inception v3 as GoogLeNet, Swin v2 as Swin: the meta test covers them)
FAMILIES = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny",
            "densenet121", "shufflenet_v2_x0_5", "mnasnet0_5", "alexnet", "squeezenet1_1", "googlenet", "swin_t",
            "maxvit_t"]


def _materialised(model: torch.nn.Module) -> torch.nn.Module:
    """A meta-built model with real tensors: small random weights, BN statistics 0 and 1 (fast: no
    initialiser runs; the values only have to be the same on both sides of a comparison)."""
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(module, kind).items():
                if t is None or not t.is_meta:
                    continue
                real = torch.empty(t.shape, dtype=t.dtype)
                if key == "running_var":
                    real.fill_(1.0)
                elif not t.is_floating_point() or key == "running_mean":
                    real.zero_()
                else:
                    real.normal_(0, 0.05, generator=g)
                getattr(module, kind)[key] = torch.nn.Parameter(real, t.requires_grad) if kind == "_parameters" else real
    return model


def _with_cpu_buffers(name: str) -> torch.nn.Module:
    with _MetaParameters():
        model = torchvision.models.get_model(name, weights=None, num_classes=CLASSES, **_torchvision_kwargs(name))
    return _materialised(model)


@pytest.mark.parametrize("name", FAMILIES)
def test_split_computes_the_plain_models_logits_and_trains(name):
    size = SIZES.get(name, 48)
    net = GraphSplitNetwork(name, _with_cpu_buffers(name), CLASSES)
    plain = _materialised(_meta_plain(name))
    plain.load_state_dict(net.plain_state_dict(), strict=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    net.eval(), plain.eval()
    feature_map, logits = net(x)
    assert feature_map.dim() == 4 and feature_map.shape[1] == net.feature_channels
    torch.testing.assert_close(logits, plain(x), rtol=1e-4, atol=1e-4)
    if size == 224:  # MaxViT: only 224 px; its training path is the meta test's (a real one takes ~20 s here)
        return
    model = AFDModel([net, build_network("resnet20", CLASSES)], "afd", "pair", size).train()  # 64 x size/4
    losses = model(x, torch.tensor([1, 2]))
    to_head = torch.autograd.grad(losses["generator"], net.head_parameters(), retain_graph=True, allow_unused=True)
    assert all(g is None for g in to_head)  # L_G never reaches the head
    for params, grads in gradient_sets(model, losses):
        assert all(torch.isfinite(g).all() for g in grads)


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
