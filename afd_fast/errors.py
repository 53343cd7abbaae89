"""The errors afd_fast raises for what its user can fix: one base class, :class:`AfdFastError`.

Library calls raise them (``except AfdFastError`` catches every one, ``except Exception`` too); the
command line (``python -m afd_fast.train``) prints the message as one line, ``afd_fast: <message>``,
and exits with the error's ``exit_status``, without a traceback. Anything else that goes wrong is a
bug and keeps its traceback.
"""
from __future__ import annotations

import signal
import sys


class AfdFastError(Exception):
    """Base class. ``exit_status``: what the command line exits with."""

    exit_status = 1


class ConfigError(AfdFastError, ValueError):
    """Settings that do not fit together (e.g. a method with architectures it cannot use)."""

    exit_status = 2  # as argparse exits on a usage error


class BadDataError(AfdFastError, ValueError):
    """A data folder, file list or image that cannot be used; the message names the file."""


class CheckpointError(AfdFastError):
    """A checkpoint that cannot be used (missing, damaged, of an unknown format)."""


class CheckpointWriteError(AfdFastError):
    """Writing a checkpoint failed (e.g. a full disk); the earlier checkpoints are intact."""


class NonFiniteLoss(AfdFastError, ArithmeticError):
    """A loss or weight became NaN or infinite; nothing was saved after it."""


class TrainingInterrupted(AfdFastError):
    """Every process stopped on a stop signal after checkpointing its position; the command line
    exits with 128 + the signal number, as a process killed by the signal would."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"{signal_name(signum)}: stopped and checkpointed")
        self.signum = signum
        self.exit_status = 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_with(error: AfdFastError) -> None:
    """The command line's end on an afd_fast error: its message as one line on stderr, its exit status."""
    print(f"afd_fast: {error}", file=sys.stderr, flush=True)
    raise SystemExit(error.exit_status)
