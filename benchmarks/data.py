"""Images/s of the data paths, measured in one run.

    python benchmarks/data.py                  # 224 px, batch 256 on CUDA / 64 on the CPU
    python benchmarks/data.py --quick          # a smoke run (what CI runs)

On ../shared/data/imagenette-mini (real ImageNet JPEGs), training augmentation at --image-size:
DALI with CPU decoding, DALI with GPU ("mixed") decoding when a GPU is present, and the
torchvision DataLoader (the fallback), each with --workers threads/processes, each plain (crop,
flip, normalise), with each --auto-augment policy, with --random-erasing 0.25, and plain followed by
mixup 0.2 / CutMix 1.0 on the training device (afd_fast.mixing, as the trainer runs it inside the
step); ratios to the same loader's plain pipeline and (plain rows) to the torchvision DataLoader's. Then the device-resident CIFAR loader (crop, flip, normalise on the
device) on a synthetic CIFAR-sized set (50,000 32x32 images). Batches count as delivered when they
are on the training device; each epoch's first batch (pipeline start-up) is not timed. Writes benchmarks/results/data-<device>.json naming the machine.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from afd_fast.data import Preparation, build_loaders  # noqa: E402
from afd_fast.data.cifar import CifarLoader  # noqa: E402
from afd_fast.data.dali import dali_available  # noqa: E402
from afd_fast.mixing import Mixing  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGENETTE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "imagenette-mini")
# label -> Preparation options; the first is each loader's baseline
AUGMENTATIONS = {"plain": {}, "randaugment 2:9": dict(auto_augment="randaugment"),
                 "trivialaugment": dict(auto_augment="trivialaugment"), "autoaugment": dict(auto_augment="autoaugment"),
                 "random erasing 0.25": dict(random_erasing=0.25)}
# the plain pipeline, then mixing on the training device (not a loader option: the trainer mixes in the step)
MIXING = {"mixup 0.2 / CutMix 1.0 (device)": Mixing(mixup=0.2, cutmix=1.0)}
QUICK_AUGMENTATIONS = ("plain", "trivialaugment", "random erasing 0.25", *MIXING)


def images_per_second(epochs, device: torch.device, batches: int, mixing: Mixing | None = None) -> float:
    """Batches count as delivered once on the training device (and mixed there, with ``mixing``)."""
    def deliver(batch) -> int:
        x, y = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixing is not None:
            mixing(x, y)
        return x.shape[0]

    return common.epoch_throughput(epochs, deliver, device, batches, warmup=2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=IMAGENETTE, help="ImageNet-layout JPEG folder")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 64 on the CPU")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DALI threads / DataLoader processes")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per loader")
    parser.add_argument("--quick", action="store_true",
                        help="64 px, batch 16, 3 batches, plain, trivialaugment and erasing only (a smoke run)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/data-<device>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = 64 if args.quick else args.image_size
    batch = 16 if args.quick else args.batch_size or (256 if cuda else 64)
    batches = args.batches or (3 if args.quick else 30 if cuda else 10)
    info = common.machine(device)
    print(f"afd_fast data benchmark on {common.machine_name(info)}, {size} px, batch {batch}, "
          f"{args.workers} workers")

    loaders = {"torchvision DataLoader": dict(backend="torch", device=torch.device("cpu"))}
    if dali_available():
        loaders["DALI, CPU decode"] = dict(backend="dali", device=torch.device("cpu"))
        if cuda:
            loaders["DALI, GPU decode (mixed)"] = dict(backend="dali", device=device)
    else:
        print("NVIDIA DALI is not installed: no DALI rows (pip install nvidia-dali-cuda130)")
    if not args.data or not os.path.isdir(args.data):
        print(f"no JPEG folder at {args.data!r} (--data): only the CIFAR row")
        loaders = {}
    results = []
    for label, options in loaders.items():
        plain = None
        for augmentation in QUICK_AUGMENTATIONS if args.quick else (*AUGMENTATIONS, *MIXING):
            prep = Preparation.of(size, **AUGMENTATIONS.get(augmentation, {}))
            built = build_loaders(args.data, prep, batch, args.workers, seed=0, **options)
            rate = images_per_second(built.train_epoch, device, batches, MIXING.get(augmentation))
            plain = plain or rate  # "plain" comes first
            results.append({"loader": label, "augmentation": augmentation,
                            "source": os.path.basename(os.path.normpath(args.data)), "image_size": size,
                            "batch_size": batch, "img_per_s": rate, "vs_plain": rate / plain})

    # CIFAR-sized: the whole set as uint8 on the device, augmentation there too
    g = torch.Generator().manual_seed(0)
    n = 5_000 if args.quick else 50_000
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (n,), generator=g)
    cifar = CifarLoader(images, labels, 128, True, device)
    rate = images_per_second(cifar.for_epoch, device, batches * 4)
    results.append({"loader": f"CIFAR loader on the {device.type}", "augmentation": "plain (its crop and flip)",
                    "source": f"synthetic {n} x 32x32", "image_size": 32, "batch_size": 128, "img_per_s": rate,
                    "vs_plain": 1.0})

    baseline = results[0]["img_per_s"]
    rows = []
    for r in results:
        comparable = r["augmentation"] == "plain" and r["image_size"] == size and r is not results[-1]
        r["vs_torchvision"] = r["img_per_s"] / baseline if comparable else None
        rows.append([r["loader"], r["augmentation"], r["source"], f"{r['image_size']} px", str(r["batch_size"]),
                     f"{r['img_per_s']:.0f}", f"{r['vs_plain']:.2f}x",
                     f"{r['vs_torchvision']:.2f}x" if comparable else "n/a"])
    common.print_table(["loader", "augmentation", "data", "size", "batch", "img/s", "vs plain", "vs torchvision"],
                       rows)
    out = args.output or os.path.join(HERE, "results", f"data-{device.type}.json")
    payload = {"benchmark": "data", "device": device.type, "machine": info, "workers": args.workers,
               "timed_batches": batches, "results": results}
    common.write_json(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
