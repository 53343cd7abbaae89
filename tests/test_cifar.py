"""CIFAR-10/100 in the official python format (small fakes), loaded to the device and augmented there."""
import os
import pickle

import numpy as np
import pytest
import torch

from afd_fast import train
from afd_fast.data import build_loaders
from afd_fast.data.cifar import CifarLoader, augment, find_cifar, load_cifar


def _write(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _write(folder / f"data_batch_{i}", {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                                            b"labels": list(rng.integers(0, 10, 8))})
    _write(folder / "test_batch", {b"data": rng.integers(0, 256, (11, 3072), dtype=np.uint8),
                                   b"labels": list(rng.integers(0, 10, 11))})
    _write(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return str(root)


def test_cifar10_and_cifar100_files(cifar10, tmp_path):
    tx, ty, vx, vy, classes = load_cifar(find_cifar(cifar10))
    assert tx.shape == (40, 32, 32, 3) and tx.dtype == torch.uint8 and vx.shape == (11, 32, 32, 3)
    assert ty.shape == (40,) and len(classes) == 10
    raw = pickle.load(open(os.path.join(find_cifar(cifar10), "data_batch_1"), "rb"), encoding="bytes")[b"data"]
    assert torch.equal(tx[0, :, :, 0].flatten(), torch.from_numpy(raw[0, :1024]))  # red plane, row-major
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write(folder / "train", {b"data": np.zeros((6, 3072), np.uint8), b"fine_labels": [0, 99, 5, 5, 1, 2]})
    _write(folder / "test", {b"data": np.zeros((3, 3072), np.uint8), b"fine_labels": [3, 4, 5]})
    _write(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    tx, ty, _, _, classes = load_cifar(find_cifar(str(tmp_path)))
    assert len(classes) == 100 and ty.tolist() == [0, 99, 5, 5, 1, 2]
    # each data set by its own statistics: a black image is -mean/std of CIFAR-100 here
    loaders = build_loaders(str(tmp_path), 32, 3, workers=1, seed=0)
    images, _ = next(iter(loaders.val))
    want = -torch.tensor([0.5071, 0.4865, 0.4409]) / torch.tensor([0.2673, 0.2564, 0.2762])
    torch.testing.assert_close(images[0, :, 0, 0], want)


def test_bad_cifar_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write(folder / "data_batch_1", {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    with pytest.raises(FileNotFoundError, match="data_batch_2' is missing"):
        load_cifar(str(folder))


def test_augment_is_a_padded_crop_or_its_mirror():
    x = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    out = augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (0, 0, 4, 4, 4, 4))
    for i in range(16):
        found = any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(1))
                    for oy in range(9) for ox in range(9) for c in [padded[i, oy:oy + 32, ox:ox + 32]])
        assert found, i


def test_loader_shards_order_and_layout(cifar10):
    tx, ty, vx, vy, _ = load_cifar(find_cifar(cifar10))
    cpu = torch.device("cpu")
    shards = [CifarLoader(tx, ty, 5, True, cpu, seed=2, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == 4  # 20 images per process, full batches of 5
    images, labels = next(iter(shards[0].for_epoch(0)))
    assert images.shape == (5, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
    assert abs(float(images.mean())) < 0.5
    a = [lbl for _, lbl in shards[0].for_epoch(1)]
    b = [lbl for _, lbl in CifarLoader(tx, ty, 5, True, cpu, seed=2, rank=0, world_size=2).for_epoch(1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    val = [CifarLoader(vx, vy, 4, False, cpu, rank=r, world_size=2) for r in range(2)]
    assert sum(len(lbl) for v in val for _, lbl in v) == 11  # every test image exactly once


def test_trainer_reads_cifar(cifar10, tmp_path):
    summary = train.main(["--data", cifar10, "--output", str(tmp_path), "--workers", "0", "--batch-size", "8",
                          "--epochs", "1", "--max-steps", "2"])
    assert summary["steps"] == 2 and summary["val_images"] == 11
