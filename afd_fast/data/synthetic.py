"""Synthetic data: the embedded default data set, a small JPEG image folder with learnable class
structure.

Each class has its own colour and stripe orientation; every image adds a random phase, random
brightness and pixel noise, so a network must learn the structure (a single pixel does not give
the class away). Written once, then reused from the cache folder."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

VERSION = 1


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "afd_fast")


def synthetic_image_folder(root: str | None = None, num_classes: int = 10, train_per_class: int = 100,
                           val_per_class: int = 30, size: int = 32, seed: int = 0) -> str:
    """Path of the synthetic ImageNet-layout folder, generated on first use."""
    root = root or os.path.join(default_cache_dir(), f"synthetic-v{VERSION}-{num_classes}c-{train_per_class}"
                                                      f"-{val_per_class}-{size}px-s{seed}")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            folder = os.path.join(root, split, f"class{c:03d}")
            os.makedirs(folder, exist_ok=True)
            angle = math.pi * c / num_classes
            colour = 0.5 + 0.4 * np.array([math.cos(2 * math.pi * c / num_classes + s) for s in (0, 2.1, 4.2)])
            for i in range(count):
                phase = rng.uniform(0, 2 * math.pi)
                stripes = 0.5 + 0.5 * np.sin(2 * math.pi * 4 * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
                img = stripes[..., None] * colour * rng.uniform(0.7, 1.1) + rng.normal(0, 0.08, (size, size, 3))
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
                    os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    open(done, "w").close()
    return root

