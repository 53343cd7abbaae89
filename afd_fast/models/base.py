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
