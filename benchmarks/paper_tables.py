"""The AFD paper's top-1 accuracies (%), typed in once from ../shared/paper/afd-paper.txt, Tables 1-6.

Each row is keyed by afd_fast's ``--method`` and ``--arch`` (in the paper's order: Net1, Net2; for
offline L1+KD student, teacher). ``nets``: the per-network numbers where the table gives them
(Tables 1, 2 and 4 for different architectures, 6; the "Net" of the vanilla columns, one network
trained alone, stands for each of the K copies); ``mean``: the "2 Net Avg" / "3 Net Avg" column
where the table gives it; ``ensemble``: "Ens" (the mean of the softmaxes for every method but ONE,
whose "Ens" is its gated ensemble; §4). CIFAR-100 numbers are means of 5 runs (§4); ImageNet's
(Table 6) of one, after 30 epochs from pre-trained networks.
"""
from __future__ import annotations

from dataclasses import dataclass

R20, R32, R56 = "resnet20", "resnet32", "resnet56"
W162, W164, W282, W284, W2810 = "wrn-16-2", "wrn-16-4", "wrn-28-2", "wrn-28-4", "wrn-28-10"


@dataclass(frozen=True)
class PaperRow:
    table: int
    method: str
    archs: tuple[str, ...]
    nets: tuple[float | None, ...] = ()
    mean: float | None = None
    ensemble: float | None = None
    dataset: str = "CIFAR-100"

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        return self.method, self.archs

    def paper_mean(self) -> tuple[float | None, bool]:
        """(the K-network mean, whether it is derived from the per-network numbers rather than printed)."""
        if self.mean is not None:
            return self.mean, False
        if self.method == "l1kd-offline":  # the student alone: the teacher does not train
            return self.nets[0], False
        if self.nets and all(v is not None for v in self.nets):
            return round(sum(self.nets) / len(self.nets), 2), True
        return None, False


def _same(table, method, arch, k, mean, ens):
    return PaperRow(table, method, (arch,) * k, mean=mean, ensemble=ens)


def _vanilla(table, arch, k, value):
    return PaperRow(table, "vanilla", (arch,) * k, nets=(value,) * k, mean=value)


ROWS: list[PaperRow] = [
    # Table 1: direct feature-map alignment (L1, L1+KD online, L1+KD offline) against AFD
    _same(1, "l1", R32, 2, 66.82, 70.69),
    _same(1, "l1kd", R32, 2, 70.16, 72.44),
    PaperRow(1, "l1kd-offline", (R32, R32), nets=(71.91, 69.79), ensemble=72.07),  # student, teacher
    _same(1, "afd", R32, 2, 74.03, 75.64),
    _vanilla(1, R32, 2, 69.38),
    PaperRow(1, "l1", (W162, W282), nets=(69.84, 73.41), ensemble=74.63),
    PaperRow(1, "l1kd", (W162, W282), nets=(72.35, 74.82), ensemble=75.10),
    PaperRow(1, "l1kd-offline", (W162, W282), nets=(73.94, 73.62), ensemble=76.56),
    PaperRow(1, "afd", (W162, W282), nets=(75.88, 77.08), ensemble=77.82),
    PaperRow(1, "vanilla", (W162, W282), nets=(71.07, 73.50)),
    # Table 2: ablation
    _same(2, "adv-only", R32, 2, 70.09, 74.77),
    _same(2, "kd-only", R32, 2, 73.38, 75.21),
    _same(2, "afd", R32, 2, 74.03, 75.64),
    _same(2, "adv-only", W162, 2, 71.94, 75.92),
    _same(2, "kd-only", W162, 2, 74.81, 76.20),
    _same(2, "afd", W162, 2, 75.33, 76.34),
    PaperRow(2, "adv-only", (W162, W282), nets=(72.05, 73.80), ensemble=76.82),
    PaperRow(2, "kd-only", (W162, W282), nets=(74.99, 76.64), ensemble=77.28),
    PaperRow(2, "afd", (W162, W282), nets=(75.88, 77.08), ensemble=77.82),
]

# Table 3: two networks of one architecture: (DML, ONE, AFD) as (2 Net Avg, Ens), and vanilla
_TABLE3 = {
    R20: ((70.90, 72.08), (70.56, 72.26), (71.72, 72.98), 67.48),
    R32: ((73.40, 74.89), (72.61, 74.07), (74.03, 75.64), 69.38),
    R56: ((75.48, 76.73), (76.45, 77.16), (77.25, 78.35), 73.84),
    W162: ((74.68, 75.81), (73.85, 74.84), (75.33, 76.34), 71.07),
    W164: ((78.17, 79.06), (77.32, 77.79), (78.55, 79.28), 75.38),
    W282: ((77.02, 78.64), (76.67, 77.40), (77.22, 78.72), 73.50),
    W284: ((79.16, 80.56), (79.25, 79.73), (79.46, 80.65), 76.60),
}
# Table 5: three networks (AFD cyclic): (DML, ONE, AFD) as (3 Net Avg, Ens), and vanilla
_TABLE5 = {
    R32: ((73.43, 76.11), (73.25, 74.94), (74.14, 76.64), 69.38),
    R56: ((76.11, 77.83), (76.49, 77.38), (77.37, 79.18), 73.84),
    W162: ((75.15, 76.93), (73.87, 75.26), (75.65, 77.54), 71.07),
    W282: ((77.12, 79.41), (76.66, 77.53), (77.20, 79.78), 73.50),
}
for _table, _k, _numbers in ((3, 2, _TABLE3), (5, 3, _TABLE5)):
    for _arch, (_dml, _one, _afd, _vanilla_top1) in _numbers.items():
        ROWS += [_vanilla(_table, _arch, _k, _vanilla_top1), _same(_table, "dml", _arch, _k, *_dml),
                 _same(_table, "one", _arch, _k, *_one), _same(_table, "afd", _arch, _k, *_afd)]

# Table 4: two architectures (Net2 the larger): (KD, DML, AFD) as (Net1, Net2, Ens); KD is online
# with the ensemble as teacher (§4.4)
_TABLE4 = {
    (R32, R56): ((72.92, 76.27, 76.71), (73.48, 76.35, 76.74), (74.13, 76.69, 77.11)),
    (R32, W164): ((72.67, 77.26, 76.94), (73.48, 77.43, 77.01), (74.43, 77.82, 77.67)),
    (R56, W284): ((75.48, 78.91, 79.23), (76.03, 79.32, 79.38), (77.95, 79.21, 80.01)),
    (R20, W2810): ((70.08, 78.17, 76.12), (71.03, 77.70, 75.78), (72.62, 77.83, 76.70)),
    (W162, W164): ((74.87, 77.42, 77.30), (74.87, 77.17, 76.96), (75.81, 78.00, 77.84)),
    (W162, W282): ((74.86, 76.45, 77.29), (75.11, 76.91, 77.24), (75.88, 77.08, 77.82)),
    (W162, W284): ((74.51, 78.18, 77.60), (74.95, 78.23, 77.67), (76.23, 78.26, 78.28)),
}
for _archs, _numbers in _TABLE4.items():
    for _method, (_n1, _n2, _ens) in zip(("kd", "dml", "afd"), _numbers):
        ROWS.append(PaperRow(4, _method, _archs, nets=(_n1, _n2), ensemble=_ens))

# Table 6: ImageNet, pre-trained ResNet-18 / ResNet-34, 30 epochs: (Net1, Net2, Ens); its vanilla
# numbers are those of the pre-trained networks themselves (torchvision's ResNet-18: 69.76)
ROWS += [
    PaperRow(6, "dml", ("resnet18", "resnet34"), nets=(70.19, 73.57), ensemble=73.33, dataset="ImageNet"),
    PaperRow(6, "afd", ("resnet18", "resnet34"), nets=(70.39, 74.00), ensemble=74.47, dataset="ImageNet"),
    PaperRow(6, "vanilla", ("resnet18", "resnet34"), nets=(69.76, 73.27), dataset="ImageNet"),
]


def lookup(method: str, archs: tuple[str, ...]) -> list[PaperRow]:
    """Every table row of this method and these networks (a row can appear in several tables)."""
    return [r for r in ROWS if r.key == (method, tuple(archs))]
