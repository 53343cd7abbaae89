"""Stopping cleanly when a scheduler preempts the job.

SLURM (``#SBATCH --signal=USR1@120``), Kubernetes and torchrun's agent send SIGTERM or SIGUSR1 some
time before they kill a job. :class:`StopControl` installs handlers for both that only note the
signal: the step in flight finishes. The processes then agree on the step after which they stop, so
that every process stops after the same one: a single process reads its flag after every step (no
cost), several processes all-reduce (MAX) one small integer tensor every ``check_every`` steps and at
every epoch end (one collective, not a host sync per step). The same tensor carries rank 0's two
other reasons to act at the same step on every process: a checkpoint due by the clock
(``--checkpoint-minutes``) and a failed background checkpoint write.

After a stop the trainer writes ``last.pt`` with the exact position, prints the command that resumes,
and every process exits with status 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1), as a
process killed by it would: schedulers and ``torchrun --max-restarts`` see an interrupted run.
"""
from __future__ import annotations

import os
import shlex
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from afd_fast.errors import TrainingInterrupted, signal_name  # noqa: F401  (part of this module's API)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Decision:
    stop: int = 0  # the signal number the processes stop on; 0: go on
    save: bool = False  # a checkpoint is due (--checkpoint-every / --checkpoint-minutes)
    write_failed: bool = False  # rank 0's background checkpoint write failed

    def __bool__(self) -> bool:
        return bool(self.stop or self.save or self.write_failed)


class StopControl:
    """Signal handlers (installed by ``with``, the earlier ones restored after) and the agreement on
    when to stop or checkpoint; see the module docstring."""

    def __init__(self, rank: int, world: int, device: torch.device, check_every: int,
                 checkpoint_every: int | None = None, checkpoint_minutes: float | None = None,
                 write_failed=lambda: False):
        self.rank, self.world, self.device = rank, world, device
        self.check_every, self.checkpoint_every = check_every, checkpoint_every
        self.checkpoint_seconds = None if checkpoint_minutes is None else 60.0 * checkpoint_minutes
        self.write_failed = write_failed
        self.signal = 0
        self.last_save = time.monotonic()
        self._previous = {}

    def __enter__(self) -> "StopControl":
        if threading.current_thread() is threading.main_thread():  # Python runs handlers there only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, frame) -> None:
        self.signal = self.signal or signum  # the first one counts; the step in flight finishes

    def saved(self) -> None:
        """A checkpoint was written: the --checkpoint-minutes clock starts again."""
        self.last_save = time.monotonic()

    def after_step(self, step: int) -> Decision:
        if self.world == 1 or step % self.check_every == 0:
            decision = self.agree()
        else:
            decision = Decision()
        if self.checkpoint_every and step % self.checkpoint_every == 0:
            decision.save = True
        return decision

    def agree(self) -> Decision:
        """The same decision on every process: what any of them (the clock and the writer: rank 0) asks."""
        due = self.checkpoint_seconds is not None and time.monotonic() - self.last_save >= self.checkpoint_seconds
        flags = [self.signal, int(due and self.rank == 0), int(self.write_failed() and self.rank == 0)]
        if self.world > 1:
            t = torch.tensor(flags, dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = t.tolist()
        return Decision(stop=flags[0], save=bool(flags[1]), write_failed=bool(flags[2]))


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments with ``--resume`` (the newest
    complete checkpoint of --output), under the same launcher."""
    args, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        if a.startswith("--resume="):
            continue
        args.append(a)
    args.append("--resume")
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", 1)) > 1:
        nodes, per_node = os.environ.get("GROUP_WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
        launcher = (f"torchrun --standalone --nproc_per_node={per_node}" if nodes == "1" else
                    f"torchrun --nnodes={nodes} --nproc_per_node={per_node} (and this job's --rdzv-* options)")
        return f"{launcher} -m afd_fast.train {shlex.join(args)}"
    return f"python -m afd_fast.train {shlex.join(args)}"
