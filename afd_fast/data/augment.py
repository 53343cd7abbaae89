"""What the loaders prepare, the same on every image loader: the sizes (training crop; validation
resize of the shorter side, then centre crop) and the training augmentation beyond random-resized
crop and flip: an automatic-augmentation policy (``--auto-augment``) on the uint8 crop and random
erasing (``--random-erasing``) of the normalised image, as torchvision's reference scripts order
them. The torchvision loader applies them with ``torchvision.transforms.v2`` (:func:`torch_train_ops`),
DALI with its own ``nvidia.dali.auto_aug`` modules and ``fn.erase`` (:mod:`afd_fast.data.dali`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from afd_fast.errors import ConfigError

POLICIES = ("randaugment", "trivialaugment", "autoaugment")
RANDAUGMENT_DEFAULTS = (2, 9)  # torchvision's RandAugment: num_ops, magnitude (of 31 bins)
MAGNITUDE_BINS = 31  # torchvision's and DALI's default
# random erasing as torchvision's RandomErasing defaults: area share and aspect ratio of the box
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)
VAL_CROP_FRACTION = 0.875  # the validation resize by default: the crop / 0.875 (256 for 224)


def parse_auto_augment(text: str | None) -> tuple[str, int, int] | None:
    """``randaugment[:N:M] | trivialaugment | autoaugment`` (or None / "none") -> (policy, N, M)
    (N, M only mean something for randaugment)."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    name, *numbers = text.strip().lower().split(":")
    if name not in POLICIES:
        raise ConfigError(f"--auto-augment {text!r}: give one of randaugment[:N:M], trivialaugment, autoaugment")
    if numbers and name != "randaugment":
        raise ConfigError(f"--auto-augment {text!r}: only randaugment takes :N:M (number of ops, magnitude)")
    if numbers and (len(numbers) != 2 or not all(n.isdigit() for n in numbers)):
        raise ConfigError(f"--auto-augment {text!r}: write randaugment:N:M with whole numbers, e.g. randaugment:2:9")
    n, m = map(int, numbers) if numbers else RANDAUGMENT_DEFAULTS
    if n < 1 or not 0 <= m < MAGNITUDE_BINS:
        raise ConfigError(f"--auto-augment {text!r}: N (ops per image) must be at least 1 and M (magnitude) lie in "
                          f"0..{MAGNITUDE_BINS - 1}")
    return name, n, m


@dataclass(frozen=True)
class Preparation:
    """Sizes and training augmentation of an image loader (CIFAR's loader keeps its 32 px and refuses
    the augmentations: :meth:`refuse_augmentation`)."""
    train_crop: int
    val_resize: int
    val_crop: int
    auto_augment: str | None = None  # as --auto-augment takes it
    random_erasing: float = 0.0  # the probability that an image gets one erased box

    @classmethod
    def of(cls, image_size: int, train_crop: int | None = None, val_resize: int | None = None,
           val_crop: int | None = None, auto_augment: str | None = None, random_erasing: float = 0.0) -> "Preparation":
        """``image_size`` is the shorthand: the crops default to it, the validation resize to the
        validation crop / 0.875."""
        val_crop = val_crop or image_size
        return cls(train_crop or image_size, val_resize or int(round(val_crop / VAL_CROP_FRACTION)), val_crop,
                   auto_augment, random_erasing)

    def __post_init__(self):
        parse_auto_augment(self.auto_augment)  # refuses a bad policy early, whoever builds this
        if not 0 <= self.random_erasing <= 1:
            raise ConfigError(f"--random-erasing is a probability in [0, 1], got {self.random_erasing:g}")
        if self.val_resize < self.val_crop:
            raise ConfigError(f"--val-resize-size {self.val_resize} is smaller than --val-crop-size {self.val_crop}: "
                              "the centre crop must fit in the resized image")

    @property
    def policy(self) -> tuple[str, int, int] | None:
        return parse_auto_augment(self.auto_augment)

    @property
    def augmented(self) -> bool:
        return self.policy is not None or self.random_erasing > 0

    def refuse_augmentation(self, loader: str) -> None:
        """CIFAR's device-resident loader augments whole batches with one draw per tensor op: a
        per-image policy there is not built, so it says so instead of training without it."""
        for flag, value in (("--auto-augment", self.auto_augment if self.policy else None),
                            ("--random-erasing", self.random_erasing or None)):
            if value is not None:
                raise ConfigError(f"{flag} {value} is not supported by the {loader} (it crops and flips on the "
                                  "device only); use an image folder (DALI or torchvision loader)")


def torch_train_ops(prep: Preparation) -> tuple[list, list]:
    """(ops on the PIL crop before the tensor conversion, ops on the normalised tensor):
    ``torchvision.transforms.v2``'s policy and RandomErasing (value 0: the mean colour)."""
    from torchvision.transforms import v2

    before, after = [], []
    policy = prep.policy
    if policy is not None:
        name, n, m = policy
        before.append(v2.RandAugment(num_ops=n, magnitude=m) if name == "randaugment" else
                      v2.TrivialAugmentWide() if name == "trivialaugment" else
                      v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    if prep.random_erasing > 0:
        after.append(v2.RandomErasing(p=prep.random_erasing, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=0))
    return before, after


LOG_RATIO = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))  # the box's aspect is log-uniform (torchvision)
