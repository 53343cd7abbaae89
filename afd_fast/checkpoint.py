"""Checkpoints that survive preemption, crashes and full disks.

Files in the output folder (``--output``):

* ``last.pt``: the newest checkpoint: at the end of every epoch, every ``--checkpoint-every`` steps
  or ``--checkpoint-minutes``, and when a stop signal arrives (see :mod:`afd_fast.preemption`);
  it holds the exact position inside the epoch.
* ``previous.pt``: the checkpoint before it, kept as a fallback should ``last.pt`` be damaged.
* ``best.pt``: the epoch-end checkpoint with the best validation top-1 (a hard link where the
  file system has them, else a copy).

**Format.** A ``torch.save`` zip archive of a dict with ``"format": "afd_fast.checkpoint"`` and
``"version": 2``; everything is read back with ``weights_only=True``. Version 1 (no ``format`` key:
epoch-end checkpoints of earlier afd_fast) is upgraded on load; a newer version is refused. Keys:
``model``, ``optimizers`` (with the fp16 loss scale), the position ``epoch`` (the
epoch in progress, or the next one when ``batch`` is 0), ``batch`` (batches done in it), ``step``,
the layout that fixes what a batch is (``world_size``, ``batch_size`` per process, ``steps_per_epoch``,
``loader_backend``), ``best``, ``history`` (the epoch records), ``ranks`` (per process: every RNG state,
the batch-norm buffers, the epoch's running loss sums, the data loader's state), ``config`` (the
resolved settings, :meth:`afd_fast.config.Config.settings`; no schedule state: the rates are a
function of the configuration and the step) and ``reason``.

**Durable writes.** The state is copied to host memory (the only pause of training), then written
by a background thread: to ``<file>.tmp.<pid>`` in the same folder, flushed and fsynced, the
current ``last.pt`` hard-linked to ``previous.pt``, the new file renamed over ``last.pt``, the
folder fsynced. ``last.pt`` is therefore always a whole file, the old one or the new one, whatever
kills the process (``kill -9``, a full disk, power loss after the fsyncs). A failed write removes
its temporary file and leaves every earlier checkpoint as it was.

**Verified reads.** Loading checks the CRC-32 of every record of the zip archive (torch does not)
and the format, so a truncated or corrupt file is refused with its name and the reason. ``--resume``
without a path takes the newest complete checkpoint of the folder (by modification time: last.pt,
previous.pt, best.pt), naming any damaged newer one; ``--resume auto`` does the same when the
folder has a checkpoint and starts fresh when it has none.
"""
from __future__ import annotations

import copy
import errno
import glob
import os
import random
import shutil
import sys
import threading
import zipfile

import numpy as np
import torch

from afd_fast.errors import CheckpointError, CheckpointWriteError  # noqa: F401  (part of this module's API)

FORMAT, VERSION = "afd_fast.checkpoint", 2
LAST, PREVIOUS, BEST = "last.pt", "previous.pt", "best.pt"
CANDIDATES = (LAST, PREVIOUS, BEST)


# --- state ------------------------------------------------------------------------------------------

def host_copy(obj):
    """A copy of obj with every tensor copied to host memory: training may go on changing the
    originals while a background thread writes the copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = type(obj)((k, host_copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state_dict's version information
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return copy.deepcopy(obj)


def rng_state() -> dict:
    """Every random generator of this process: Python's, NumPy's, torch's CPU one and the current GPU's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)  # version 1: all devices


def describe(ckpt: dict) -> str:
    where = f"epoch {ckpt['epoch'] + 1}, batch {ckpt['batch']}" if ckpt["batch"] else f"end of epoch {ckpt['epoch']}"
    return f"{where}, step {ckpt['step']}"


# --- reading ----------------------------------------------------------------------------------------

def load(path: str) -> dict:
    """The checkpoint at path, verified (zip CRCs, format, version) and upgraded to the current version."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} is truncated or not a checkpoint ({e})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path!r} is corrupt (record {bad!r} fails its CRC check)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001: any unpickling failure means the same to the user
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path!r} is not an afd_fast checkpoint")
    version = ckpt.get("version", 1) if ckpt.get("format", FORMAT) == FORMAT else None
    if version is None or version > VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format {ckpt.get('format')!r} version {ckpt.get('version')}, "
                              f"newer than this afd_fast reads ({FORMAT} up to version {VERSION})")
    if version == 1:  # epoch-end checkpoints of earlier versions
        ckpt.update(format=FORMAT, version=VERSION, batch=0, world_size=len(ckpt["rng"]),
                    batch_size=ckpt["args"]["batch_size"], steps_per_epoch=None, reason="epoch",
                    ranks=[{"rng": r} for r in ckpt.pop("rng")])
    return ckpt


def _newest_complete(folder: str, exclude: tuple[str, ...] = ()) -> tuple[str, dict, list[tuple[str, str]]]:
    """(path, checkpoint, damaged) for the newest loadable candidate; damaged: (path, message) of
    the newer candidates that failed."""
    found = [p for p in (os.path.join(folder, name) for name in CANDIDATES)
             if os.path.isfile(p) and os.path.abspath(p) not in exclude]
    # newest first by construction (last.pt is replaced after previous.pt got its contents, best.pt is an
    # epoch's last.pt), not by modification time, which a copy of the folder may not keep
    damaged = []
    for path in found:
        try:
            return path, load(path), damaged
        except CheckpointError as e:
            damaged.append((path, str(e)))
    if not damaged:
        raise CheckpointError(f"--resume: no checkpoint in {folder!r} (none of {', '.join(CANDIDATES)} exists)")
    raise CheckpointError(f"--resume: no complete checkpoint in {folder!r}: " + "; ".join(m for _, m in damaged))


def resolve_resume(resume: str | None, output: str) -> tuple[str, dict, list[tuple[str, str]]] | None:
    """What ``--resume`` names: None to start fresh, else (path, checkpoint, damaged newer files as
    (path, message)). ``""`` (``--resume`` alone): the newest complete checkpoint of output; ``"auto"``:
    the same when output holds a checkpoint file, None when it holds none; a path: that file, and
    when it is damaged an error that names the fallback."""
    if resume is None:
        return None
    if resume == "auto" and not any(os.path.isfile(os.path.join(output, n)) for n in CANDIDATES):
        return None
    if resume in ("", "auto"):
        return _newest_complete(output)
    if not os.path.isfile(resume):
        raise CheckpointError(f"--resume: no checkpoint at {resume!r}")
    try:
        return resume, load(resume), []
    except CheckpointError as e:
        folder = os.path.dirname(os.path.abspath(resume))
        try:
            other, ckpt, _ = _newest_complete(folder, exclude=(os.path.abspath(resume),))
            advice = (f"the newest complete checkpoint in {folder!r} is {os.path.basename(other)} ({describe(ckpt)}): "
                      f"resume from it with --resume {other}, or with --resume alone (and --output {folder}) "
                      "to take the newest complete checkpoint")
        except CheckpointError:
            advice = f"no other complete checkpoint is in {folder!r}"
        raise CheckpointError(f"{e}; {advice}") from None


def set_aside(paths: list[str]) -> list[str]:
    """Renames damaged checkpoint files to <name>.damaged, so that they are neither resumed from nor
    rotated into previous.pt; returns the new names."""
    moved = []
    for path in paths:
        if os.path.isfile(path):
            os.replace(path, path + ".damaged")
            moved.append(path + ".damaged")
    return moved


def remove_temporaries(folder: str) -> None:
    """Temporary files of writes that a crash interrupted."""
    for path in glob.glob(os.path.join(glob.escape(folder), "*.pt.tmp.*")):
        try:
            os.remove(path)
        except OSError:
            pass


# --- writing ----------------------------------------------------------------------------------------

def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(src: str, dst: str, copy_if_no_links: bool) -> None:
    """dst becomes the same file as src (atomic replace), a hard link where possible."""
    tmp = f"{dst}.tmp.{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:
        if not copy_if_no_links:
            os.replace(src, dst)  # no hard links here: the old file moves (dst takes its place)
            return
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)


def write_durably(obj, path: str, best: bool = False, rotate: bool = True) -> None:
    """torch.save(obj) to path so that path is always a whole file: written beside it, fsynced,
    the current file linked to previous.pt (rotate), renamed over path, the folder fsynced; best:
    best.pt becomes the new file too."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if rotate and os.path.isfile(path):
            _link(path, os.path.join(folder, PREVIOUS), copy_if_no_links=False)
        os.replace(tmp, path)
        if best:
            _link(path, os.path.join(folder, BEST), copy_if_no_links=True)
        _fsync_folder(folder)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


class CheckpointWriter:
    """Rank 0's checkpoint writes, one at a time and in order, in a background thread: ``submit``
    waits for the previous write, then hands the (host) state over and returns at once; ``wait``
    joins the write in flight and raises :class:`CheckpointWriteError` if any write failed. A failed
    write stops the run (``failed`` is polled after every step): its previous checkpoint is intact."""

    def __init__(self, folder: str, resume_hint: str = ""):
        self.folder, self.resume_hint = folder, resume_hint
        self.path = os.path.join(folder, LAST)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.good: str | None = None  # what the newest complete last.pt holds
        self.rotate = True  # link the current last.pt to previous.pt before replacing it

    def start_fresh(self) -> None:
        """A run that does not resume: an earlier run's previous.pt goes, its last.pt and best.pt are
        set aside (``*.earlier-run``) so that neither a later --resume nor a fallback takes them."""
        try:
            os.remove(os.path.join(self.folder, PREVIOUS))
        except FileNotFoundError:
            pass
        for name in (LAST, BEST):
            path = os.path.join(self.folder, name)
            if os.path.exists(path):
                os.replace(path, path + ".earlier-run")
                print(f"afd_fast: starting fresh in {self.folder}: the earlier run's {name} is kept as "
                      f"{name}.earlier-run (pass --resume to continue a run)", file=sys.stderr)
        self.rotate = False

    def continue_from(self, ckpt: dict) -> None:
        """A run resumed from ckpt: what a failed write's message names as the intact checkpoint."""
        self.good = describe(ckpt)

    @property
    def failed(self) -> bool:
        return self.error is not None

    def submit(self, state: dict, best: bool = False, wait: bool = False) -> None:
        """After a failed write nothing more is written (the failure stops the run at the next
        agreement, on every process at the same step)."""
        self.wait(raise_error=wait)
        if self.failed:
            return
        state = {"format": FORMAT, "version": VERSION, **state}
        self.thread = threading.Thread(target=self._write, args=(state, best), name="afd_fast-checkpoint")
        self.thread.start()
        if wait:
            self.wait()

    def _write(self, state: dict, best: bool) -> None:
        try:
            write_durably(state, self.path, best, rotate=self.rotate)
            self.good, self.rotate = describe(state), True
        except BaseException as e:  # noqa: BLE001: reported by the training thread
            self.error = _os_error(e) or e

    def wait(self, raise_error: bool = True) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None and raise_error:
            raise CheckpointWriteError(self.message()) from self.error

    def message(self) -> str:
        e = self.error
        reason = f"[Errno {e.errno}] {e.strerror}" if isinstance(e, OSError) and e.strerror else repr(e)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            reason += f" (free space in {self.folder!r} or give another --output)"
        if os.path.isfile(self.path):
            kept = f"the previous checkpoint {self.path!r}" + (f" ({self.good})" if self.good else "") + " is intact"
        else:
            kept = "no earlier checkpoint exists"
        return (f"cannot write checkpoint {self.path!r}: {reason}; the run stops and {kept}"
                + (f"; resume with: {self.resume_hint}" if self.resume_hint and os.path.isfile(self.path) else ""))


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind an error: torch's zip writer turns a failed write into a RuntimeError
    whose context holds the OSError (e.g. ENOSPC)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None

