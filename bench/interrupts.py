"""Ctrl-C, SIGTERM and SLURM's preemption signal: one clean, resumable stop.

Why: Python's default SIGINT becomes a KeyboardInterrupt that libraries (typer, in its non-standalone mode)
turn into a quiet return code, and SIGTERM (what SLURM and torchrun send on preemption or failure) kills
the process without running any cleanup. Here each becomes `Interrupted`, a BaseException that unwinds
through every `finally` (temp files removed, locks released), and the CLI prints
`error: interrupted; re-run the same command to resume` and exits 128 + the signal number (130, 143).
Every file a run keeps is written atomically, so what is left is exactly what a re-run resumes from.
"""

from __future__ import annotations

import signal
from types import FrameType

MESSAGE = "interrupted; re-run the same command to resume"
TRAIN_MESSAGE = "interrupted; re-run the same command with --resume to continue from the last saved state"
# SIGUSR1: what `sbatch --signal=USR1@<seconds>` sends ahead of a time limit or preemption
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class Interrupted(BaseException):
    """A stop signal arrived: unwind (cleanup runs), then exit with 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_fired = False


def _handler(signum: int, frame: FrameType | None) -> None:
    global _fired
    if _fired:  # a second signal while unwinding must not tear the cleanup apart
        return
    _fired = True
    raise Interrupted(signum)


def install() -> None:
    """Route the stop signals to `Interrupted` (main thread only; a no-op elsewhere)."""
    for signum in SIGNALS:
        try:
            signal.signal(signum, _handler)
        except (ValueError, OSError):  # not the main thread, or a signal this platform cannot catch
            continue
