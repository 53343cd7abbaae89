"""Test hooks for real-process tests, installed from outside afd_fast by monkeypatching.

    python tests/_hooks.py -m afd_fast.train ARGS          # or: python tests/_hooks.py SCRIPT.py ARGS
    torchrun ... tests/_hooks.py -m afd_fast.train ARGS

runs the program with the hooks that these environment variables ask for (none without them):

* ``AFD_FAST_TEST_PAUSE_AT_STEP=n`` (and ``AFD_FAST_TEST_PAUSE_RANK``, default 0): that process, after
  step n, writes the marker ``<folder>/.test-paused-step<n>-rank<r>`` holding its pid and waits, up to
  two minutes, until a stop signal arrives, so that a test can signal or kill it there. ``<folder>``
  is ``AFD_FAST_TEST_MARKERS`` or else the program's ``--output``. It pauses once per folder (a
  restarted run does not pause again).
* ``AFD_FAST_TEST_WRITE_FAULT="<n>:pause"`` or ``"<n>:enospc"``: the n-th write of a ``last.pt``
  checkpoint in this process, after its first 64 KiB, waits (after writing the marker file
  ``.test-paused-in-write`` holding the pid beside the checkpoint, for a test to kill -9 the process)
  or fails with ENOSPC, as a full disk does, inside torch's zip writer.

In-process tests call :func:`pause_after_step` and :func:`fail_checkpoint_write` with pytest's
``monkeypatch.setattr``.
"""
from __future__ import annotations

import errno
import os
import runpy
import sys
import time

import torch

from afd_fast import preemption


def pause_after_step(step: int, rank: int, folder: str, setattr=setattr) -> None:
    """StopControl.after_step pauses the given rank after the given step (see the module docstring)."""
    original = preemption.StopControl.after_step

    def after_step(self, s):
        if s == step and self.rank == rank:
            _pause(self, s, folder)
        return original(self, s)

    setattr(preemption.StopControl, "after_step", after_step)


def _pause(control, step: int, folder: str) -> None:
    marker = os.path.join(folder, f".test-paused-step{step}-rank{control.rank}")
    if os.path.exists(marker):
        return
    os.makedirs(folder, exist_ok=True)
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    print(f"test hook: rank {control.rank} paused after step {step}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 120
    while not control.signal and time.monotonic() < deadline:
        time.sleep(0.02)


def fail_checkpoint_write(nth: int, action: str, setattr=setattr) -> None:
    """torch.save makes the nth write of a last.pt pause or fail (see the module docstring)."""
    if action not in ("pause", "enospc"):
        raise ValueError(f"unknown write fault {action!r}: pause or enospc")
    real_save, count = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        name = os.path.basename(getattr(f, "name", "") or "")
        if isinstance(name, str) and name.startswith("last.pt.tmp."):
            count[0] += 1
            if count[0] == nth:
                f = _FaultyFile(f, action, os.path.dirname(os.path.abspath(f.name)))
        return real_save(obj, f, *args, **kwargs)

    setattr(torch, "save", save)


class _FaultyFile:
    def __init__(self, f, action: str, folder: str):
        self.f, self.action, self.folder, self.written = f, action, folder, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += n
        if self.written >= 65536:
            if self.action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.f.flush()
            with open(os.path.join(self.folder, ".test-paused-in-write"), "w") as marker:
                marker.write(str(os.getpid()))
            print("test hook: paused inside a checkpoint write", file=sys.stderr, flush=True)
            time.sleep(600)
        return n

    def flush(self) -> None:
        self.f.flush()


def _option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def install_from_environment(argv: list[str]) -> None:
    pause = os.environ.get("AFD_FAST_TEST_PAUSE_AT_STEP")
    if pause:
        folder = os.environ.get("AFD_FAST_TEST_MARKERS") or _option(argv, "--output")
        if folder is None:
            raise SystemExit("AFD_FAST_TEST_PAUSE_AT_STEP needs AFD_FAST_TEST_MARKERS or an --output argument")
        pause_after_step(int(pause), int(os.environ.get("AFD_FAST_TEST_PAUSE_RANK", 0)), folder)
    fault = os.environ.get("AFD_FAST_TEST_WRITE_FAULT")
    if fault:
        nth, action = fault.split(":")
        fail_checkpoint_write(int(nth), action)


def main() -> None:
    argv = sys.argv[1:]
    if not argv:
        raise SystemExit(__doc__)
    if argv[0] == "-m":
        target, args = argv[1], argv[2:]
    else:
        target, args = argv[0], argv[1:]
    install_from_environment(args)
    sys.argv = [target, *args]
    if argv[0] == "-m":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
