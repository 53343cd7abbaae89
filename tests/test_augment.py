"""--auto-augment, --random-erasing, the train/val sizes and --save-samples on the real JPEGs of
imagenette-mini: each image loader (torchvision, DALI on the CPU) applies each policy (the batches
differ from the plain pipeline's, the same seed gives the same batch, values stay in the
normalised range), erases the expected share of images, resumes an augmented epoch exactly and
keeps the calibration batches unaugmented; the CIFAR loader refuses them; the flags through the
configuration, the trainer (a sample grid) and torchrun."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from afd_fast import train
from afd_fast.config import resolve, resume_differences
from afd_fast.data import Preparation, build_loaders, synthetic_image_folder
from afd_fast.data.augment import parse_auto_augment
from afd_fast.data.dali import dali_available
from afd_fast.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from afd_fast.errors import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cifar import cifar10  # noqa: E402, F401  (a fixture: a small fake CIFAR-10)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENETTE = os.environ.get("AFD_FAST_IMAGENETTE", os.path.join(os.path.dirname(ROOT), "shared", "data",
                                                                  "imagenette-mini"))
needs_data = pytest.mark.skipif(not os.path.isdir(IMAGENETTE), reason="needs ../shared/data/imagenette-mini")
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI"))]
POLICIES = ["randaugment", "randaugment:3:15", "trivialaugment", "autoaugment"]
SIZE = 32
# the normalised range of [0, 1] pixels, per channel
LOW = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
HIGH = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)


def _loaders(backend, batch=16, seed=0, **prep):
    prep = Preparation.of(SIZE, **prep)
    return build_loaders(IMAGENETTE, prep, batch, workers=0 if backend == "torch" else 2, seed=seed, backend=backend)


def _first_batch(backend, **prep):
    images, labels = next(iter(_loaders(backend, **prep).train_epoch(0)))
    return images.float().contiguous(), labels


def _erased(images):
    """Which images hold a box of zeros: a pixel at 0 in every channel after the normalisation
    (no uint8 colour normalises to exactly 0: the means are not multiples of 1/255)."""
    return (images == 0).all(dim=1).flatten(1).any(dim=1)


@pytest.mark.parametrize("text, want", [
    (None, None), ("none", None), ("randaugment", ("randaugment", 2, 9)), ("RandAugment:3:15", ("randaugment", 3, 15)),
    ("trivialaugment", ("trivialaugment", 2, 9)), ("autoaugment", ("autoaugment", 2, 9))])
def test_policy_names(text, want):
    assert parse_auto_augment(text) == want


@pytest.mark.parametrize("text", ["randaugment:2", "randaugment:0:9", "randaugment:2:31", "trivialaugment:2:9",
                                  "augmix", "randaugment:a:b"])
def test_bad_policies_are_refused(text):
    with pytest.raises(ConfigError, match="--auto-augment"):
        parse_auto_augment(text)


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", POLICIES + ["erasing"])
def test_each_loader_applies_each_policy(backend, policy):
    prep = dict(random_erasing=0.5) if policy == "erasing" else dict(auto_augment=policy)
    plain, labels = _first_batch(backend)
    got, got_labels = _first_batch(backend, **prep)
    again, _ = _first_batch(backend, **prep)
    assert torch.equal(labels, got_labels)  # the same images, in the same order (crops too: the seed)
    assert torch.equal(got, again)  # deterministic under the seed
    differs = (got - plain).abs().flatten(1).amax(1) > 1e-3
    assert differs.float().mean() >= 0.25, f"{policy} changed {int(differs.sum())} of {len(differs)} images"
    assert torch.isfinite(got).all()
    assert (got >= LOW - 1e-3).all() and (got <= HIGH + 1e-3).all()  # still [0, 1] pixels, normalised
    assert not _erased(plain).any()
    if policy == "erasing":
        assert _erased(got)[differs].all() and _erased(got).sum() == differs.sum()


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_share_of_erased_images(backend):
    """P = 0.3 over 320 images: the erased count within 4 standard deviations of the binomial's mean."""
    n, p = 320, 0.3
    erased = 0
    for _, (images, _) in zip(range(n // 32), _loaders(backend, batch=32, random_erasing=p).train_epoch(0)):
        erased += int(_erased(images.float()).sum())
    assert abs(erased - n * p) <= 4 * math.sqrt(n * p * (1 - p)), erased


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_augmented_epoch_resumes_exactly(backend):
    """The batches after a mid-epoch stop (DALI: its pipeline checkpoint, the auto_aug and erasing
    draws included; torchvision: the position) equal the uninterrupted epoch's."""
    prep = dict(auto_augment="trivialaugment", random_erasing=0.5)
    run = _loaders(backend, batch=8, **prep)
    epoch = iter(run.train_epoch(1))
    first = [next(epoch) for _ in range(2)]
    state = run.train_state()
    want = [next(epoch) for _ in range(2)]
    resumed = iter(_loaders(backend, batch=8, **prep).train_epoch(1, start_batch=2, state=state))
    for (x, y), (wx, wy) in zip([next(resumed) for _ in range(2)], want):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    assert not torch.equal(first[0][0], want[0][0])


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_sizes_and_unaugmented_calibration(backend):
    loaders = _loaders(backend, batch=8, train_crop=40, val_resize=48, val_crop=24, auto_augment="autoaugment",
                       random_erasing=1.0)
    assert next(iter(loaders.train_epoch(0)))[0].shape == (8, 3, 40, 40)
    assert next(iter(loaders.val))[0].shape == (8, 3, 24, 24)
    plain = _loaders(backend, batch=8, train_crop=40, val_resize=48, val_crop=24)
    got, want = next(iter(loaders.calibration_batches(1))), next(iter(plain.calibration_batches(1)))
    assert got[0].shape == (8, 3, 24, 24) and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cifar_loader_refuses_the_augmentations(cifar10):
    assert build_loaders(cifar10, Preparation.of(32, train_crop=40), 4, 0, 0).backend == "cifar"  # sizes: 32
    for prep, flag in ((dict(auto_augment="trivialaugment"), "--auto-augment"), (dict(random_erasing=0.1),
                                                                                "--random-erasing")):
        with pytest.raises(ConfigError, match=f"{flag} .* not supported by the CIFAR loader"):
            build_loaders(cifar10, Preparation.of(32, **prep), 4, 0, 0)


def test_sizes_through_the_configuration(tmp_path):
    def prep(**flags):
        return resolve({"arch": "resnet18,resnet18", "recipe": "quick", **flags}).preparation

    assert (prep(image_size=224).train_crop, prep(image_size=224).val_resize, prep(image_size=224).val_crop) \
        == (224, 256, 224)  # --image-size alone: as before the separate sizes
    p = prep(image_size=224, train_crop_size=176, val_resize_size=232)
    assert (p.train_crop, p.val_resize, p.val_crop) == (176, 232, 224)
    p = prep(image_size=224, val_crop_size=192)
    assert (p.train_crop, p.val_resize, p.val_crop) == (224, 219, 192)
    for flags, match in ((dict(random_erasing=1.5), "--random-erasing"), (dict(auto_augment="mixup"), "--auto-augment"),
                         (dict(val_resize_size=20, val_crop_size=32), "--val-resize-size 20 is smaller"),
                         (dict(train_crop_size=0), "--train-crop-size must be at least 1"),
                         (dict(save_samples=-1), "--save-samples")):
        with pytest.raises(ConfigError, match=match):
            prep(**flags)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 2\nbatch_size: 8\nlr: 0.1\nweight_decay: 1e-4\nadv_lr: 1e-4\nimage_size: 32\n"
                      "train_crop_size: 24\nauto_augment: trivialaugment\nrandom_erasing: 0.1\n")
    config = resolve({"recipe": str(recipe)})
    assert (config.preparation.train_crop, config.auto_augment, config.random_erasing) == (24, "trivialaugment", 0.1)
    old = resolve({"recipe": "quick"}).settings()
    refuse, warn = resume_differences(old, resolve({"recipe": "quick", "train_crop_size": 24,
                                                    "auto_augment": "autoaugment"}))
    assert refuse == ["--train-crop-size None -> 24"]  # the networks are built at it
    assert warn == ["--auto-augment None -> autoaugment"]


def test_save_samples_writes_the_first_training_images(tmp_path, capsys):
    data = synthetic_image_folder(str(tmp_path / "data"), num_classes=3, train_per_class=8, val_per_class=2)
    out = tmp_path / "run"
    train.main(["--data", data, "--output", str(out), "--loader", "torch", "--workers", "0", "--batch-size", "4",
                "--epochs", "1", "--max-steps", "1", "--image-size", "16", "--auto-augment", "trivialaugment",
                "--random-erasing", "0.5", "--save-samples", "6"])
    assert "6 training images of epoch 0" in capsys.readouterr().out
    grid = torch.tensor(list(Image.open(out / "samples.png").convert("RGB").getdata()), dtype=torch.float32)
    grid = grid.view(2 + 2 * 18, 2 + 3 * 18, 3)  # 3 per row, 2 rows of 16 px with 2 px of padding
    config = resolve({"data": data, "image_size": 16, "batch_size": 4, "auto_augment": "trivialaugment",
                      "random_erasing": 0.5, "workers": 0, "loader": "torch"})
    want = train.build_data(config, 0, 1, torch.device("cpu")).sample_images(6)
    tile = grid[2:18, 2:18].permute(2, 0, 1) / 255  # the first image
    assert (tile - want[0]).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.slow
def test_augmentation_under_torchrun(tmp_path):
    data = synthetic_image_folder(str(tmp_path / "data"), num_classes=3, train_per_class=16, val_per_class=5)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "afd_fast.train",
           "--data", data, "--output", str(tmp_path / "out"), "--workers", "0", "--loader", "torch",
           "--batch-size", "8", "--epochs", "1", "--max-steps", "2", "--auto-augment", "trivialaugment",
           "--random-erasing", "0.25",
           "--train-crop-size", "24", "--save-samples", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 process(es)" in proc.stdout and "trivialaugment, random erasing 0.25" in proc.stdout
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 2
    assert (tmp_path / "out" / "samples.png").is_file()
