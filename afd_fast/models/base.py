from __future__ import annotations

import contextlib

import torch
from torch import nn

from afd_fast.errors import ConfigError


class SplitNetwork(nn.Module):
    """A classifier as G (``features``: image -> last conv feature map) and ``head`` (-> logits).

    Networks that ONE can branch (the CIFAR ones) also split G at the last stage:
    ``features(x) = high_level(low_level(x))``, ``low_level_modules`` naming the modules below it."""

    feature_channels: int
    low_level_modules: tuple[str, ...] = ()  # empty: no split (ONE cannot branch this network)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.high_level(self.low_level(x))

    def low_level(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def high_level(self, low: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = self.features(x)
        return feature_map, self.head(feature_map)

    def extractor_parameters(self) -> list[nn.Parameter]:
        """Parameters of G: everything but the head (these get the adversarial L_G gradient)."""
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def head_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in the layout of the plain model (torchvision's, or this module's own)."""
        return self.state_dict()

    def load_plain_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)


def probe_shape(stage, network: nn.Module, image_size: int) -> tuple[int, ...]:
    """Shape (without the batch) of what ``stage`` (e.g. ``network.features``) returns for square images
    of ``image_size``: one forward in eval mode on fake tensors (shapes only: no compute, no memory,
    the network's state untouched). A forward that fake tensors cannot run (an op that reads a value,
    which fake tensors do not have) gets a real one on zero images, still in eval mode; if that fails
    too, its error is the one reported."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # (private: imported only where used)

    was_training = network.training
    network.eval()
    like = next(network.parameters())

    def forward(fake: bool) -> tuple[int, ...]:
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext(), torch.no_grad():
            probe = torch.zeros(2, 3, image_size, image_size, dtype=like.dtype, device=like.device)
            return tuple(stage(probe).shape[1:])
    try:
        try:
            return forward(fake=not like.is_meta)
        except (RuntimeError, ValueError, AssertionError, IndexError):
            if like.is_meta:
                raise
            return forward(fake=False)
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        name = getattr(network, "arch", type(network).__name__)
        raise ConfigError(f"{name} cannot take {image_size} px images ({type(e).__name__}: {str(e)[:200]}): "
                          "choose another --image-size") from None
    finally:
        network.train(was_training)


def is_strided_conv_on_one_pixel(module: nn.Module, x) -> bool:
    """Whether this call of a convolution module is a strided one on a map of one pixel (1x1): the
    case where torch's oneDNN bfloat16 CPU convolution returns wrong, run-to-run different weight
    gradients on x86 CPUs with native bf16 (seen with torch 2.14.1 on Intel AMX and on AMD EPYC with
    avx512_bf16; tests/test_upstream_bugs.py)."""
    return (isinstance(module, nn.modules.conv._ConvNd) and isinstance(x, torch.Tensor) and x.dim() >= 3
            and any(s > 1 for s in module.stride) and all(d == 1 for d in x.shape[2:]))


def strided_convs_on_one_pixel(network: nn.Module, image_size: int) -> list[str]:
    """The convolution modules of ``network`` (by name, with their input's shape) that are strided and
    see a 1x1 map when the network gets square images of ``image_size`` (one forward on fake tensors,
    as :func:`probe_shape`). Convolutions called as functions, not modules, are not seen."""
    return strided_convs_on_one_pixel_during(network, lambda: probe_shape(lambda x: network(x)[1], network, image_size))


def strided_convs_on_one_pixel_during(module: nn.Module, run) -> list[str]:
    """The convolution modules of ``module`` (by name, with their input's shape) that run strided on a
    1x1 map while ``run()`` runs."""
    names = {m: n for n, m in module.named_modules()}
    found: list[str] = []

    def look(conv, args):
        if is_strided_conv_on_one_pixel(conv, args[0] if args else None):
            stride = "x".join(map(str, conv.stride))
            found.append(f"{names[conv]} (stride {stride}, input {'x'.join(map(str, args[0].shape[1:]))})")
    handles = [m.register_forward_pre_hook(look) for m in names if isinstance(m, nn.modules.conv._ConvNd)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(found))  # a module called twice (shared layers) is named once


def refuse_one_pixel_strided_convs(networks: list[nn.Module], sizes: list[int], flag: str = "--image-size") -> None:
    """For bfloat16 on the CPU: stop (:class:`ConfigError`) when a network's strided convolution would
    see a 1x1 map at its image size, naming the layer and a size that avoids it (the first of 2, 3, 4,
    6, ... times this one). torch's oneDNN bfloat16 convolution returns garbage weight gradients there
    on x86 CPUs with native bf16 (Intel AMX, AMD avx512_bf16): the run would train on noise. CUDA,
    float16 and float32 are not affected, nor are the forward and the input gradient (measured on the
    AMD EPYC where the weight gradient is garbage): so ``sizes`` are the training sizes, and an
    evaluation at a smaller crop is not refused."""
    for network, size in zip(networks, sizes):
        layers = strided_convs_on_one_pixel(network, size)
        if not layers:
            continue
        larger = next((size * m for m in (2, 3, 4, 6, 8, 12, 16) if not strided_convs_on_one_pixel(network, size * m)),
                      None)
        name = getattr(network, "arch", type(network).__name__)
        raise ConfigError(
            f"{name} at {size} px: {', '.join(layers[:3])}{' ...' if len(layers) > 3 else ''}: a strided convolution "
            "on a 1x1 map, where torch's bfloat16 CPU convolution (oneDNN) computes wrong weight gradients on "
            f"x86 CPUs with native bf16: use a larger {flag}{f' (e.g. {larger})' if larger else ''} or --amp off")
