"""Listing of ImageNet-layout folders (``<split>/<class>/<image>``) with clear errors.

Class index = position of the folder name in sorted order, as torchvision's ImageFolder."""
from __future__ import annotations

import os
from dataclasses import dataclass

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# What the first bytes of a readable image look like; a cheap check that catches truncated,
# empty or mislabelled files without decoding them.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


class BadDataError(ValueError):
    pass


@dataclass
class FileList:
    files: list[str]
    labels: list[int]
    classes: list[str]
    skipped: list[str]


def list_image_folder(split_root: str, skip_bad: bool = False) -> FileList:
    """Every image of ``split_root/<class>/``, with its class index. A missing folder, no class
    folders or an empty class raise; a non-image or unreadable file raises with its path, unless
    ``skip_bad``, which leaves it out and reports it in ``skipped``."""
    if not os.path.isdir(split_root):
        raise BadDataError(f"{split_root!r} does not exist or is not a folder (expected <split>/<class>/<image>)")
    classes = sorted(d.name for d in os.scandir(split_root) if d.is_dir())
    if not classes:
        raise BadDataError(f"{split_root!r} has no class folders (expected {split_root}/<class>/<image>)")
    files, labels, skipped = [], [], []
    for index, name in enumerate(classes):
        folder = os.path.join(split_root, name)
        entries = sorted(e.path for e in os.scandir(folder) if e.is_file())
        good = []
        for path in entries:
            problem = _problem(path)
            if problem is None:
                good.append(path)
            elif skip_bad:
                skipped.append(path)
            else:
                raise BadDataError(f"{path!r}: {problem} (pass skip_bad / --skip-bad-files to leave such files out)")
        if not good:
            raise BadDataError(f"class folder {folder!r} has no images")
        files += good
        labels += [index] * len(good)
    return FileList(files, labels, classes, skipped)


def _problem(path: str) -> str | None:
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image file (extension)"
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(_MAGIC):
        return "not a readable image (empty, truncated or not an image)"
    return None
