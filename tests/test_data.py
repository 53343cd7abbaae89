"""Data loading on real JPEGs (../shared/data/imagenette-mini): DALI CPU pipelines and folder checks."""
import os
import shutil

import pytest
import torch

from afd_fast.data.dali import DALILoader, dali_available
from afd_fast.data.folder import BadDataError, list_image_folder
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENETTE = os.environ.get("AFD_FAST_IMAGENETTE", os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenette-mini"))
needs_data = pytest.mark.skipif(not os.path.isdir(IMAGENETTE), reason=f"no imagenette-mini at {IMAGENETTE}")
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")


class PathsLoader(DALILoader):
    """DALILoader whose pipeline also hands out the file each sample came from (DALI's source_info):
    ``epoch_with_paths()`` runs one epoch of the shard as (images, labels, paths); CPU pipelines only."""

    def _outputs(self, images, labels, jpegs):
        from nvidia.dali import fn

        return (*super()._outputs(images, labels, jpegs), fn.get_property(jpegs, key="source_info"))

    def _iterator(self, policy):
        return None  # file names have different lengths: no DALIGenericIterator

    def epoch_with_paths(self):
        seen, batch_size = 0, self.pipe.max_batch_size
        while seen < self.shard_size:
            images, labels, paths = self.pipe.run()
            take = min(batch_size, self.shard_size - seen)
            imgs, lbls = self._to_torch(torch.from_numpy(images.as_array()), torch.from_numpy(labels.as_array()))
            yield imgs[:take], lbls[:take], [bytes(paths.at(i)).decode() for i in range(take)]
            seen += take


@needs_data
def test_folder_listing_labels_follow_sorted_class_names():
    fl = list_image_folder(os.path.join(IMAGENETTE, "val"))
    assert len(fl.files) == 500 and fl.classes == sorted(fl.classes) and len(fl.classes) == 10
    for path, label in zip(fl.files, fl.labels):
        assert os.path.basename(os.path.dirname(path)) == fl.classes[label]


@needs_data
@needs_dali
def test_dali_train_batches_are_channels_last_and_normalised():
    fl = list_image_folder(os.path.join(IMAGENETTE, "train"))
    loader = DALILoader(fl, 64, 32, train=True, seed=1, threads=2)
    assert len(loader) == 2000 // 32
    images, labels = next(iter(loader))
    assert images.shape == (32, 3, 64, 64) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and labels.shape == (32,) and 0 <= labels.min() and labels.max() < 10
    assert abs(float(images.mean())) < 0.5 and 0.6 < float(images.std()) < 1.5  # ImageNet mean/std removed


@needs_data
@needs_dali
def test_dali_labels_match_folders_and_two_shards_cover_val_exactly_once():
    fl = list_image_folder(os.path.join(IMAGENETTE, "val"))
    seen = []
    for shard in range(2):
        loader = PathsLoader(fl, 48, 64, train=False, shard_id=shard, num_shards=2, threads=2)
        for images, labels, paths in loader.epoch_with_paths():
            assert images.shape[1:] == (3, 48, 48)
            for label, path in zip(labels.tolist(), paths):
                assert fl.classes[label] == os.path.basename(os.path.dirname(path))
            seen += paths
    assert sorted(seen) == sorted(fl.files)  # every image once, no padding duplicates


@needs_data
@needs_dali
def test_dali_validation_is_deterministic_and_training_order_follows_the_seed():
    fl = list_image_folder(os.path.join(IMAGENETTE, "val"))
    runs = [[b for b in DALILoader(fl, 32, 50, train=False, threads=2)] for _ in range(2)]
    for (a, la), (b, lb) in zip(*runs):
        assert torch.equal(a, b) and torch.equal(la, lb)
    def first_paths(seed, epoch=0):
        loader = PathsLoader(fl, 32, 50, train=True, seed=seed, epoch=epoch, threads=2)
        return next(loader.epoch_with_paths())[2]
    assert first_paths(3) == first_paths(3)
    assert first_paths(3) != first_paths(4) and first_paths(3) != first_paths(3, epoch=1)


@needs_data
@needs_dali
def test_dali_training_shards_are_disjoint():
    fl = list_image_folder(os.path.join(IMAGENETTE, "val"))
    shards = [{p for _, _, paths in PathsLoader(fl, 32, 50, train=True, seed=5, epoch=2, shard_id=r, num_shards=2,
                                                threads=2).epoch_with_paths() for p in paths}
              for r in range(2)]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 500


def _jpeg(path, seed=0, size=160):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path, quality=90)
    return path


def _corrupt_middle(path):
    """Garbage after the first header, start and end markers intact: the cheap checks pass, a
    decoder fails."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[:20] + bytes(range(256)) * (len(data) // 256) + data[-2:])


def test_bad_folders_give_errors_that_name_the_path(tmp_path):
    with pytest.raises(BadDataError, match="does not exist"):
        list_image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(BadDataError, match="has no class folders"):
        list_image_folder(str(tmp_path / "empty_root"))
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    _jpeg(root / "a" / "x.jpg")
    with pytest.raises(BadDataError, match=r"class folder .*b' has no usable images"):
        list_image_folder(str(root))
    _jpeg(root / "b" / "y.jpg", seed=1)
    (root / "b" / "notes.txt").write_text("hello")
    with pytest.raises(BadDataError, match=r"notes.txt.*not an image file.*--skip-bad-files"):
        list_image_folder(str(root))
    os.remove(root / "b" / "notes.txt")
    (root / "b" / "broken.jpg").write_bytes(b"")
    with pytest.raises(BadDataError, match=r"broken.jpg.*not a readable image"):
        list_image_folder(str(root))
    fl = list_image_folder(str(root), skip_bad=True)
    assert [os.path.basename(p) for p in fl.skipped] == ["broken.jpg"] and fl.labels == [0, 1]


def test_truncated_and_corrupt_jpegs(tmp_path):
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        _jpeg(root / "a" / f"{i}.jpg", seed=i)
    data = open(root / "a" / "0.jpg", "rb").read()
    open(root / "a" / "0.jpg", "wb").write(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(BadDataError, match=r"0.jpg'.*truncated JPEG"):
        list_image_folder(str(root))
    os.remove(root / "a" / "0.jpg")
    _corrupt_middle(root / "a" / "1.jpg")
    assert len(list_image_folder(str(root)).files) == 2  # the cheap checks cannot see it
    with pytest.raises(BadDataError, match=r"1.jpg'.*cannot be decoded"):
        list_image_folder(str(root), verify=True)
    fl = list_image_folder(str(root), skip_bad=True, verify=True)
    assert [os.path.basename(p) for p in fl.files] == ["2.jpg"] and len(fl.skipped) == 1
    for i in range(3, 70):  # enough files for the process pool
        _jpeg(root / "a" / f"{i}.jpg", seed=i, size=16)
    _corrupt_middle(root / "a" / "50.jpg")
    fl = list_image_folder(str(root), skip_bad=True, verify=True, workers=2)
    assert sorted(os.path.basename(p) for p in fl.skipped) == ["1.jpg", "50.jpg"] and len(fl.files) == 67


@needs_dali
@pytest.mark.parametrize("train", [True, False])
def test_dali_names_a_corrupt_file_it_cannot_decode(tmp_path, train):
    root = tmp_path / "val"
    (root / "a").mkdir(parents=True)
    for i in range(40):  # the corrupt file far behind the first batches: found by the reader's position
        _jpeg(root / "a" / f"{i:02d}.jpg", seed=i, size=96)
    _corrupt_middle(root / "a" / "33.jpg")
    fl = list_image_folder(str(root))
    with pytest.raises(BadDataError, match=r"33.jpg' cannot be decoded.*--verify-images --skip-bad-files"):
        for _ in DALILoader(fl, 32, 2, train=train, threads=1):
            pass


def test_torchvision_loader_names_a_corrupt_file(tmp_path):
    from afd_fast.data import build_loaders

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        for i in range(4):
            _jpeg(tmp_path / split / "a" / f"{i}.jpg", seed=i)
    _corrupt_middle(tmp_path / "val" / "a" / "2.jpg")
    loaders = build_loaders(str(tmp_path), 32, 2, 0, 0, backend="torch")
    with pytest.raises(BadDataError, match=r"2.jpg' cannot be decoded"):
        list(loaders.val)


@needs_data
@needs_dali
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dali_low_precision_output(dtype):
    fl = list_image_folder(os.path.join(IMAGENETTE, "val"))
    want, _ = next(iter(DALILoader(fl, 32, 8, train=False, threads=2)))
    got, _ = next(iter(DALILoader(fl, 32, 8, train=False, threads=2, dtype=dtype)))
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_file_list_input(tmp_path):
    from afd_fast.data import build_loaders
    from afd_fast.data.folder import read_file_list

    (tmp_path / "img").mkdir()
    for i in range(6):
        _jpeg(tmp_path / "img" / f"{i} a.jpg", seed=i, size=48)  # a space in the name: the label is the last field
    (tmp_path / "train.txt").write_text("# path label\n" + "".join(f"img/{i} a.jpg {i % 3}\n" for i in range(4)))
    (tmp_path / "val.txt").write_text("img/4 a.jpg 0\n\nimg/5 a.jpg 2\n")
    fl = read_file_list(str(tmp_path / "train.txt"))
    assert [os.path.basename(p) for p in fl.files] == [f"{i} a.jpg" for i in range(4)]
    assert fl.labels == [0, 1, 2, 0] and fl.classes == ["0", "1", "2"]
    loaders = build_loaders(str(tmp_path), 32, 2, 0, 0, backend="torch")
    assert loaders.num_classes == 3 and loaders.train_size == 4
    images, labels = next(iter(loaders.val))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 2]
    for text, message in (("img/0 a.jpg x\n", r"train.txt:1: expected '<path> <label>'"),
                          ("img/9.jpg 1\n", r"train.txt:1: .*9.jpg' does not exist"), ("", "lists no images")):
        (tmp_path / "train.txt").write_text(text)
        with pytest.raises(BadDataError, match=message):
            read_file_list(str(tmp_path / "train.txt"))
