"""Listing of ImageNet-layout folders (``<split>/<class>/<image>``) and file lists, with clear errors.

Class index = position of the folder name in sorted order, as torchvision's ImageFolder. A file
list (DALI's ``file_list`` format) has one ``<path> <label>`` line per image, the path relative to
the list's folder (or absolute), the label an integer class index.

Every file gets cheap checks at listing: an image extension, an image signature in its first
bytes, and for JPEGs the end-of-image marker near the end (a truncated file lacks it: the marker
cannot occur inside JPEG entropy-coded data; a file without it in its last KiB, such as one with
appended data, is decoded to decide). ``verify=True`` decodes every file fully (PIL, in parallel)
to find files whose inside does not decode (broken headers or markers); damage that still decodes,
to wrong pixels, no decoder can see. It costs a pass over the data set."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from afd_fast.errors import BadDataError  # noqa: F401  (part of this module's API)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_JPEG = b"\xff\xd8\xff"
_MAGIC = (_JPEG, b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
_JPEG_END, _JPEG_TAIL = b"\xff\xd9", 1024  # the end marker may be followed by a little padding
SKIP_HINT = "pass --skip-bad-files (skip_bad=True) to leave such files out"


@dataclass
class FileList:
    files: list[str]
    labels: list[int]
    classes: list[str]
    skipped: list[str]


def list_image_folder(split_root: str, skip_bad: bool = False, verify: bool = False, workers: int = 1) -> FileList:
    """Every image of ``split_root/<class>/``, with its class index. A missing folder, no class
    folders or an empty class raise; a non-image, truncated or (with ``verify``) undecodable file
    raises with its path, unless ``skip_bad``, which leaves it out and reports it in ``skipped``."""
    if not os.path.isdir(split_root):
        raise BadDataError(f"{split_root!r} does not exist or is not a folder (expected <split>/<class>/<image>)")
    classes = sorted(d.name for d in os.scandir(split_root) if d.is_dir())
    if not classes:
        raise BadDataError(f"{split_root!r} has no class folders (expected {split_root}/<class>/<image>)")
    entries = [(index, sorted(e.path for e in os.scandir(os.path.join(split_root, name)) if e.is_file()))
               for index, name in enumerate(classes)]
    paths = [p for _, files in entries for p in files]
    problems = _problems(paths, skip_bad, verify, workers)
    files, labels = [], []
    for index, class_files in entries:
        good = [p for p in class_files if p not in problems]
        if not good:
            raise BadDataError(f"class folder {os.path.join(split_root, classes[index])!r} has no usable images")
        files += good
        labels += [index] * len(good)
    return FileList(files, labels, classes, [p for p in paths if p in problems])


def read_file_list(list_path: str, skip_bad: bool = False, verify: bool = False, workers: int = 1) -> FileList:
    """The images and labels of a ``<path> <label>`` file list; the same checks as
    :func:`list_image_folder`, plus a line that does not parse or names a missing file raises
    with its line number. Classes are ``"0" .. str(max label)``."""
    if not os.path.isfile(list_path):
        raise BadDataError(f"file list {list_path!r} does not exist")
    base = os.path.dirname(os.path.abspath(list_path))
    paths, labels = [], []
    with open(list_path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rstrip("\n").rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise BadDataError(f"{list_path}:{number}: expected '<path> <label>' with an integer label >= 0, "
                                   f"got {line.strip()!r}")
            path = os.path.join(base, parts[0].strip())
            if not os.path.isfile(path):
                raise BadDataError(f"{list_path}:{number}: {path!r} does not exist")
            paths.append(path)
            labels.append(int(parts[1]))
    if not paths:
        raise BadDataError(f"file list {list_path!r} lists no images")
    problems = _problems(paths, skip_bad, verify, workers, where=f" (in {list_path})")
    kept = [(p, y) for p, y in zip(paths, labels) if p not in problems]
    if not kept:
        raise BadDataError(f"file list {list_path!r} has no usable images")
    return FileList([p for p, _ in kept], [y for _, y in kept], [str(i) for i in range(max(labels) + 1)],
                    [p for p in paths if p in problems])


def _problems(paths: list[str], skip_bad: bool, verify: bool, workers: int, where: str = "") -> dict[str, str]:
    """{path: why} of the bad files among paths (cheap checks, and a full decode with ``verify``);
    raises on the first one unless ``skip_bad``."""
    problems = {p: why for p, why in zip(paths, map(_problem, paths)) if why}
    if verify:
        problems.update(decode_problems([p for p in paths if p not in problems], workers))
    if problems and not skip_bad:
        path = next(p for p in paths if p in problems)
        more = f" ({len(problems) - 1} more such files)" if len(problems) > 1 else ""
        raise BadDataError(f"{path!r}{where}: {problems[path]}{more}; {SKIP_HINT}")
    return problems


def _problem(path: str) -> str | None:
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image file (extension)"
    with open(path, "rb") as f:
        head = f.read(4)
        if not head.startswith(_MAGIC):
            return "not a readable image (empty, truncated or not an image)"
        if head.startswith(_JPEG):
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - _JPEG_TAIL, 0))
            if _JPEG_END not in f.read() and _decode_problem(path):
                return "truncated JPEG (no end-of-image marker, does not decode)"
    return None


def _decode_problem(path: str) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as e:  # PIL raises several types for corrupt data
        return f"cannot be decoded ({type(e).__name__}: {e})"
    return None


def decode_problems(paths: list[str], workers: int = 1) -> dict[str, str]:
    """{path: why} for the files that do not decode fully (PIL), checked by ``workers`` processes."""
    if workers <= 1 or len(paths) < 64:
        found = map(_decode_problem, paths)
        return {p: why for p, why in zip(paths, found) if why}
    with ProcessPoolExecutor(workers) as pool:
        found = pool.map(_decode_problem, paths, chunksize=64)
        return {p: why for p, why in zip(paths, found) if why}
