"""The methods of the paper's tables (Tables 1-6): what each one trains with, and who learns from whom.

``afd`` is the paper's method; the others are its baselines and ablations, each meaning what the
paper's row of the same name means (see the README's "The paper's tables").
"""
from __future__ import annotations

from dataclasses import dataclass

from afd_fast.errors import ConfigError
from afd_fast.models.cifar import CIFAR_NETWORKS

METHODS = ("afd", "dml", "one", "kd", "vanilla", "l1", "l1kd", "l1kd-offline", "adv-only", "kd-only")


@dataclass(frozen=True)
class MethodSpec:
    """What each method of the paper's tables trains with."""

    kd: bool  # logit distillation (KL towards the teacher row(s) of ``weights``)
    adversarial: bool  # discriminators and L_G
    l1: bool  # direct L1 alignment of feature maps
    # who teaches whom: "topology" (the --topology flag), "dml" (every other network, 1/(K-1) each),
    # "ensemble" (the mean logits), "gated" (ONE's gated ensemble), "teacher" (the last network) or "none"
    weights: str
    temperature: float = 3.0  # default T: the AFD paper's (and ONE's) 3; DML's paper uses plain softmaxes
    shared_low_layers: bool = False  # ONE: branches on network 0's low layers, plus a gate
    frozen_teacher: bool = False  # offline: the last network is a pre-trained teacher and never trains


METHOD_SPECS = {
    "afd": MethodSpec(kd=True, adversarial=True, l1=False, weights="topology"),
    # DML: one forward, every network steps on CE + the mean KL towards its detached peers (the
    # released code's alternating updates: --dml-update alternate, afd_fast.step.DualStep)
    "dml": MethodSpec(kd=True, adversarial=False, l1=False, weights="dml", temperature=1.0),
    "one": MethodSpec(kd=True, adversarial=False, l1=False, weights="gated", shared_low_layers=True),
    "kd": MethodSpec(kd=True, adversarial=False, l1=False, weights="ensemble"),  # online KD, ensemble teacher
    "vanilla": MethodSpec(kd=False, adversarial=False, l1=False, weights="none"),
    "l1": MethodSpec(kd=False, adversarial=False, l1=True, weights="topology"),
    "l1kd": MethodSpec(kd=True, adversarial=False, l1=True, weights="topology"),
    "l1kd-offline": MethodSpec(kd=True, adversarial=False, l1=True, weights="teacher", frozen_teacher=True),
    "adv-only": MethodSpec(kd=False, adversarial=True, l1=False, weights="topology"),
    # AFD without the adversarial term: one synchronous step of the topology's KD (not DML)
    "kd-only": MethodSpec(kd=True, adversarial=False, l1=False, weights="topology"),
}


def method_spec(method: str) -> MethodSpec:
    if method not in METHOD_SPECS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHOD_SPECS[method]


def architecture_problem(method: str, archs: list[str]) -> str | None:
    """Why ``method`` cannot train these networks (for the CLI, before any work), or None."""
    spec = method_spec(method)
    if len(archs) < 2 and method != "vanilla":
        return f"--method {method} distils between networks: give at least 2 in --arch (e.g. resnet20,resnet20)"
    if spec.shared_low_layers and (len(set(archs)) > 1 or archs[0] not in CIFAR_NETWORKS):
        return (f"--method {method} shares the low layers of its branches: give one CIFAR ResNet or WRN K times "
                "(e.g. resnet32,resnet32)")
    return None


def peer_of(k: int, num_networks: int) -> int:
    """The network k learns from: the other one for a pair, k-1 in the cyclic scheme (1->2, ..., K->1)."""
    return (k - 1) % num_networks

