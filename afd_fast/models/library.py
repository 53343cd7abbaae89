"""Classifiers of torchvision and timm as peers, split into G and head by rule.

The rule: G ends at **the last spatial map before global pooling**; the head is everything after it
(pooling, flattening, the classifier). For a torchvision model the split is found on its traced
graph (``torch.fx``, torchvision's own ops kept whole as leaves), with the shapes of one forward on
fake tensors (no compute): the global pooling is the last node on the way to the logits that turns a
map ``[B, C, H, W]`` (H·W > 1 at 224 px) into ``[B, C']`` or ``[B, C', 1, 1]``, and the map is its
input. Two refinements keep the split what the model means by "classifier":

* a parameter-free resize between the map and the flattening (VGG's and AlexNet's adaptive pooling
  to 7x7) belongs to the head;
* a map that already holds the class scores (a classifier applied per location before the pooling:
  SqueezeNet) would leave the head without parameters: the split moves back to the input of the
  layers that made it, and before any dropout.

The split is refused, with the reason, when it would not be honest: no global pooling of a spatial
map (ViT: its head reads the class token, which no map holds), a head that reads anything but the
map (or a parameter of G), a forward that differs between training and evaluation mode, or modules
that the forward does not use (the plain state_dict would lose them). timm models split at
``forward_features`` / ``forward_head`` (a map of tokens is refused the same way).

Every network keeps the plain model's weights layout: ``plain_state_dict()`` loads into
``torchvision.models.get_model(name, num_classes=...)`` (GoogLeNet and Inception v3 without their
auxiliary classifiers: ``aux_logits=False``) or ``timm.create_model(name, num_classes=...)``.
"""
from __future__ import annotations

import collections
import functools
import inspect
import math
import os
import re
import urllib.parse

import torch
from torch import fx, nn

from afd_fast.errors import AfdFastError, ConfigError
from afd_fast.models.base import SplitNetwork

TIMM_PREFIX = "timm:"
PROBE_SIZE = 224  # where "spatial" is judged: every torchvision classifier takes 224 px


class UnsplittableNetwork(ConfigError):
    """The network cannot be split into G and head by the rule (the message says why)."""


class WeightsNotFound(AfdFastError):
    """Pre-trained weights are neither cached nor downloadable (the message names file and folder)."""


# --- names -------------------------------------------------------------------------------------------

def torchvision_names() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def is_timm_name(name: str) -> bool:
    return name.lower().startswith(TIMM_PREFIX)


def timm_problem(name: str) -> str | None:
    """Why ``timm:<name>`` cannot be built (timm missing, unknown model), or None."""
    try:
        import timm
    except ImportError:
        return f"{name!r} needs timm: pip install timm"
    model = name[len(TIMM_PREFIX):]
    if not timm.is_model(model):
        return f"unknown timm model {model!r} (timm.list_models('{model.split('_')[0]}*') lists similar ones)"
    return None


# --- torchvision: the split on the traced graph -------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _reads_training(cls: type) -> bool:
    """Whether a module's own forward reads ``self.training`` (dropout-like behaviour)."""
    try:
        return "self.training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


class _Tracer(fx.Tracer):
    """torchvision's ops (StochasticDepth, SqueezeExcitation, ...) and every module whose forward reads
    ``self.training`` stay whole (one node each): what they do in training and in evaluation stays a
    module call instead of being traced in for the mode of the trace."""

    def __init__(self, whole: frozenset[str] = frozenset()):
        import torchvision
        super().__init__(autowrap_modules=(math, torchvision.ops))
        self.leaves = tuple(m for m in vars(torchvision.ops).values() if isinstance(m, type) and issubclass(m, nn.Module))
        self.whole = whole  # qualified names of further modules to keep whole

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, self.leaves) or qualname in self.whole or _reads_training(type(m))
                or super().is_leaf_module(m, qualname))


def _trace(model: nn.Module, training: bool, whole: frozenset[str] = frozenset()) -> fx.Graph:
    was = model.training
    model.train(training)
    try:
        return _Tracer(whole).trace(model)
    finally:
        model.train(was)


def _traced(model: nn.Module, name: str) -> fx.GraphModule:
    """The model's traced forward. A module whose buffers the trace reads as constants (they would be
    lost from the state_dict: MaxViT's relative position indices) is traced again as one node."""
    keys = list(model.state_dict())
    whole: frozenset[str] = frozenset()
    for _ in range(2):
        graph = _trace(model, True, whole)
        if _code(graph) != _code(_trace(model, False, whole)):
            raise UnsplittableNetwork(f"{name}: its forward differs between training and evaluation (beyond "
                                      "modules such as dropout): one split cannot serve both")
        gm = fx.GraphModule(model, graph)
        missing = set(keys) - set(gm.state_dict())
        if not missing:
            return gm
        whole = whole | {k.rsplit(".", 1)[0] for k in missing}
    raise UnsplittableNetwork(f"{name}: its forward does not use {sorted(missing)[0]!r} (and {len(missing) - 1} "
                              "more): the split would lose them")


def _probe_shapes(gm: fx.GraphModule, size: int) -> dict[fx.Node, tuple]:
    """Each node's output shape for a batch of 2 images of ``size`` px: one forward on fake tensors (no
    compute, no memory), in evaluation mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    was = gm.training
    gm.eval()
    like = next(gm.parameters())
    fake = None if like.is_meta else FakeTensorMode(allow_non_fake_inputs=True)  # meta: shapes already
    try:
        ShapeProp(gm, fake_mode=fake).propagate(torch.empty(2, 3, size, size, dtype=like.dtype, device=like.device))
    finally:
        gm.train(was)
    shapes = {}
    for n in gm.graph.nodes:
        meta = n.meta.pop("tensor_meta", None)
        shapes[n] = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    return shapes


class _Shapes:
    """Node shapes at the probe size. A map is spatial when it is [B, C, H, W] with H and W above 1;
    pooled when it is [B, C] or [B, C, 1, 1]."""

    def __init__(self, gm: fx.GraphModule):
        self.shapes = _probe_shapes(gm, PROBE_SIZE)

    def of(self, node: fx.Node):
        return self.shapes.get(node)

    def spatial(self, node: fx.Node) -> bool:
        s = self.shapes.get(node)
        return s is not None and len(s) == 4 and s[2] > 1 and s[3] > 1

    def pooled(self, node: fx.Node) -> bool:
        s = self.shapes.get(node)
        return s is not None and (len(s) == 2 or (len(s) == 4 and s[2] == s[3] == 1))


_TOKENS = (": a transformer over tokens: its head reads the class token, which no spatial map holds, so a map "
           "distilled from G would not be what the head classifies")


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _params_of(gm: fx.GraphModule, nodes) -> set[int]:
    """ids of the parameters that these nodes use (module calls and direct reads)."""
    out = set()
    for n in nodes:
        if n.op == "call_module":
            out |= {id(p) for p in gm.get_submodule(n.target).parameters()}
        elif n.op == "get_attr":
            value = gm
            for part in n.target.split("."):
                value = getattr(value, part)
            if isinstance(value, nn.Parameter):
                out.add(id(value))
    return out


def find_split(gm: fx.GraphModule, shapes: _Shapes, name: str, num_classes: int) -> fx.Node:
    """The node whose output is G's map (see the module's docstring), or UnsplittableNetwork."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    logits = output.args[0]
    if not isinstance(logits, fx.Node) or shapes.of(logits) is None or len(shapes.of(logits)) != 2:
        raise UnsplittableNetwork(f"{name}: its forward does not return one logits tensor [B, classes]")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    on_path = _ancestors(logits)
    # the global pooling (or flattening): from a spatial map to [B, C] or [B, C, 1, 1]
    pools = [n for n in on_path if shapes.pooled(n) and any(shapes.spatial(i) for i in n.all_input_nodes)]
    if not pools:
        tokens = any(shapes.of(n) is not None and len(shapes.of(n)) == 3 for n in on_path)
        raise UnsplittableNetwork(f"{name}: no global pooling of a spatial map before its logits"
                                  + (_TOKENS if tokens else ""))
    pool = max(pools, key=order.get)
    split = next(i for i in pool.all_input_nodes if shapes.spatial(i))
    # a parameter-free resize before the flattening (VGG, AlexNet) belongs to the head
    while split.op == "call_module" and isinstance(gm.get_submodule(split.target),
                                                   (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        split = split.all_input_nodes[0]
    # class scores per location (SqueezeNet): back to the input of the classifier's layers
    if not _params_of(gm, _ancestors(logits) - _ancestors(split)):
        while shapes.spatial(split) and shapes.of(split)[1] == num_classes and len(split.all_input_nodes) == 1:
            split = split.all_input_nodes[0]
        while split.op == "call_module" and isinstance(gm.get_submodule(split.target), nn.Dropout):
            split = split.all_input_nodes[0]
        if not shapes.spatial(split):
            raise UnsplittableNetwork(f"{name}: its classifier works on a spatial map, and no map precedes it")
    return split


def split_graph(gm: fx.GraphModule, split: fx.Node, name: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(G, head) as GraphModules over the model's own modules (qualified names kept)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    below = _ancestors(split)
    above = _ancestors(output.args[0]) - below
    for n in above:
        strangers = [i for i in n.all_input_nodes if i in below and i is not split]
        if strangers:
            raise UnsplittableNetwork(f"{name}: its head reads {strangers[0].name!r} besides G's map "
                                      f"{split.name!r}: the map would not be all that the head classifies")
    shared = _params_of(gm, below) & _params_of(gm, above)
    if shared:
        raise UnsplittableNetwork(f"{name}: G and the head share {len(shared)} parameter(s): L_G would train "
                                  "the head")
    g_graph, env = fx.Graph(), {}
    for n in gm.graph.nodes:
        if n in below:
            env[n] = g_graph.node_copy(n, env.__getitem__)
    g_graph.output(env[split])
    h_graph = fx.Graph()
    env = {split: h_graph.placeholder("feature_map")}
    for n in gm.graph.nodes:
        if n in above:
            env[n] = h_graph.node_copy(n, env.__getitem__)
    h_graph.output(env[output.args[0]])
    return fx.GraphModule(gm, g_graph, "Features"), fx.GraphModule(gm, h_graph, "Head")


def _code(graph: fx.Graph) -> str:
    return re.sub(r"_tensor_constant\d+", "_tensor_constant", graph.python_code("self").src)


class GraphSplitNetwork(SplitNetwork):
    """A torchvision classifier as G (``g``) and head (``h``): GraphModules of its traced forward that
    hold the model's own modules under their own names."""

    def __init__(self, name: str, model: nn.Module, num_classes: int):
        super().__init__()
        self.arch = name
        gm = _traced(model, name)
        shapes = _Shapes(gm)
        split = find_split(gm, shapes, name, num_classes)
        self.g, self.h = split_graph(gm, split, name)
        self.feature_channels = shapes.of(split)[1]
        self.train(model.training)
        plain = model.state_dict()
        self.plain_keys = list(plain)
        self.plain_metadata = getattr(plain, "_metadata", None)  # module versions (MNASNet checks its own)
        missing = set(self.plain_keys) - set(self._merged_state())
        if missing:
            raise UnsplittableNetwork(f"{name}: its forward does not use {sorted(missing)[0]!r} (and "
                                      f"{len(missing) - 1} more): the split would lose them")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(x)

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.h(feature_map)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.h.parameters())

    def _merged_state(self) -> dict[str, torch.Tensor]:
        return {**self.g.state_dict(), **self.h.state_dict()}

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """Loads into ``torchvision.models.get_model(arch, num_classes=...)`` with strict=True."""
        merged = self._merged_state()
        state = collections.OrderedDict((k, merged[k]) for k in self.plain_keys)
        if self.plain_metadata is not None:
            state._metadata = self.plain_metadata
        return state

    def load_plain_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unexpected = set(state) - set(self.plain_keys)
        missing = set(self.plain_keys) - set(state)
        if unexpected or missing:
            raise RuntimeError(f"{self.arch}: state_dict does not match: missing {sorted(missing)[:3]}, "
                               f"unexpected {sorted(unexpected)[:3]}")
        for part in (self.g, self.h):  # (constants that the trace made buffers of are not in the plain layout)
            own = part.state_dict()
            part.load_state_dict({k: state[k] if k in state else v for k, v in own.items()})

    def plain_head_keys(self) -> set[str]:
        return set(self.h.state_dict())


def _torchvision_kwargs(name: str) -> dict:
    # GoogLeNet and Inception v3: no auxiliary classifiers (a second and third head the split would lose)
    return {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}


def build_torchvision(name: str, num_classes: int, weights: str | None = None) -> GraphSplitNetwork:
    """A torchvision classifier, fresh or from ``weights`` ("DEFAULT" or a name such as "IMAGENET1K_V2")."""
    import torchvision
    kwargs = _torchvision_kwargs(name)
    if weights is None:
        return GraphSplitNetwork(name, torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                                                    **kwargs), num_classes)
    w = torchvision_weights(name, weights)
    require_torchvision_file(name, w)
    plain = torchvision.models.get_model(name, weights=w)
    if getattr(plain, "aux_logits", False):  # Inception v3 keeps them by default: dropped as GoogLeNet's builder does
        plain.aux_logits = False
        for attr, module in list(vars(plain)["_modules"].items()):
            if attr.lower().startswith("aux"):
                setattr(plain, attr, None)
    if len(w.meta["categories"]) == num_classes:
        return GraphSplitNetwork(name, plain, num_classes)
    # another class count: the same architecture fresh, everything but the head from the weights
    if hasattr(plain, "transform_input"):  # as the builder set it for these weights
        kwargs.update(transform_input=plain.transform_input, init_weights=False)
    network = GraphSplitNetwork(name, torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                                                   **kwargs), num_classes)
    load_except_head(network, plain.state_dict(), f"{name} ({w})")
    return network


def torchvision_weights(name: str, tag: str):
    import torchvision
    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError:
        raise ConfigError(f"torchvision has no pre-trained weights for {name!r}") from None
    try:
        return enum.DEFAULT if tag.upper() == "DEFAULT" else enum[tag]
    except KeyError:
        raise ConfigError(f"torchvision has no weights {tag!r} for {name}; it has: "
                         f"{', '.join(w.name for w in enum)}") from None


def torchvision_weight_file(w) -> tuple[str, str]:
    """(file name, folder) where torch's hub cache keeps these weights (TORCH_HOME/hub/checkpoints)."""
    return os.path.basename(urllib.parse.urlparse(w.url).path), os.path.join(torch.hub.get_dir(), "checkpoints")


def require_torchvision_file(name: str, w) -> None:
    """Downloads the weights into torch's cache when missing; stops naming file and folder if it cannot."""
    file, folder = torchvision_weight_file(w)
    if os.path.isfile(os.path.join(folder, file)):
        return
    try:
        w.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # no network, proxy, refused: all end the same way
        raise WeightsNotFound(f"the weights {w} of {name} are not cached and could not be downloaded "
                              f"({type(e).__name__}: {e}): put {file} (from {w.url}) into {folder}") from None


def load_except_head(network: SplitNetwork, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads ``state`` (plain layout) strictly, except a head whose class count differs: that one stays
    fresh, with a printed note. Any other mismatch is an error."""
    own = network.plain_state_dict()
    head = network.plain_head_keys()
    differ = {k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)}
    if not differ <= head:
        raise RuntimeError(f"{source}: weights do not fit {sorted(differ - head)[:3]} (shapes differ outside the "
                           "head)")
    if set(own) != set(state):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise RuntimeError(f"{source}: weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if differ:
        print(f"note: {source}: the weights' head is for another number of classes: the head "
              f"({', '.join(sorted(differ))}) starts fresh, everything else is loaded", flush=True)
    network.load_plain_state_dict({k: (own[k] if k in differ else v) for k, v in state.items()})


# --- timm: forward_features / forward_head -------------------------------------------------------------

class TimmNetwork(SplitNetwork):
    """A timm model: G is ``forward_features`` (channels-last maps permuted to [B, C, H, W]), the head
    ``forward_head``; the head's parameters are those of the modules ``forward_head`` calls."""

    def __init__(self, name: str, model: nn.Module):
        super().__init__()
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.arch, self.model = name, model
        called: dict[str, list[nn.Module]] = {"features": [], "head": []}
        stage = ["features"]

        def record(module, args):
            called[stage[0]].append(module)

        size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, PROBE_SIZE, PROBE_SIZE))[1:]
        was = model.training
        model.eval()
        handle = nn.modules.module.register_module_forward_pre_hook(record)
        try:
            with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                out = model.forward_features(torch.empty(2, 3, *size))
                stage[0] = "head"
                channels = model.num_features
                if out.dim() != 4:
                    raise UnsplittableNetwork(f"{name}: forward_features gives {out.dim() - 1}-d tokens {tuple(out.shape)}, "
                                              "not a spatial map (a transformer: its head reads tokens, no map holds "
                                              "them)")
                self.channels_last = out.shape[1] != channels and out.shape[-1] == channels
                model.forward_head(out)
        finally:
            handle.remove()
            model.train(was)
        head = {id(p): p for m in called["head"] for p in m.parameters()}
        g = {id(p) for m in called["features"] for p in m.parameters(recurse=False)}
        if head.keys() & g:
            raise UnsplittableNetwork(f"{name}: forward_head uses parameters of forward_features: L_G would train "
                                      "the head")
        self._head_ids = set(head)
        self.feature_channels = channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.forward_features(x)
        return f.permute(0, 3, 1, 2) if self.channels_last else f

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(feature_map.permute(0, 2, 3, 1) if self.channels_last else feature_map)

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if id(p) in self._head_ids]

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """Loads into ``timm.create_model(name, num_classes=...)`` with strict=True."""
        return self.model.state_dict()

    def load_plain_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def plain_head_keys(self) -> set[str]:
        ids = self._head_ids
        return {k for k, p in self.model.named_parameters() if id(p) in ids}


def build_timm(name: str, num_classes: int, pretrained: str | None = None) -> TimmNetwork:
    """``timm:<model>``, fresh or with timm's pre-trained weights (``pretrained``: "" for the model's
    default tag, or a tag such as "a1_in1k"), through timm's own loader and the Hugging Face cache."""
    problem = timm_problem(name)
    if problem:
        raise ConfigError(problem)
    import timm
    model_name = name[len(TIMM_PREFIX):]
    if pretrained is None:
        return TimmNetwork(name, timm.create_model(model_name, num_classes=num_classes))
    full = f"{model_name}.{pretrained}" if pretrained else model_name
    try:
        model = timm.create_model(full, pretrained=True)  # its own class count: strict, timm's path
    except Exception as e:
        raise WeightsNotFound(timm_missing_message(full, e)) from None
    classes = model.num_classes
    network = TimmNetwork(name, model)
    if classes != num_classes:
        keys = sorted(network.plain_head_keys())
        model.reset_classifier(num_classes)
        network = TimmNetwork(name, model)
        print(f"note: timm:{full}: the weights' head is for {classes} classes, this data has {num_classes}: the "
              f"classifier ({', '.join(keys)}) starts fresh, everything else is loaded", flush=True)
    return network


def timm_missing_message(full: str, error: Exception) -> str:
    import timm
    cfg = timm.models.get_pretrained_cfg(full) or timm.models.get_pretrained_cfg(full.split(".")[0])
    hub = (cfg.hf_hub_id if cfg is not None else None) or ""
    where = ""
    if hub:
        from huggingface_hub import constants
        folder = os.path.join(constants.HF_HUB_CACHE, "models--" + hub.replace("/", "--"))
        where = (f": put model.safetensors of the Hugging Face repository {hub} into the Hugging Face cache "
                 f"{folder} (e.g. huggingface-cli download {hub} on a machine with network, then copy "
                 f"{constants.HF_HUB_CACHE})")
    return (f"the timm weights {full} are not cached and could not be downloaded "
            f"({type(error).__name__}: {str(error)[:300]}){where}")
